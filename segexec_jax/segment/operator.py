"""The segment operator (SPEC §2): one segment of every layer, and the scan over segments.

A row of T tokens is cut into segments of S tokens (the last is padded). Before segment i
the state holds, per layer, the pre-RoPE keys/values of
  - the tail C_{i-1}: the last M tokens of segment i-1 (every KV group; read by `tail` heads),
  - the sinks: the first n tokens of the current document (stop-gradient),
  - the pool: every earlier token of each long-range head of the long-range layers
    (stop-gradient), from which retrieval picks R_{i-1} before the segment.
Inside a layer, the heads of each KV group attend over their role's prefix and the
segment (`roles.Role`: by default [sinks, tail] for local heads, [retrieved] for the
long-range heads of long-range layers, nothing for the other long-range heads); the views
come from `role_views`, for training, prefill and decoding alike.

Positions are re-indexed inside the window: valid prefix entries take 0..P-1 in order and
the query at offset j takes P + j. A key of another document is never visible; a document
that begins inside a segment sees only itself, at offsets counted from its own start.
Packed rows (SPEC §2) never carry such a document into the next segment, but other rows
do (left padding, other packers): there the next segment's prefix holds only its entries,
ranked from 0, and its sinks are its own first tokens, as the reference computes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ..config import Config
from ..model import numerics
from ..model.attention import AttentionMask, attend, resolve_backend
from ..model.rope import apply_rope, model_frequencies
from ..model.transformer import Transformer, apply_layer, remat_policy, scan_layers
from . import retrieval
from .roles import RETRIEVED, SINKS, TAIL_PART, RolePlan, role_plan

dataclass = dataclasses.dataclass
pytree = jax.tree_util.register_dataclass


# --------------------------------------------------------------------------- state


@pytree
@dataclass(frozen=True)
class Tail:
    """C_i: pre-RoPE keys and values of the last M tokens of a segment, every layer and group."""

    k: Float[Array, "L B M G D"]
    v: Float[Array, "L B M G D"]


@pytree
@dataclass(frozen=True)
class Sinks:
    """The first n tokens of the current document (stop-gradient), every layer and group:
    the document of the last token before the segment, wherever in a segment it began."""

    k: Float[Array, "L B n G D"]
    v: Float[Array, "L B n G D"]
    doc: Int[Array, "B"]  # document they belong to (-1: none yet)
    start: Int[Array, "B"]  # absolute index of that document's first token


@pytree
@dataclass(frozen=True)
class Retrieved:
    """R_{i-1}: entries selected from the pool for each long layer, valid ones last."""

    k: Float[Array, "Ll B R Gl D"]
    v: Float[Array, "Ll B R Gl D"]
    count: Int[Array, "B"]  # valid entries per row
    doc: Int[Array, "B"]  # document of the token before the segment (the query's)


@pytree
@dataclass(frozen=True)
class Geometry:
    """Where a segment sits in its row: documents and offsets, no parameters."""

    start: Int[Array, ""]  # absolute index of the segment's first token (or one per row, [B])
    doc: Int[Array, "B S"]  # document ids (0: padding)
    offset: Int[Array, "B S"]  # t - max(segment start, document start of t)
    first_doc: Int[Array, "B"]
    continuing: Bool[Array, "B"]  # the first document began in an earlier segment
    tail_doc: Int[Array, "B M"]  # documents of the previous segment's last M tokens


@pytree
@dataclass(frozen=True)
class View:
    """Positions and mask of one attention call over [prefix, segment]."""

    q_pos: Int[Array, "B S"]
    k_pos: Int[Array, "B K"]
    mask: AttentionMask


@pytree
@dataclass(frozen=True)
class LayerOut:
    """What a segment leaves behind in every layer (leading layer axis)."""

    tail: Tail
    head_k: Float[Array, "L B n G D"]  # first n tokens: the sinks if a document starts here
    head_v: Float[Array, "L B n G D"]
    pool_k: Float[Array, "L B S Gl D"]  # long-range slots, for the pool
    pool_v: Float[Array, "L B S Gl D"]
    query: Float[Array, "L B Gl D"]  # retrieval query for the next segment
    chunk_index: Int[Array, "L Q B Gl R"] | None = None  # `refresh`: chunks 1..Q's selections


@pytree
@dataclass(frozen=True)
class ChunkSource:
    """What the `refresh` rule selects from inside a segment: the pool of the earlier
    segments (stop-gradient) and which of its entries are candidates (the segment's first
    document, written before the segment)."""

    pool_k: Float[Array, "Ll B C Gl D"]
    pool_v: Float[Array, "Ll B C Gl D"]
    candidate: Bool[Array, "B C"]


def document_runs(doc: Int[Array, "B T"]) -> Int[Array, "B T"]:
    """Number each maximal run of equal ids 1, 2, ... so that equal ids mean one document
    (two separate runs of padding, or a reused id, never see each other)."""
    new = jnp.concatenate([jnp.ones_like(doc[:, :1], bool), doc[:, 1:] != doc[:, :-1]], axis=1)
    return _running(jnp.add, new.astype(jnp.int32))


def document_starts(doc: Int[Array, "B T"]) -> Int[Array, "B T"]:
    """Absolute index of the first token of each token's document."""
    T = doc.shape[1]
    t = jnp.arange(T, dtype=jnp.int32)
    new = jnp.concatenate([jnp.ones_like(doc[:, :1], bool), doc[:, 1:] != doc[:, :-1]], axis=1)
    return _running(jnp.maximum, jnp.where(new, t, 0))


def _running(op, x: Int[Array, "B T"]) -> Int[Array, "B T"]:
    """Running `op` along the time axis as a log-depth scan. (jnp.cumsum and lax.cummax lower
    to a reduce-window as long as the row; when the ids are constants, as for rows without
    doc ids, XLA folds that window in O(T^2) work at compile time: minutes at 32K.)"""
    return jax.lax.associative_scan(op, x, axis=1)


# --------------------------------------------------------------------------- geometry & views


def geometry(S: int, M: int, seg: Int[Array, ""], doc: Int[Array, "B T"], doc_start: Int[Array, "B T"]) -> Geometry:
    start = (seg * S).astype(jnp.int32)
    seg_doc = jax.lax.dynamic_slice_in_dim(doc, start, S, axis=1)
    seg_doc_start = jax.lax.dynamic_slice_in_dim(doc_start, start, S, axis=1)
    t = start + jnp.arange(S, dtype=jnp.int32)
    offset = t - jnp.maximum(start, seg_doc_start)
    tail_idx = jnp.clip(start - M + jnp.arange(M, dtype=jnp.int32), 0, doc.shape[1] - 1)
    tail_doc = jnp.where(start >= M, doc[:, tail_idx], -1)
    return Geometry(start, seg_doc, offset, seg_doc[:, 0], seg_doc_start[:, 0] < start, tail_doc)


def prefix_view(geo: Geometry, valid: Bool[Array, "B P"], single_doc: bool, prefix_pos=None) -> View:
    """View over [prefix, segment]; `valid` marks prefix entries of the first document, whose
    window positions are `prefix_pos` (default: 0, 1, ... in array order).

    `single_doc` promises one document per row (plus trailing padding) and valid prefix
    entries at the end of the prefix, which lets fused attention kernels skip the dense
    mask (mask kind "prefix_causal"); without it the kind is "prefix_packed"."""
    B, S = geo.doc.shape
    P = valid.sum(-1, dtype=jnp.int32)
    if prefix_pos is None:
        prefix_pos = jnp.cumsum(valid, axis=-1, dtype=jnp.int32) - 1
    q_pos = jnp.where(geo.doc == geo.first_doc[:, None], P[:, None], 0) + geo.offset
    q_time = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    k_doc = jnp.concatenate([jnp.where(valid, geo.first_doc[:, None], -1), geo.doc], axis=1)
    k_time = jnp.concatenate([jnp.full(valid.shape, -1, jnp.int32), q_time], axis=1)
    k_pos = jnp.concatenate([jnp.maximum(prefix_pos, 0), q_pos], axis=1)
    kind = "prefix_causal" if single_doc else "prefix_packed"
    return View(q_pos, k_pos, AttentionMask(geo.doc, q_time, k_doc, k_time, kind=kind))


def tail_view(geo: Geometry, sinks: Sinks, M: int, single_doc: bool = False,
              sees: tuple[str, ...] = (SINKS, TAIL_PART)) -> View:
    """Prefix [sinks, tail] in window positions; sinks that the tail covers are dropped.
    `sees` (a role's, `roles.Role`) keeps only some of the two parts valid.

    In the key array the sinks are stored in reverse order (`tail_prefix`), so that valid
    entries always end the prefix: the usable sinks are the first ones, and there are
    none unless the tail is valid too (a role that sees the sinks alone breaks that order,
    so its mask is the packed kind)."""
    n = sinks.k.shape[2]
    cont = geo.continuing[:, None]
    sink_idx = sinks.start[:, None] + jnp.arange(n, dtype=jnp.int32)
    sink_ok = cont & (sinks.doc == geo.first_doc)[:, None] & (sink_idx < jnp.reshape(geo.start, (-1, 1)) - M)
    tail_ok = cont & (geo.tail_doc == geo.first_doc[:, None])
    if SINKS not in sees:
        sink_ok = jnp.zeros_like(sink_ok)
    if TAIL_PART not in sees:
        tail_ok = jnp.zeros_like(tail_ok)
        single_doc = single_doc and (SINKS not in sees or M == 0)
    n_sinks = sink_ok.sum(-1, dtype=jnp.int32)[:, None]
    sink_pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), sink_ok.shape)
    # ranks, not slots: a document that began inside the last M tokens fills only the end
    # of the tail, and its first tail entry must still take the position right after the sinks
    tail_pos = n_sinks + jnp.cumsum(tail_ok, axis=-1, dtype=jnp.int32) - 1
    return prefix_view(geo, jnp.concatenate([sink_ok[:, ::-1], tail_ok], axis=1), single_doc,
                       jnp.concatenate([sink_pos[:, ::-1], tail_pos], axis=1))


def tail_prefix(sink_kv: Float[Array, "B n G D"], tail_kv: Float[Array, "B M G D"]):
    """Keys or values of the tail view's prefix, in `tail_view`'s order."""
    return jnp.concatenate([sink_kv[:, ::-1], tail_kv], axis=1)


def retrieval_view(geo: Geometry, ret: Retrieved, single_doc: bool = False) -> View:
    R = ret.k.shape[2]
    ok = geo.continuing & (ret.doc == geo.first_doc)
    valid = ok[:, None] & (jnp.arange(R, dtype=jnp.int32)[None] >= R - ret.count[:, None])
    return prefix_view(geo, valid, single_doc)


# --------------------------------------------------------------------------- one segment


def _per_layer_view(views: View, pick: Int[Array, ""]) -> View:
    return jax.tree.map(lambda a: a[pick], views)


def _take_heads(x: Array, idx: np.ndarray) -> Array:
    """x[:, :, idx] for a static index: a slice when the heads are contiguous."""
    if len(idx) and (np.diff(idx) == 1).all():
        return jax.lax.slice_in_dim(x, int(idx[0]), int(idx[-1]) + 1, axis=2)
    return jnp.take(x, jnp.asarray(idx), axis=2)


def _merge_heads(parts: list[tuple[Array, np.ndarray]], n_heads: int) -> Array:
    """Inverse of `_take_heads` for a static partition: concatenate contiguous runs."""
    owner, pos = np.zeros(n_heads, int), np.zeros(n_heads, int)
    for p, (_, idx) in enumerate(parts):
        owner[idx], pos[idx] = p, np.arange(len(idx))
    pieces, h = [], 0
    while h < n_heads:
        end = h + 1
        while end < n_heads and owner[end] == owner[h] and pos[end] == pos[end - 1] + 1:
            end += 1
        pieces.append(jax.lax.slice_in_dim(parts[owner[h]][0], int(pos[h]), int(pos[h]) + end - h, axis=2))
        h = end
    return jnp.concatenate(pieces, axis=2)


def chunked_attention(rotate_attend: Callable, q, k, v, rk, rv, view: View):
    """`refresh`: the queries of chunk c [B S/Nc] attend over [R_c, the segment] under `view`.

    q [B S Hl D]; k, v [B S Gl D]; rk, rv [B Nc R Gl D]. Chunks are folded into the batch,
    so every query still scores R + S keys (the cost of one selection per segment); all
    chunks have the same number of valid entries, hence the same positions."""
    B, S, Hl, D = q.shape
    _, Nc, R, Gl, _ = rk.shape
    fold = lambda a: a.reshape((B * Nc, S // Nc) + a.shape[2:])  # [B S ...] -> [B*Nc S/Nc ...]
    every = lambda a: jnp.repeat(a, Nc, axis=0)  # [B K ...] -> [B*Nc K ...]
    keys = lambda pre, seg: jnp.concatenate([pre.reshape(B * Nc, R, Gl, D), every(seg)], axis=1)
    m = view.mask
    # mask kind "general": a chunk's queries start at time c * S/Nc, so the causal offset
    # depends on the chunk, folded into the batch: no static kernel mask (splash uses xla)
    chunk_view = View(fold(view.q_pos), every(view.k_pos),
                      AttentionMask(fold(m.q_doc), fold(m.q_time), every(m.k_doc), every(m.k_time)))
    return rotate_attend(fold(q), keys(rk, k), keys(rv, v), chunk_view).reshape(B, S, Hl, D)


def long_queries(plan: RolePlan, q, per: dict):
    """The long-range slots' query heads of q [B T H D] -> [B T Gl*r D]."""
    if plan.uniform:
        return _take_heads(q, plan.static_split()[3])
    return jnp.take(q, per["long_q_heads"], axis=2)


def role_attention(plan: RolePlan, q, k, v, pk, pv, rk, rv, t_view: View, l_view: View, per: dict,
                   rotate_attend: Callable):
    """Every head of one layer attends over its role's prefix and the segment keys.

    q [B Tq H D] are the queries; k, v [B S G D] the segment's keys and values (its own in
    a forward pass, the cache during decoding); pk, pv the tail prefix [B n+M G D]; rk, rv
    the retrieved prefix of this layer [B R Gl D] (or one per chunk, [B Nc R Gl D], with
    `refresh`). `t_view` masks the tail heads' keys [pk, k]; `l_view` the long-range heads'
    keys [rk, k] (an empty prefix in layers where they are `segment` heads). Returns the
    outputs [B Tq H D] and the long-range heads' pre-RoPE queries, keys and values.
    """
    def long_attend(ql, kl, vl):
        if rk.ndim == 5:
            return chunked_attention(rotate_attend, ql, kl, vl, rk, rv, l_view)
        return rotate_attend(ql, jnp.concatenate([rk, kl], 1), jnp.concatenate([rv, vl], 1), l_view)

    if plan.n_long == 0:
        o = rotate_attend(q, jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1), t_view)
        return o, q[:, :, :0], k[:, :, :0], v[:, :, :0]
    if plan.uniform:  # static head split: each head attends once, no gathers
        tail_g, long_g, tail_q, long_q = plan.static_split()
        ql = long_queries(plan, q, per)
        kl, vl = _take_heads(k, long_g), _take_heads(v, long_g)
        parts = [(long_attend(ql, kl, vl), long_q)]
        if len(tail_g):
            kt = jnp.concatenate([_take_heads(pk, tail_g), _take_heads(k, tail_g)], 1)
            vt = jnp.concatenate([_take_heads(pv, tail_g), _take_heads(v, tail_g)], 1)
            parts.append((rotate_attend(_take_heads(q, tail_q), kt, vt, t_view), tail_q))
        return _merge_heads(parts, q.shape[2]), ql, kl, vl
    # per-layer head sets: every head through the tail view, long heads redone
    o = rotate_attend(q, jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1), t_view)
    ql = long_queries(plan, q, per)  # [B Tq Gl*r D]
    kl = jnp.take(k, per["long_groups"], axis=2)  # [B S Gl D]
    vl = jnp.take(v, per["long_groups"], axis=2)
    heads = jnp.where(per["long_used_heads"], per["long_q_heads"], q.shape[2])  # unused: dropped
    return o.at[:, :, heads].set(long_attend(ql, kl, vl), mode="drop"), ql, kl, vl


def layer_inputs(plan: RolePlan, tail: Tail, sinks: Sinks) -> dict:
    """Per-layer scan inputs of the segment operator (leading layer axis)."""
    r = plan.group_size
    return dict(tail_k=tail.k, tail_v=tail.v, sink_k=sinks.k, sink_v=sinks.v,
                long_q_heads=jnp.asarray(plan.long_query_heads),
                long_used_heads=jnp.asarray(plan.long_used.repeat(r, axis=1)),
                long_groups=jnp.asarray(plan.long_groups),
                is_long=jnp.asarray(plan.is_long_layer), long_slot=jnp.asarray(plan.long_slot))


def role_views(plan: RolePlan, geo: Geometry, sinks: Sinks, ret: Retrieved, M: int, single_doc: bool):
    """The views of every slot's role (`roles.Role.sees`): the local heads' over [sinks,
    tail, segment], and the long-range heads' over [retrieved, segment] stacked per kind of
    layer, [0] other layers (`long_elsewhere`), [1] long layers (`long`); a role that does
    not see the retrieved entries sees none of them."""
    def long_view(role):
        count = ret.count if RETRIEVED in role.sees else jnp.zeros_like(ret.count)
        return retrieval_view(geo, Retrieved(ret.k, ret.v, count, ret.doc), single_doc)

    views = jax.tree.map(lambda a, b: jnp.stack([a, b]), long_view(plan.long_elsewhere), long_view(plan.long))
    return tail_view(geo, sinks, M, single_doc, plan.local.sees), views


def layer_prefixes(plan: RolePlan, per: dict, ret: Retrieved, views: View):
    """This layer's tail prefix (detached unless the local role's tail carries gradient),
    retrieved prefix and long-range view."""
    keep = (lambda a: a) if plan.local.grad else jax.lax.stop_gradient
    pk = keep(tail_prefix(per["sink_k"], per["tail_k"]))
    pv = keep(tail_prefix(per["sink_v"], per["tail_v"]))
    rk = jax.lax.dynamic_index_in_dim(ret.k, per["long_slot"], keepdims=False)
    rv = jax.lax.dynamic_index_in_dim(ret.v, per["long_slot"], keepdims=False)
    return pk, pv, rk, rv, _per_layer_view(views, per["is_long"].astype(jnp.int32))


def rope_attention(cfg: Config, backend: str | None = None) -> Callable:
    """attend(RoPE(q), RoPE(k), v) with the positions and mask of a `View`."""
    inv_freq = model_frequencies(cfg.model)
    backend = backend or resolve_backend(cfg.attention.backend, cfg.model.dtype)

    def rotate_attend(q, k, v, view: View):
        return attend(apply_rope(q, view.q_pos, inv_freq), apply_rope(k, view.k_pos, inv_freq), v,
                      view.mask, backend)

    return rotate_attend


def query_window(w: int, end: Int[Array, "B"], doc: Int[Array, "B S"]) -> Bool[Array, "B S"]:
    """The retrieval query's tokens (SPEC §2): the `w` segment slots before `end` (the
    segment's end, a `refresh` chunk's start, the decoding position) that belong to the
    document of the last of them."""
    slot = jnp.arange(doc.shape[1])[None]
    last_doc = jnp.take_along_axis(doc, jnp.maximum(end - 1, 0)[:, None], axis=1)
    return (slot >= (end - w)[:, None]) & (slot < end[:, None]) & (doc == last_doc)


def retrieval_query(ql: Float[Array, "B T Hl D"], in_window: Bool[Array, "B T"], n_long: int):
    """Mean of the long-range heads' pre-RoPE queries over the window and each group's heads."""
    B, T, H_l, D = ql.shape
    work = jnp.promote_types(ql.dtype, jnp.float32)
    if H_l == 0:
        return jnp.zeros((B, 0, D), work)
    qg = ql.reshape(B, T, n_long, H_l // n_long, D).astype(work)
    w = in_window.astype(work)
    return numerics.einsum("bsgrd,bs->bgd", qg, w) / (w.sum(-1) * qg.shape[3])[:, None, None]


def refresh_chunks(cfg: Config) -> int:
    """Chunks per segment under `segment.retrieval.refresh` (1: one selection per segment)."""
    r = cfg.segment.retrieval.refresh
    return cfg.segment.len // r if r is not None and has_pool(cfg) else 1


def chunk_queries(cfg: Config, ql: Float[Array, "B S Hl D"], doc: Int[Array, "B S"], n_long: int):
    """The retrieval query before each chunk c >= 1 of a segment: the `query_window` tokens
    that end the previous chunk (of the document of its last token) -> [Q B Gl D]."""
    B, S, Hl, D = ql.shape
    Nc, w = refresh_chunks(cfg), min(cfg.segment.retrieval.query_window, S)
    r = S // Nc
    q_win = ql.reshape(B, Nc, r, Hl, D)[:, :-1, r - w:].reshape(B * (Nc - 1), w, Hl, D)
    d_win = doc.reshape(B, Nc, r)[:, :-1, r - w:].reshape(B * (Nc - 1), w)
    query = retrieval_query(q_win, query_window(w, jnp.full(d_win.shape[:1], w), d_win), n_long)
    return jnp.swapaxes(query.reshape(B, Nc - 1, n_long, D), 0, 1)


def chunk_prefixes(cfg: Config, per: dict, chunks: ChunkSource, rk, rv, ql, doc, n_long: int):
    """`refresh`: this layer's retrieved prefixes of every chunk [B Nc R Gl D] (chunk 0's is
    R_{i-1}) and the selections of chunks 1.. [Q B Gl R] (given when replaying a segment)."""
    pool_k = jax.lax.dynamic_index_in_dim(chunks.pool_k, per["long_slot"], keepdims=False)
    pool_v = jax.lax.dynamic_index_in_dim(chunks.pool_v, per["long_slot"], keepdims=False)
    index = per.get("chunk_index")
    if index is None:
        queries = chunk_queries(cfg, jax.lax.stop_gradient(ql), doc, n_long)
        index = retrieval.select_for_queries(cfg.segment.retrieval, pool_k, queries, chunks.candidate).index
    join = lambda first, pool: jnp.concatenate([first[:, None], retrieval.gather_for_queries(pool, index)], 1)
    return join(rk, pool_k), join(rv, pool_v), index


def segment_forward(
    model: Transformer,
    cfg: Config,
    tokens: Int[Array, "B S"],
    geo: Geometry,
    tail: Tail,
    sinks: Sinks,
    ret: Retrieved,
    single_doc: bool = False,
    into: tuple[Any, Callable, Callable] | None = None,
    chunks: ChunkSource | None = None,
    chunk_index: Int[Array, "L Q B Gl R"] | None = None,
    sink_offset: Int[Array, "B n"] | None = None,
):
    """Φ: one segment through every layer; returns the final hidden states and the new state.

    `LayerOut.head_k/v` hold the keys and values at the segment offsets `sink_offset`
    (`sink_slots`; default: the first n tokens).

    `into=(bufs, read, write)`: an inference cache (any pytree `bufs`, carried through the
    layers) that each layer reads its prefix from and writes what it leaves into, in place,
    so that no all-layer copy of it exists (stacked layer outputs, or the cache in another
    format: its 8-bit entries dequantized). `read(bufs, per)` gives this layer's `tail_k,
    tail_v, sink_k, sink_v` in the compute dtype (`per["layer"]` is its index);
    `write(bufs, per, new)` gets the layer's results, its keys `k` and values `v` [B S G D],
    long-range queries `ql` and `LayerOut`'s fields, and returns (bufs, the results to stack
    over layers). Then the result is (x, those results stacked, bufs).

    With `segment.retrieval.refresh`, `chunks` is the pool the chunks select from; a replay
    (the backward pass) passes the forward's selections as `chunk_index`."""
    plan: RolePlan = role_plan(cfg)
    S, M = tokens.shape[1], cfg.segment.tail
    n = cfg.segment.sinks
    window = min(cfg.segment.retrieval.query_window, S)
    rotate_attend = rope_attention(cfg)
    t_view, views = role_views(plan, geo, sinks, ret, M, single_doc)
    in_window = query_window(window, jnp.full(geo.doc.shape[:1], S), geo.doc)
    refresh = refresh_chunks(cfg) > 1
    if refresh and chunks is None:
        raise ValueError("segment.retrieval.refresh needs the pool of earlier segments (chunks=)")

    def layer_fn(block, carry, per):
        x, bufs = carry
        if into is not None:
            per = into[1](bufs, per)

        def mix(q, k, v):
            pk, pv, rk, rv, l_view = layer_prefixes(plan, per, ret, views)
            extra = {}
            if refresh:
                rk, rv, extra["chunk_index"] = chunk_prefixes(
                    cfg, per, chunks, rk, rv, long_queries(plan, q, per), geo.doc, max(plan.n_long, 1))
            o, ql, kl, vl = role_attention(plan, q, k, v, pk, pv, rk, rv, t_view, l_view, per, rotate_attend)
            head = (lambda a: a[:, :n]) if sink_offset is None else (
                lambda a: jnp.take_along_axis(a, sink_offset[:, :, None, None], axis=1))
            aux = dict(tail=tail_of(k, v, M, axis=1), head_k=head(k), head_v=head(v),
                       pool_k=kl, pool_v=vl, query=retrieval_query(ql, in_window, max(plan.n_long, 1)), **extra)
            if into is None:
                return o, (None, aux)
            return o, into[2](bufs, per, dict(aux, k=k, v=v, ql=ql))

        x, (bufs, out) = apply_layer(block, x, mix)
        return (x, bufs), out

    x = model.embed_tokens(tokens)
    per_layer = layer_inputs(plan, tail, sinks)
    if chunk_index is not None:
        per_layer["chunk_index"] = chunk_index
    bufs = None
    if into is not None:  # `read` gives each layer its prefix
        for name in ("tail_k", "tail_v", "sink_k", "sink_v"):
            per_layer.pop(name)
        per_layer["layer"] = jnp.arange(plan.n_layers)
        bufs = into[0]
    (x, bufs), out = scan_layers(model, (x, bufs), per_layer, layer_fn, remat_policy(cfg, cfg.segment.remat))
    if into is not None:
        return x, out, bufs
    return x, LayerOut(**out)


# --------------------------------------------------------------------------- the scan over segments


@pytree
@dataclass(frozen=True)
class Saved:
    """Per-segment inputs that the backward pass needs (stacked over segments by the scan)."""

    tail: Tail
    sinks: Sinks
    selection: retrieval.Selection
    chunk_index: Int[Array, "L Q B Gl R"] | None  # `refresh`: the chunks' selections


def tail_of(k: Array, v: Array, M: int, axis: int) -> Tail:
    """C_i: the last M keys and values of a full segment (its tokens on `axis`)."""
    last = lambda a: jax.lax.slice_in_dim(a, a.shape[axis] - M, a.shape[axis], axis=axis)
    return Tail(last(k), last(v))


def first_sinks(sinks: Sinks, first: Bool[Array, "B"], k: Array, v: Array) -> Sinks:
    """Inference (one document a row, from offset 0): rows in `first` just filled their first
    segment, whose first n keys and values [L B n G D] become the sinks."""
    pick = lambda new, old: jnp.where(first[None, :, None, None, None], new, old)
    return Sinks(pick(k, sinks.k), pick(v, sinks.v), jnp.where(first, 1, sinks.doc), jnp.where(first, 0, sinks.start))


def long_layers_of(cfg: Config, x: Array) -> Array:
    """The long layers' slice of a per-layer array (a dummy slot when there is no pool)."""
    if not has_pool(cfg):
        return x[:1] * 0
    return jnp.take(x, jnp.asarray(role_plan(cfg).long_layers, jnp.int32), axis=0)


def num_segments(T: int, S: int) -> int:
    return max(1, -(-T // S))


def pad_to_segments(x: Array, S: int, value=0) -> Array:
    T = x.shape[1]
    pad = num_segments(T, S) * S - T
    widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, widths, constant_values=value) if pad else x


def has_pool(cfg: Config) -> bool:
    return role_plan(cfg).retrieves and retrieval.retrieves(cfg.segment.retrieval)


def _long_dims(cfg: Config, capacity: int) -> tuple[int, int]:
    """(Ll, C): long layers and pool entries kept (1 dummy layer and none without a pool)."""
    return (max(len(role_plan(cfg).long_layers), 1), capacity) if has_pool(cfg) else (1, 0)


def empty_retrieved(cfg: Config, B: int, capacity: int, dtype, doc: Int[Array, "B"]) -> Retrieved:
    """R with no valid entry, shaped as a pool of `capacity` entries gives it (R = 0 when
    nothing is retrieved)."""
    Ll, C = _long_dims(cfg, capacity)
    R = retrieval.width(cfg.segment.retrieval, C) if C else 0
    z = jnp.zeros((Ll, B, R, role_plan(cfg).n_long, cfg.model.dim_head), dtype)
    return Retrieved(z, z, jnp.zeros((B,), jnp.int32), doc)


def initial_state(cfg: Config, B: int, capacity: int, dtype):
    """Before the first segment: (tail, sinks, pool (k, v), retrieval query), all empty."""
    plan = role_plan(cfg)
    L, G, D = plan.n_layers, plan.n_groups, cfg.model.dim_head
    M, n, Gl = cfg.segment.tail, cfg.segment.sinks, plan.n_long
    Ll, C = _long_dims(cfg, capacity)
    tail = Tail(jnp.zeros((L, B, M, G, D), dtype), jnp.zeros((L, B, M, G, D), dtype))
    sinks = Sinks(jnp.zeros((L, B, n, G, D), dtype), jnp.zeros((L, B, n, G, D), dtype),
                  jnp.full((B,), -1, jnp.int32), jnp.zeros((B,), jnp.int32))
    pool = (jnp.zeros((Ll, B, C, Gl, D), dtype), jnp.zeros((Ll, B, C, Gl, D), dtype))
    query = jnp.zeros((Ll, B, Gl, D), jnp.promote_types(dtype, jnp.float32))
    return tail, sinks, pool, query


def _candidates(capacity: int, start: Int[Array, "B"], doc: Int[Array, "B T"]):
    """Pool entries that a segment starting at `start` may retrieve: earlier tokens of the
    document of the token before it. Returns (candidate [B C], that document [B])."""
    prev = jnp.maximum(start - 1, 0)
    prev_doc = jnp.where(start > 0, jnp.take_along_axis(doc, prev[:, None], axis=1)[:, 0], -1)
    return (jnp.arange(capacity)[None] < start[:, None]) & (doc[:, :capacity] == prev_doc[:, None]), prev_doc


def chunk_source(cfg: Config, pool, geo_start, doc) -> ChunkSource | None:
    """The pool a segment's `refresh` chunks select from (None without refresh)."""
    if refresh_chunks(cfg) == 1:
        return None
    start = jnp.broadcast_to(geo_start, (doc.shape[0],))
    return ChunkSource(pool[0], pool[1], _candidates(pool[0].shape[2], start, doc)[0])


def retrieve(cfg: Config, pool, query, selection_or_none, geo_start, doc, B: int):
    """Select (or re-gather a saved selection) from the pool before a segment that starts
    at `geo_start` (a scalar, or one start per row)."""
    pool_k, pool_v = pool
    start = jnp.broadcast_to(geo_start, (B,))
    candidate, prev_doc = _candidates(pool_k.shape[2], start, doc)
    if not has_pool(cfg):
        ret = empty_retrieved(cfg, B, 0, pool_k.dtype, prev_doc)
        return ret, retrieval.Selection(jnp.zeros(ret.k.shape[:2] + ret.k.shape[3:4] + (0,), jnp.int32), ret.count)
    sel = selection_or_none
    if sel is None:
        sel = retrieval.select(cfg.segment.retrieval, pool_k, query, candidate)
    ret = Retrieved(retrieval.gather(pool_k, sel), retrieval.gather(pool_v, sel), sel.count, prev_doc)
    return ret, sel


def sink_slots(S: int, n: int, start: Int[Array, ""], doc: Int[Array, "B T"], doc_start: Int[Array, "B T"]):
    """Which sinks a segment writes: the first n tokens of the document of its last token
    (the only document that can go on into the next segment), wherever that document began.

    Returns that document [B], its start [B], which of its n first tokens lie in this
    segment [B n] (a document that begins near the end of a segment has the rest of its
    sinks in the next one, written there) and their offsets in the segment [B n]."""
    last = start + S - 1
    last_doc, last_start = doc[:, last], doc_start[:, last]
    idx = last_start[:, None] + jnp.arange(n, dtype=jnp.int32)
    here = (idx >= start) & (idx < start + S)
    return last_doc, last_start, here, jnp.clip(idx - start, 0, S - 1)


def next_sinks(sinks: Sinks, out: LayerOut, last_doc, last_start, here) -> Sinks:
    """The sinks after a segment (`sink_slots`), stop-gradient. A sink slot is written by
    the segment that holds its token, and is read only by segments that begin more than M
    tokens after it, all later ones: slots not yet written are never read."""
    write = here[None, :, :, None, None]  # [1 B n 1 1]
    keep = lambda new, old: jax.lax.stop_gradient(jnp.where(write, new, old))
    return Sinks(keep(out.head_k, sinks.k), keep(out.head_v, sinks.v), last_doc, last_start)


def scan_segments(
    model: Transformer,
    cfg: Config,
    tokens: Int[Array, "B T"],
    doc: Int[Array, "B T"],
    emit: Callable[[Float[Array, "B S d"], int], Array],
    save: bool = False,
    single_doc: bool = False,
):
    """The forward scan. `emit(hidden, segment_index)` makes each segment's output.

    Returns (stacked emits [N ...], saved-for-backward or None, final pool). Tokens and
    document ids must already be padded to a multiple of S (`pad_to_segments`).

    Gradient (SPEC §3): only the tail chain carries it from segment to segment; the pool,
    the sinks and the retrieval query are stop-gradient here, so that differentiating
    anything computed from this scan (`forward`'s logits) gives the `chain` gradient of L_K.

    Any document layout is computed exactly (positions and sinks follow each document's
    own start), not only rows packed by the segment rule.
    """
    S, M, n = cfg.segment.len, cfg.segment.tail, cfg.segment.sinks
    B, T = tokens.shape
    N = T // S
    doc_start = document_starts(doc)
    tail, sinks, pool, query = initial_state(cfg, B, T, model.dtype)

    def step(carry, s):
        tail, sinks, pool, query = carry
        geo = geometry(S, M, s, doc, doc_start)
        ret, sel = retrieve(cfg, pool, query, None, geo.start, doc, B)
        seg_tokens = jax.lax.dynamic_slice_in_dim(tokens, geo.start, S, axis=1)
        last_doc, last_start, here, sink_offset = sink_slots(S, n, geo.start, doc, doc_start)
        x, out = segment_forward(model, cfg, seg_tokens, geo, tail, sinks, ret, single_doc,
                                 chunks=chunk_source(cfg, pool, geo.start, doc), sink_offset=sink_offset)
        y = emit(x, s)
        saved = Saved(tail, sinks, sel, out.chunk_index) if save else None
        if has_pool(cfg):
            new = (long_layers_of(cfg, out.pool_k), long_layers_of(cfg, out.pool_v))  # [Ll B S Gl D]
            pool = tuple(jax.lax.dynamic_update_slice_in_dim(p, jax.lax.stop_gradient(e), geo.start, axis=2)
                         for p, e in zip(pool, new))
            query = jax.lax.stop_gradient(long_layers_of(cfg, out.query))
        sinks = next_sinks(sinks, out, last_doc, last_start, here)
        return (out.tail, sinks, pool, query), (y, saved)

    (_, _, pool, _), (ys, saved) = jax.lax.scan(step, (tail, sinks, pool, query), jnp.arange(N))
    return ys, saved, pool
