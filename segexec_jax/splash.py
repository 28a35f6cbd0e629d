"""The `splash` attention backend: Pallas TPU splash attention behind `attend`.

Splash takes a static block-sparse mask and per-token segment ids: a key is visible to a
query iff the static mask allows it and both carry the same id. Every mask kind other than
"general" (see `attention.py`) lays its keys out as [prefix of P entries at time -1, the
queries' own tokens at times 0..Tq-1], so its visibility is exactly
    static mask   CausalMask((Tq, Tk), offset=P): key j is visible to query i iff j <= i + P,
    segment ids   the document ids (an invalid prefix entry's -1 is no query's id).
"causal" rows hold one document and need no ids, which lets the kernel skip the
element-wise mask on blocks below the diagonal.

A "general" mask promises no layout and runs on the `xla` backend instead, with a
`SplashFallback` warning (at trace time). The one "general" call of the segment operator is
the chunked `refresh` attention: each chunk's queries start at a different time of the
segment, so its causal offset depends on the chunk, which `chunked_attention` folds into
the batch axis; one static mask per call cannot say that.

Lengths: splash tiles both sequences in blocks (multiples of 128), so queries and keys are
zero-padded to multiples of 128 and the output sliced back. The padded keys get an id no
token has; they also lie past every real query's causal horizon (i + P <= Tk - 1). Padded
queries may see nothing: splash's finite mask value keeps their rows finite, and their
outputs are dropped (so their gradients are zero).

GQA: the kernel runs per row and per KV group as MQA (one KV head and its query heads),
vmapped over groups and rows, so K and V are never repeated.

Off a TPU the kernel runs only in Pallas interpret mode (slow; for tests), and only when
asked: set `segexec_jax.splash.INTERPRET = True` before tracing, or the environment
variable SEGEXEC_SPLASH_INTERPRET=1 before importing, or pass `interpret=True` to
`splash_attention`. Otherwise `attention.backend=splash` off a TPU is a clear error.
"""

from __future__ import annotations

import functools
import os
import warnings

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jaxtyping import Array, Float

from . import numerics
from .attention import AttentionMask

# Kinds whose keys are [prefix at time -1, the queries' own tokens]: see the module docstring.
KINDS = ("causal", "prefix_causal", "prefix_packed")
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
LANES = 128  # splash's blocks are multiples of this; sequences are padded to it
BLOCKS = (512, 256, 128)  # preferred block sizes, largest first

INTERPRET = os.environ.get("SEGEXEC_SPLASH_INTERPRET", "0") not in ("", "0")


class SplashFallback(UserWarning):
    """A mask that splash cannot express ran on the xla backend."""


def takes(mask: AttentionMask) -> bool:
    """Whether splash computes this mask itself (else `attend` falls back to xla)."""
    return mask.kind in KINDS


def fallback(mask: AttentionMask) -> str:
    """The backend for a mask splash cannot express, said out loud."""
    warnings.warn(f"attention.backend=splash: a {mask.kind!r} mask (query length {mask.q_doc.shape[1]}, "
                  f"key length {mask.k_doc.shape[1]}) has no static splash form and runs on the xla "
                  "backend (see segexec_jax/splash.py)", SplashFallback, stacklevel=3)
    return "xla"


def _round_up(n: int) -> int:
    return -(-n // LANES) * LANES


def _block(n: int) -> int:
    """The largest preferred block size dividing n (a multiple of LANES)."""
    return next(b for b in BLOCKS if n % b == 0)


@functools.lru_cache(maxsize=64)
def _kernel(Tq: int, Tk: int, offset: int, heads: int, interpret: bool):
    """The MQA kernel for padded lengths (Tq, Tk), a causal offset and `heads` query heads
    per KV head; built once per shape (its block-sparsity tables are numpy work)."""
    bq, bk = _block(Tq), _block(Tk)
    sizes = kernels.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk,
                               block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=bk,
                               block_q_dq=bq, block_kv_dq=bk)
    mask = masks.MultiHeadMask([masks.CausalMask((Tq, Tk), offset=offset)] * heads)
    with jax.ensure_compile_time_eval():  # concrete tables, even when first built under a trace
        return kernels.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                       interpret=interpret)


def _interpret(interpret: bool | None) -> bool:
    interpret = INTERPRET if interpret is None else interpret
    if not interpret and jax.default_backend() != "tpu":
        raise RuntimeError(
            f"attention.backend=splash needs a TPU (jax.default_backend() is {jax.default_backend()!r}); "
            "to run the kernel in Pallas interpret mode elsewhere (slow, for tests) set "
            "segexec_jax.splash.INTERPRET = True or SEGEXEC_SPLASH_INTERPRET=1")
    return interpret


def _pad_time(x: Array, length: int, value=0) -> Array:
    pad = length - x.shape[1]
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value) if pad else x


def splash_attention(
    q: Float[Array, "B Tq H D"],
    k: Float[Array, "B Tk G D"],
    v: Float[Array, "B Tk G D"],
    mask: AttentionMask,
    interpret: bool | None = None,
) -> Float[Array, "B Tq H D"]:
    """Softmax attention of q over (k, v) under a mask of a kind in `KINDS`."""
    if not takes(mask):
        raise ValueError(f"splash attention cannot express a {mask.kind!r} mask (kinds: {', '.join(KINDS)})")
    if jnp.dtype(q.dtype) not in DTYPES:
        raise ValueError(f"splash attention takes bfloat16, float16 or float32 inputs, got {q.dtype} "
                         "(use attention.backend=xla or reference)")
    B, Tq, H, D = q.shape
    Tk, G = k.shape[1], k.shape[2]
    P = Tk - Tq
    if P < 0:
        raise ValueError(f"a {mask.kind!r} mask has at least as many keys as queries, got {Tk} < {Tq}")
    r = H // G
    Tq_pad, Tk_pad = _round_up(Tq), _round_up(Tk)
    kernel = _kernel(Tq_pad, Tk_pad, P, r, _interpret(interpret))

    # splash does not scale the logits: scale the queries (in float32, then back)
    q = (q.astype(jnp.float32) * D ** -0.5).astype(q.dtype)
    q = _pad_time(q, Tq_pad).reshape(B, Tq_pad, G, r, D).transpose(0, 2, 3, 1, 4)  # [B G r Tq D]
    k, v = (_pad_time(a, Tk_pad).transpose(0, 2, 1, 3) for a in (k, v))  # [B G Tk D]
    ids = None
    if mask.kind != "causal":
        nobody = jnp.minimum(mask.q_doc.min(), mask.k_doc.min()) - 1  # no token's document
        ids = kernels.SegmentIds(_pad_time(mask.q_doc, Tq_pad, nobody), _pad_time(mask.k_doc, Tk_pad, nobody))

    per_group = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over KV groups; ids shared
    # float32 products at HIGHEST (`numerics`); the kernels' backward pass is traced later,
    # outside this scope, and keeps Mosaic's default precision
    with numerics.matmul_scope(q, k):
        out = jax.vmap(per_group)(q, k, v, ids)  # over rows: [B G r Tq D]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, Tq_pad, H, D)[:, :Tq]
