"""One attention entry point, `attend`, with backends behind it.

Masks (`masks.AttentionMask`) say which keys each query sees, from document ids and
times, and promise a static structure that fused kernels can use.

Backends:
  reference  float32 (or float64) einsum with an explicit mask: the ground truth.
  xla        `jax.nn.dot_product_attention(implementation="xla")` in the compute dtype.
  cudnn      cuDNN flash attention (bf16/fp16): "causal" through cuDNN's causal mode;
             "prefix_causal" with keys and zero-padded queries rotated per row so that
             cuDNN's causal mode (top-left diagonal) gives each query exactly the valid
             prefix and its causal past; any other kind as an additive bias (slower).
  splash     Pallas TPU splash attention (`splash.py`): every kind but "general" as a static
             causal mask with offset P plus document ids as segment ids; a "general" mask
             runs on xla, with a `splash.SplashFallback` warning.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from . import numerics
from .masks import AttentionMask
from .platform import target

BACKENDS = ("reference", "xla", "cudnn", "splash")


def resolve_backend(backend: str, dtype) -> str:
    """`auto`: splash on a TPU (float64, which it cannot run, takes xla), cuDNN on a GPU in
    bf16/fp16, else xla."""
    if backend != "auto":
        return backend
    platform, dtype = target(), jnp.dtype(dtype)
    if platform == "tpu":
        return "xla" if dtype == jnp.float64 else "splash"
    return "cudnn" if platform == "gpu" and dtype in (jnp.bfloat16, jnp.float16) else "xla"


def attend(
    q: Float[Array, "B Tq H D"],
    k: Float[Array, "B Tk G D"],
    v: Float[Array, "B Tk G D"],
    mask: AttentionMask,
    backend: str = "xla",
) -> Float[Array, "B Tq H D"]:
    """Softmax attention of q over (k, v) under `mask`; GQA when H is a multiple of G."""
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of KV heads ({k.shape[2]})")
    if backend == "reference":
        return reference_attention(q, k, v, mask)
    if backend == "splash":
        from . import splash  # Pallas TPU kernels: imported only when asked for

        if splash.takes(mask):
            return splash.splash_attention(q, k, v, mask)
        backend = splash.fallback(mask)  # "general": xla, with a warning
    if backend == "xla":
        with numerics.matmul_scope(q, k):
            return jax.nn.dot_product_attention(q, k, v, mask=mask.dense(), implementation="xla")
    if backend == "cudnn":
        if mask.kind == "causal":
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        if mask.kind == "prefix_causal":
            return _cudnn_prefix_causal(q, k, v, mask)
        return jax.nn.dot_product_attention(q, k, v, mask=mask.dense(), implementation="cudnn")
    raise ValueError(f"unknown attention backend {backend!r} (choose from {', '.join(BACKENDS)})")


def _roll_rows(x, shift):
    """Rotate each row of x [B, T, ...] right by its own shift [B]."""
    return jax.vmap(lambda row, s: jnp.roll(row, s, axis=0))(x, shift)


def _cudnn_prefix_causal(q, k, v, mask: AttentionMask, implementation: str = "cudnn"):
    """[prefix P, segment S] keys of one document through plain causal attention.

    With the n valid prefix entries at the end of the prefix, rotating [segment, prefix]
    right by n gives key slots [valid prefix (n), segment (S), invalid prefix], and
    rotating [queries, zeros (P)] the same way puts query i in slot n + i: top-left causal
    attention then shows it slots 0..n+i, exactly its valid prefix and segment tokens
    0..i. Attention is order-free over keys (RoPE was applied already).
    """
    B, S, H, D = q.shape
    P = k.shape[1] - S
    n = (mask.k_doc[:, :P] >= 0).sum(-1, dtype=jnp.int32)
    k_slots, v_slots = (_roll_rows(jnp.concatenate([a[:, P:], a[:, :P]], 1), n) for a in (k, v))
    q_slots = _roll_rows(jnp.concatenate([q, jnp.zeros((B, P, H, D), q.dtype)], 1), n)
    out = jax.nn.dot_product_attention(q_slots, k_slots, v_slots, is_causal=True,
                                       implementation=implementation)
    return jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, S, axis=0))(out, n)


def reference_attention(q, k, v, mask: AttentionMask):
    """Explicit einsum in at least float32: scores, mask, softmax, weighted sum."""
    work = jnp.promote_types(q.dtype, jnp.float32)
    B, Tq, H, D = q.shape
    G = k.shape[2]
    qg = q.astype(work).reshape(B, Tq, G, H // G, D)
    scores = numerics.einsum("bqgrd,bkgd->bgrqk", qg, k.astype(work)) / jnp.sqrt(jnp.asarray(D, work))
    visible = mask.dense()[:, :, None]  # [B 1 1 Tq Tk]
    scores = jnp.where(visible, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    out = numerics.einsum("bgrqk,bkgd->bqgrd", weights, v.astype(work))
    return out.reshape(B, Tq, H, D).astype(q.dtype)
