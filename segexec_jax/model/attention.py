"""One attention entry point, `attend`, with backends behind it.

Masks (`masks.AttentionMask`) say which keys each query sees, from document ids and
times, and promise a static structure that fused kernels can use.

Backends:
  reference  float32 (or float64) einsum with an explicit mask: the ground truth.
  xla        `jax.nn.dot_product_attention(implementation="xla")` in the compute dtype.
  cudnn      cuDNN flash attention (bf16/fp16): "causal" through cuDNN's causal mode;
             "prefix_causal" with keys and zero-padded queries rotated per row so that
             cuDNN's causal mode (top-left diagonal) gives each query exactly the valid
             prefix and its causal past; "prefix_packed" (packed rows: document ids)
             through cuDNN's packed layout, one causal sequence per document (see
             `_cudnn_packed`); "general" as an additive bias (slower).
  splash     Pallas TPU splash attention (`splash.py`): every kind but "general" as a static
             causal mask with offset P plus document ids as segment ids; a "general" mask
             runs on xla, with a `splash.SplashFallback` warning.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import warnings

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

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
        return _xla_dense(q, k, v, mask)
    if backend == "cudnn":
        if mask.kind == "causal":
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        if mask.kind == "prefix_causal":
            return _cudnn_prefix_causal(q, k, v, mask)
        if mask.kind == "prefix_packed":
            return _cudnn_packed(q, k, v, mask)
        return _cudnn_dense(q, k, v, mask)
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


def _xla_dense(q, k, v, mask: AttentionMask):
    with numerics.matmul_scope(q, k):
        return jax.nn.dot_product_attention(q, k, v, mask=mask.dense(), implementation="xla")


def _cudnn_dense(q, k, v, mask: AttentionMask):
    """Any mask as cuDNN's additive bias: a [B, 1, Tq, Tk] tensor written and read in full."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask.dense(), implementation="cudnn")


# --------------------------------------------------------------------------- packed rows

# Documents per row that one packed call holds. cuDNN gets this many sequences (plus one) for
# every row, whatever the row holds, and each costs launch work even when empty; a call in
# which some row holds more documents runs the dense-bias path instead (exact, a `lax.cond`).
# 0 turns the packed path off (packed rows take the dense-bias path, as before it existed).
PACKED_MAX_DOCS = int(os.environ.get("SEGEXEC_PACKED_MAX_DOCS", "16"))
# jax (0.10) scales the packed key offsets by the number of *query* heads, right only when
# the keys have as many heads: so under GQA the keys and values are repeated to every query
# head, unless this says that the installed jax reads GQA offsets right.
PACKED_NATIVE_GQA = os.environ.get("SEGEXEC_PACKED_NATIVE_GQA", "0") not in ("", "0")


class PackedFallback(UserWarning):
    """Packed rows ran on the dense-bias cuDNN path: this jax or GPU has no packed layout."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Where the documents of a "prefix_packed" call lie among the slots [prefix (P), queries
    (Tq)], in the form cuDNN's packed layout reads: sequence m covers slots offset[m] ..
    offset[m] + length[m] - 1 of queries and keys alike (-1: no sequence), causal inside.

    Sequence 0 holds the invalid prefix entries, 1 the first document with its valid prefix
    entries just before its queries, 2.. the next documents. Every slot lies in a sequence:
    cuDNN leaves the outputs and gradients of uncovered slots undefined.
    """

    order: Int[Array, "B P"]  # the prefix entries in slot order: the invalid, then the valid
    offset: Int[Array, "B M+1"]  # M = max_docs + 1 sequences; the last column is always -1
    length: Int[Array, "B M"]
    overflow: Bool[Array, ""]  # some row holds more than max_docs documents


def packed_layout(mask: AttentionMask, max_docs: int = PACKED_MAX_DOCS) -> PackedLayout:
    """The packed layout of a "prefix_packed" mask (see `masks.py` for its promise).

    With the valid prefix entries moved to the end of the prefix and the queries behind P
    zero queries, the first document's keys are slots [P - n, P + L_0): its n valid prefix
    entries, then its own tokens, and its query j sits in slot P + j, so causal attention
    inside the sequence shows it exactly its prefix and its tokens up to j. A later document
    starting at query s has slots [P + s, P + s + L). The zero queries' outputs are dropped,
    so no gradient reaches any key from them."""
    q_doc, k_doc = mask.q_doc, mask.k_doc
    B, Tq = q_doc.shape
    P = k_doc.shape[1] - Tq
    valid = k_doc[:, :P] == q_doc[:, :1]
    n = valid.sum(-1, dtype=jnp.int32)
    order = jnp.argsort(valid, axis=-1, stable=True).astype(jnp.int32)
    new = jnp.concatenate([jnp.ones((B, 1), bool), q_doc[:, 1:] != q_doc[:, :-1]], axis=1)
    # document index of each query (a log-depth scan, not cumsum: see operator._running)
    run = jax.lax.associative_scan(jnp.add, new.astype(jnp.int32), axis=1) - 1
    count = run[:, -1] + 1
    t = jnp.broadcast_to(jnp.arange(Tq, dtype=jnp.int32), (B, Tq))
    start = (jnp.full((B, max_docs), Tq, jnp.int32)
             .at[jnp.arange(B)[:, None], jnp.where(new, run, max_docs)].set(t, mode="drop"))
    end = jnp.concatenate([start[:, 1:], jnp.full((B, 1), Tq, jnp.int32)], axis=1)
    first = jnp.where(jnp.arange(max_docs) == 0, n[:, None], 0)  # the first document's prefix
    present = jnp.arange(max_docs) < count[:, None]
    guard = P - n
    none = jnp.full((B, 1), -1, jnp.int32)
    offset = jnp.concatenate([jnp.where(guard > 0, 0, -1)[:, None], jnp.where(present, P + start - first, -1),
                              none], axis=1)
    length = jnp.concatenate([jnp.where(guard > 0, guard, -1)[:, None],
                              jnp.where(present, end - start + first, -1)], axis=1)
    return PackedLayout(order, offset, length, jnp.any(count > max_docs))


def packed_slots(q, k, v, layout: PackedLayout):
    """Queries, keys and values in the slots of `layout`: the prefix reordered, P zero queries."""
    B, Tq, H, D = q.shape
    P = k.shape[1] - Tq
    if not P:
        return q, k, v
    reorder = jax.vmap(lambda a, order: a[order])
    k, v = (jnp.concatenate([reorder(a[:, :P], layout.order), a[:, P:]], axis=1) for a in (k, v))
    return jnp.concatenate([jnp.zeros((B, P, H, D), q.dtype), q], axis=1), k, v


@jax.custom_vjp
def _undefined_gradient(x, covered):
    return x


def _undefined_gradient_fwd(x, covered):
    return x, covered


def _undefined_gradient_bwd(covered, g):
    return jnp.where(covered[:, :, None, None], g, jnp.nan), None


_undefined_gradient.defvjp(_undefined_gradient_fwd, _undefined_gradient_bwd)


def packed_causal_xla(q, k, v, length, offset):
    """cuDNN's packed causal attention written out with XLA (the slow twin of the kernel, for
    tests on any platform): slot i sees slot j iff one sequence covers both and j <= i. What
    cuDNN leaves undefined is NaN here: the outputs of uncovered slots, and the gradients
    reaching them, so that a layout relying on either fails its tests."""
    T = q.shape[1]
    t = jnp.arange(T, dtype=jnp.int32)
    lo, ln = offset[:, :-1, None], length[:, :, None]
    inside = (ln > 0) & (lo <= t) & (t < lo + ln)  # [B M T]
    covered = inside.any(axis=1)
    seq = jnp.where(covered, jnp.argmax(inside, axis=1), -1)
    visible = (seq[:, :, None] == seq[:, None, :]) & covered[:, :, None] & (t[:, None] >= t[None, :])
    q, k, v = (_undefined_gradient(a, covered) for a in (q, k, v))
    with numerics.matmul_scope(q, k):
        out = jax.nn.dot_product_attention(q, k, v, mask=visible[:, None], implementation="xla")
    return jnp.where(covered[:, :, None, None], out, jnp.nan)


@functools.cache
def _cudnn_packed_api():
    """jax's cuDNN attention module when it takes the packed layout, else (None, why not).
    (A private module: the public `jax.nn.dot_product_attention` has no packed layout.)"""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as api
    except ImportError as e:
        return None, f"jax {jax.__version__} has no cuDNN fused attention module ({e})"
    takes = set(inspect.signature(api.dot_product_attention).parameters)
    if not {"q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets"} <= takes or not hasattr(api, "MaskType"):
        return None, f"jax {jax.__version__}'s cuDNN attention takes no packed layout (q_offsets, kv_offsets)"
    return api, None


def _packed_unavailable() -> str | None:
    """Why the packed cuDNN call cannot run here, or None."""
    api, why = _cudnn_packed_api()
    if api is None:
        return why
    if target() != "gpu":
        return f"the platform is {target()!r}"
    try:
        capabilities = {d.compute_capability for d in jax.devices("gpu")}
    except (RuntimeError, AttributeError):  # no local GPU (compiling ahead of time): assume one
        return None
    old = sorted(c for c in capabilities if tuple(int(x) for x in str(c).split(".")) < (9, 0))
    return f"cuDNN's packed layout needs compute capability 9.0 or newer (Hopper), not {old[0]}" if old else None


def _cudnn_packed_call(q, k, v, length, offset):
    api, _ = _cudnn_packed_api()
    H, G, D = q.shape[2], k.shape[2], q.shape[3]
    if H != G and not PACKED_NATIVE_GQA:
        k, v = (jnp.repeat(a, H // G, axis=2) for a in (k, v))
    return api.dot_product_attention(q, k, v, q_seqlen=length, kv_seqlen=length, q_offsets=offset,
                                     kv_offsets=offset, scale=D ** -0.5,
                                     mask_type=api.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")


def _packed_kernel(implementation: str):
    """(kernel, None), or (None, why not): the packed causal kernel of `implementation`."""
    if implementation == "xla":
        return packed_causal_xla, None
    why = _packed_unavailable()
    return (None, why) if why else (_cudnn_packed_call, None)


def _cudnn_packed(q, k, v, mask: AttentionMask, implementation: str = "cudnn", max_docs: int | None = None):
    """A "prefix_packed" mask through cuDNN's packed layout (`packed_layout`): one causal
    sequence per document, no dense mask. A call in which some row holds more than
    `max_docs` documents (default `PACKED_MAX_DOCS`; 0: always) takes the dense path
    (`lax.cond`); `implementation="xla"` runs the same layout through `packed_causal_xla`."""
    dense = _xla_dense if implementation == "xla" else _cudnn_dense
    max_docs = min(PACKED_MAX_DOCS if max_docs is None else max_docs, q.shape[1])
    if max_docs <= 0:
        return dense(q, k, v, mask)
    kernel, why = _packed_kernel(implementation)
    if kernel is None:
        warnings.warn(f"attention.backend=cudnn: packed rows take the dense-bias path (slower): {why}",
                      PackedFallback, stacklevel=3)
        return dense(q, k, v, mask)
    P = k.shape[1] - q.shape[1]
    layout = packed_layout(mask, max_docs)

    def packed(q, k, v):
        return kernel(*packed_slots(q, k, v, layout), layout.length, layout.offset)[:, P:]

    if max_docs == q.shape[1]:  # no row can hold more
        return packed(q, k, v)
    return jax.lax.cond(layout.overflow, lambda q, k, v: dense(q, k, v, mask), packed, q, k, v)


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
