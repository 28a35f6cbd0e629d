"""Matmul precision: one rule for every product the package computes.

A float32 (or wider) computation promises exactness: generation equals the training forward
to 1e-4 (SPEC §4), and a top-k selection must not flip between the two. A TPU's default
precision for float32 operands is one bf16 pass (XLA's DEFAULT), which breaks both, and
GPUs may use TF32. So every product of float32 operands asks for `Precision.HIGHEST`
explicitly; products of bf16/fp16 operands keep DEFAULT, which is exact for them (their
products accumulate in float32). To trade exactness for speed, compute in bfloat16
(`model.dtype=bfloat16`) rather than in float32 at a lower precision.

`einsum` is the entry point for every product; attention backends that call library
kernels run inside `matmul_scope`.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

EXACT = jax.lax.Precision.HIGHEST


def precision_for(*operands) -> jax.lax.Precision:
    """HIGHEST when any operand is float32 or wider, else DEFAULT."""
    wide = any(jnp.dtype(x.dtype).itemsize >= 4 and jnp.issubdtype(x.dtype, jnp.floating) for x in operands)
    return EXACT if wide else jax.lax.Precision.DEFAULT


def einsum(spec: str, *operands, **kwargs):
    """`jnp.einsum` with the precision rule above."""
    return jnp.einsum(spec, *operands, precision=precision_for(*operands), **kwargs)


def matmul_scope(*operands):
    """A context in which library kernels (e.g. `jax.nn.dot_product_attention`) trace their
    products at the precision `einsum` would use for these operands."""
    if precision_for(*operands) == EXACT:
        return jax.default_matmul_precision("highest")
    return contextlib.nullcontext()
