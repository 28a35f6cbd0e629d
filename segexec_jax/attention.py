"""One attention entry point, `attend`, with backends behind it.

Visibility is computed from positions, not indices: every query and key carries a document
id and a time. A key is visible to a query iff both belong to the same document and the
key's time is not after the query's. Prefix keys (tail, sinks, retrieved) take time -1, so
every query of their document sees them; an invalid prefix entry takes document -1, which
no query has. This stays right when the query length differs from the key length.

A mask's static `kind` promises a structure that fused kernels can use:
  "causal"         plain causal self-attention of one document (keys = the queries' tokens);
  "prefix_causal"  keys = [prefix, segment] of one document whose valid prefix entries end
                   the prefix (the invalid ones, doc -1, come first);
  "prefix_packed"  keys = [prefix of P >= 0 entries at time -1, the queries' own tokens at
                   times 0..Tq-1], any document ids (packed rows); the two kinds above are
                   special cases of it;
  "general"        no promise (the chunked `refresh` attention, decoding).

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

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from . import numerics

BACKENDS = ("reference", "xla", "cudnn", "splash")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    q_doc: Int[Array, "B Tq"]
    q_time: Int[Array, "B Tq"]
    k_doc: Int[Array, "B Tk"]
    k_time: Int[Array, "B Tk"]
    # Static promise about the structure (see the module docstring): "general", "causal",
    # "prefix_causal" or "prefix_packed". Backends that build the dense mask ignore it.
    kind: str = dataclasses.field(default="general", metadata=dict(static=True))

    def dense(self) -> Bool[Array, "B 1 Tq Tk"]:
        same_doc = self.q_doc[:, :, None] == self.k_doc[:, None, :]
        not_future = self.k_time[:, None, :] <= self.q_time[:, :, None]
        return (same_doc & not_future)[:, None]

    @staticmethod
    def causal(doc: Int[Array, "B T"], plain: bool = False) -> AttentionMask:
        """Causal within documents; `plain` promises a single document per row."""
        time = jnp.broadcast_to(jnp.arange(doc.shape[1], dtype=jnp.int32), doc.shape)
        return AttentionMask(doc, time, doc, time, kind="causal" if plain else "prefix_packed")


def resolve_backend(backend: str, dtype) -> str:
    """`auto`: splash on a TPU (float64, which it cannot run, takes xla), cuDNN on a GPU in
    bf16/fp16, else xla."""
    if backend != "auto":
        return backend
    platform, dtype = jax.default_backend(), jnp.dtype(dtype)
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
