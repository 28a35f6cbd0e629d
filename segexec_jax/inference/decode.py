"""Inference engines: an explicit cache pytree, prefill, and one-token decode steps (SPEC §4).

Segmented mode is segment-synchronous: a token at offset j of segment i sees exactly what
training showed it. The cache holds, per layer, the tail C_{i-1} and sinks (every group),
the current segment's keys and values so far, the retrieved prefix R_{i-1} of the long
layers, and the pool. When a segment fills, its last M keys/values become the tail, its
long-range keys/values join the pool, and R_i is selected for the next segment. The
prompt is prefilled segment by segment with the training forward's own segment function
(`segment_forward`), so both see the same computation.

Full mode keeps an ordinary KV cache (keys rotated at their absolute positions).

Prompts in a batch may have different lengths: each row starts at offset 0 of segment 1
and moves on at its own pace; per-row state changes are selected with `where`.

Keys and values are kept in `inference.kv_dtype` (null: the compute dtype). With an 8-bit
type (`int8`, `float8_e4m3fn`) every entry of every KV head is stored as `Quantized`: its D
values over one float32 scale, max|x| / qmax. They are quantized where they are written and
dequantized where attention or retrieval reads them (a fused kernel is another matter), so
the memory kept between tokens is the 8-bit arrays and their scales. Moving stored entries
(tail, sinks, pool) copies the 8-bit values and their scales as they are.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, Shaped

from ..config import Config
from ..model import decode_attention as kernels
from ..model.attention import AttentionMask, attend
from ..model.rope import apply_rope, model_frequencies
from ..model.transformer import Transformer, apply_layer, scan_layers
from ..segment import retrieval
from ..segment.forward import full_hidden
from ..segment.operator import (
    Geometry,
    Retrieved,
    Sinks,
    Tail,
    View,
    chunk_source,
    document_starts,
    empty_retrieved,
    first_sinks,
    geometry,
    has_pool,
    initial_state,
    layer_inputs,
    layer_prefixes,
    long_layers_of,
    long_queries,
    query_window,
    refresh_chunks,
    retrieval_query,
    retrieve,
    role_attention,
    role_views,
    rope_attention,
    segment_forward,
    tail_of,
)
from ..segment.roles import role_plan

pytree = jax.tree_util.register_dataclass
DECODE_BACKEND = "xla"  # one query per row: a plain masked einsum is the right kernel
QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0}  # the largest magnitude each 8-bit type holds


@pytree
@dataclasses.dataclass(frozen=True)
class Quantized:
    """Keys or values in 8 bits, one scale per entry and KV head: x ~ data * scale."""

    data: Shaped[Array, "*entries D"]  # int8 or float8_e4m3fn
    scale: Float[Array, "*entries 1"]  # float32, max|x| / qmax over D

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape


def store_kv(x: Array, kv_dtype: str | None) -> Array | Quantized:
    """Keys or values as the cache keeps them (`inference.kv_dtype`; None: as they are)."""
    if kv_dtype is None:
        return x
    if kv_dtype not in QMAX:
        return x.astype(kv_dtype)
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1, keepdims=True) / QMAX[kv_dtype]
    y = x32 / jnp.where(scale > 0, scale, 1.0)
    data = jnp.round(y).astype(jnp.int8) if kv_dtype == "int8" else y.astype(jnp.float8_e4m3fn)
    return Quantized(data, scale)


def empty_kv(x: Array, kv_dtype: str | None) -> Array | Quantized:
    """`store_kv` of zeros, built as zeros (no quantization for XLA to fold)."""
    if kv_dtype not in QMAX:
        return store_kv(x, kv_dtype)
    return Quantized(jnp.zeros(x.shape, kv_dtype), jnp.zeros(x.shape[:-1] + (1,), jnp.float32))


def load_kv(x: Array | Quantized, dtype) -> Array:
    """Stored keys or values in the compute dtype, for attention or retrieval to read."""
    if isinstance(x, Quantized):
        return (x.data.astype(jnp.float32) * x.scale).astype(dtype)
    return x.astype(dtype)


def _like(x: Array, buf: Array | Quantized) -> Array | Quantized:
    """New entries x stored as `buf` stores its own."""
    return store_kv(x, str(buf.data.dtype)) if isinstance(buf, Quantized) else x.astype(buf.dtype)


def _on_stored(f, *xs):
    """An op that only moves entries (a slice, a gather on the entry, layer or head axes),
    on stored keys or values: on the 8-bit data and on the scales alike."""
    if not isinstance(xs[0], Quantized):
        return f(*xs)
    return jax.tree.map(Quantized, f(*(x.data for x in xs)), f(*(x.scale for x in xs)))


def _kv(f, part):
    """f on the keys and values of a cache part (Tail, Sinks, Retrieved, Pool)."""
    return dataclasses.replace(part, k=f(part.k), v=f(part.v))


def _stored(cfg: Config, part, store=store_kv):
    return _kv(lambda x: store(x, cfg.inference.kv_dtype), part)


def _loaded(part, dtype):
    return _kv(lambda x: load_kv(x, dtype), part)


@pytree
@dataclasses.dataclass(frozen=True)
class SegmentedCache:
    length: Int[Array, "B"]  # tokens consumed so far (the next token's position)
    tail: Tail  # C_{i-1} [L B M G D]
    sinks: Sinks  # [L B n G D]
    seg_k: Float[Array, "L B S G D"] | Quantized  # the current segment so far (pre-RoPE)
    seg_v: Float[Array, "L B S G D"] | Quantized
    seg_q: Float[Array, "Ll B S Hl D"]  # long-range heads' pre-RoPE queries (the retrieval query)
    ret: Retrieved  # R_{i-1} for the current segment (with `refresh`: for the current chunk)


@pytree
@dataclasses.dataclass(frozen=True)
class Pool:
    """Pre-RoPE keys and values of every filled segment's long-range heads (long layers).

    Kept apart from the cache: only a segment fill reads or writes it, so it can live in
    host memory while decoding (`inference.pool_on_host`)."""

    k: Float[Array, "Ll B C Gl D"] | Quantized
    v: Float[Array, "Ll B C Gl D"] | Quantized


@pytree
@dataclasses.dataclass(frozen=True)
class FullCache:
    length: Int[Array, "B"]
    k: Float[Array, "L B C G D"] | Quantized  # rotated at absolute positions
    v: Float[Array, "L B C G D"] | Quantized


def _where_rows(mask: Array, new, old):
    """Per-row select. Cache leaves carry the batch on axis 1 ([layer, batch, ...]), except
    per-row scalars ([batch])."""
    def pick(a, b):
        shape = [1] * a.ndim
        shape[0 if a.ndim == 1 else 1] = mask.shape[0]
        return jnp.where(mask.reshape(shape), a, b)

    return jax.tree.map(pick, new, old)


def _pool_entries(cfg: Config, seg: Array) -> Array:
    """Long-range groups of the long layers from a full segment [L B S G D] -> [Ll B S Gl D]."""
    plan = role_plan(cfg)
    if not has_pool(cfg):
        L, B, S, G, D = seg.shape
        return jnp.zeros((1, B, S, plan.n_long, D), seg.dtype)
    groups = jnp.asarray(plan.long_groups[list(plan.long_layers)])  # [Ll Gl]
    seg = long_layers_of(cfg, seg)
    return jnp.take_along_axis(seg, groups[:, None, None, :, None], axis=3)


def _write_rows(buf: Array, entries: Array, starts: Array, rows: Array, axis: int) -> Array:
    """buf[:, b, starts[b]:starts[b]+n] = entries[:, b] where rows[b] (batch axis 1)."""
    def one(buf_b, new_b, start, keep):
        old = jax.lax.dynamic_slice_in_dim(buf_b, start, new_b.shape[axis - 1], axis=axis - 1)
        return jax.lax.dynamic_update_slice_in_dim(buf_b, jnp.where(keep, new_b, old), start, axis=axis - 1)

    return jax.vmap(one, in_axes=(1, 1, 0, 0), out_axes=1)(buf, entries, starts, rows)


# --------------------------------------------------------------------------- segmented: prefill


def empty_cache(cfg: Config, B: int, capacity: int, dtype) -> tuple[SegmentedCache, Pool]:
    plan = role_plan(cfg)
    L, G, D, S = plan.n_layers, plan.n_groups, cfg.model.dim_head, cfg.segment.len
    tail, sinks, (pool_k, pool_v), _ = initial_state(cfg, B, capacity, dtype)
    Ll, Hl = pool_k.shape[0], plan.n_long * plan.group_size
    ret = empty_retrieved(cfg, B, capacity, dtype, jnp.full((B,), -1, jnp.int32))
    seg = empty_kv(jnp.zeros((L, B, S, G, D), dtype), cfg.inference.kv_dtype)
    cache = SegmentedCache(jnp.zeros((B,), jnp.int32), _stored(cfg, tail, empty_kv), _stored(cfg, sinks, empty_kv),
                           seg, seg, jnp.zeros((Ll, B, S, Hl, D), dtype), _stored(cfg, ret, empty_kv))
    return cache, _stored(cfg, Pool(pool_k, pool_v), empty_kv)


def prefill_segmented(model: Transformer, cfg: Config, tokens: Int[Array, "B T"], lengths: Int[Array, "B"],
                      capacity: int):
    """Run the prompts (right-padded to T, a multiple of S) through the segment operator.

    Returns the cache and pool after each row's last prompt token, and the logits there [B V]."""
    S, M = cfg.segment.len, cfg.segment.tail
    B, T = tokens.shape
    N = T // S
    dtype = model.dtype
    cache, pool = empty_cache(cfg, B, capacity, dtype)
    query = initial_state(cfg, B, capacity, dtype)[3]
    doc = (jnp.arange(capacity)[None] < lengths[:, None]).astype(jnp.int32)  # one document + padding
    doc_start = document_starts(doc)
    V = cfg.model.vocab_size

    refresh = refresh_chunks(cfg) > 1

    def step(carry, s):
        cache, pool, query, logits = carry  # keys and values as stored (`inference.kv_dtype`)
        full_pool = _loaded(pool, dtype) if refresh else None  # the chunks read the whole pool
        geo = geometry(S, M, s, doc, doc_start)
        ret = _retrieve_stored(cfg, pool, query, geo.start, doc, B, dtype)
        seg_tokens = jax.lax.dynamic_slice_in_dim(tokens, geo.start, S, axis=1)
        complete = (s + 1) * S <= lengths
        current = (s * S <= lengths) & (lengths < (s + 1) * S)
        bufs = dict(seg_k=cache.seg_k, seg_v=cache.seg_v, seg_q=cache.seg_q, tail=cache.tail, pool=pool)
        x, out, bufs = segment_forward(model, cfg, seg_tokens, geo, cache.tail, cache.sinks, ret, single_doc=True,
                                       into=(bufs, _prefix_reader(cache.sinks, dtype),
                                             _layer_writer(cfg, geo.start, current, complete)),
                                       chunks=chunk_source(cfg, (full_pool.k, full_pool.v), geo.start, doc)
                                       if refresh else None)
        pool = bufs["pool"]
        if "chunk_index" in out:  # refresh: keep R of the chunk that holds the last prompt token
            chunk = jnp.maximum(lengths - 1 - s * S, 0) // (S // refresh_chunks(cfg))
            ret = _chunk_retrieved(cfg, full_pool, ret, long_layers_of(cfg, out["chunk_index"]), chunk)
        first = complete & (s == 0)
        new_sinks = first_sinks(_loaded(cache.sinks, dtype), first, out["head_k"], out["head_v"])
        sinks = _where_rows(first, _stored(cfg, new_sinks), cache.sinks)
        cache = SegmentedCache(  # the tail, segment buffers and pool: written in place, layer by layer
            cache.length, bufs["tail"], sinks, bufs["seg_k"], bufs["seg_v"], bufs["seg_q"],
            _where_rows(current, _stored(cfg, ret), cache.ret) if has_pool(cfg) else cache.ret)
        query = _where_rows(complete, long_layers_of(cfg, out["query"]), query)
        last = lengths - 1
        here = (last // S) == s
        x_last = jnp.take_along_axis(x, jnp.clip(last - s * S, 0, S - 1)[:, None, None], axis=1)
        logits = jnp.where(here[:, None], model.logits(x_last)[:, 0], logits)
        return (cache, pool, query, logits), None

    logits0 = jnp.zeros((B, V), jnp.promote_types(dtype, jnp.float32))
    (cache, pool, query, logits), _ = jax.lax.scan(step, (cache, pool, query, logits0), jnp.arange(N))
    if has_pool(cfg):  # rows whose prompt ends on a segment boundary: select R for the next one
        boundary = lengths % S == 0
        ret = _retrieve_stored(cfg, pool, query, lengths, doc, B, dtype)
        cache = dataclasses.replace(cache, ret=_where_rows(boundary, _stored(cfg, ret), cache.ret))
    return dataclasses.replace(cache, length=lengths.astype(jnp.int32)), pool, logits


def _prefix_reader(sinks: Sinks, dtype):
    """`segment_forward`'s `read` for the prefill: a layer's tail, from the cache that the
    layers write in place (read before the layer writes its own), and its sinks, dequantized."""
    def read(bufs, per):
        at = lambda x: load_kv(_on_stored(lambda a: jax.lax.dynamic_index_in_dim(a, per["layer"], keepdims=False), x),
                               dtype)
        tail = bufs["tail"]
        return dict(per, tail_k=at(tail.k), tail_v=at(tail.v), sink_k=at(sinks.k), sink_v=at(sinks.v))

    return read


def _put(buf, new: Array, index, rows: Bool[Array, "B"], start=0):
    """buf[index, b, start:start+n] = new[b] where rows[b], in place: one layer's entries
    [B n ...] into a stored [L B C ...] buffer (8-bit ones quantized here, one layer at a time)."""
    def put(b, n):
        at = tuple(jnp.asarray(i, jnp.int32) for i in (index, 0, start) + (0,) * (b.ndim - 3))  # one index dtype under x64
        old = jax.lax.dynamic_slice(b, at, (1,) + n.shape)
        keep = rows.reshape((1, -1) + (1,) * (n.ndim - 1))
        return jax.lax.dynamic_update_slice(b, jnp.where(keep, n[None], old), at)

    return jax.tree.map(put, buf, _like(new, buf))


def _layer_writer(cfg: Config, start, current: Bool[Array, "B"], complete: Bool[Array, "B"]):
    """`segment_forward`'s `write` for the prefill of the segment at `start`: each layer stores
    its own keys and values (rows in the segment: `current`), its tail (rows that filled it:
    `complete`) and, in the long layers, its pool entries (`complete`) and retrieval queries
    (`current`); the sinks and retrieval query are small, and stacked over layers."""
    pooled = has_pool(cfg)

    def write(bufs, per, new):
        layer = per["layer"]
        tail, pool = bufs["tail"], bufs["pool"]
        bufs = dict(bufs, seg_k=_put(bufs["seg_k"], new["k"], layer, current),
                    seg_v=_put(bufs["seg_v"], new["v"], layer, current),
                    tail=Tail(_put(tail.k, new["tail"].k, layer, complete), _put(tail.v, new["tail"].v, layer, complete)))
        if pooled:  # the long layers only (the [Ll ...] buffers' slot `long_slot`)
            slot, long = per["long_slot"], per["is_long"]
            bufs.update(seg_q=_put(bufs["seg_q"], new["ql"], slot, current & long),
                        pool=Pool(_put(pool.k, new["pool_k"], slot, complete & long, start),
                                  _put(pool.v, new["pool_v"], slot, complete & long, start)))
        return bufs, {name: new[name] for name in ("head_k", "head_v", "query", "chunk_index") if name in new}

    return write


def _retrieve_stored(cfg: Config, pool: Pool, query: Float[Array, "Ll B Gl D"], start, doc, B: int,
                     dtype) -> Retrieved:
    """`retrieve` from the stored pool one long layer at a time: only one layer's pool is ever
    dequantized, and scored in float32 (the whole pool's would be several times the pool)."""
    if not has_pool(cfg):
        full = _loaded(pool, dtype)
        return retrieve(cfg, (full.k, full.v), query, None, start, doc, B)[0]

    def one(part):
        k, v, q = jax.tree.map(lambda a: a[None], part)  # one layer, its axis kept
        ret = retrieve(cfg, (load_kv(k, dtype), load_kv(v, dtype)), q, None, start, doc, B)[0]
        return ret.k[0], ret.v[0], ret.count, ret.doc

    k, v, count, prev_doc = jax.lax.map(one, (pool.k, pool.v, query))
    return Retrieved(k, v, count[0], prev_doc[0])


def _chunk_retrieved(cfg: Config, pool: Pool, ret: Retrieved, chunk_index: Int[Array, "Ll Q B Gl R"],
                     chunk: Int[Array, "B"]) -> Retrieved:
    """The retrieved prefix of chunk `chunk` of every row (chunk 0: `ret`, R_{i-1})."""
    pick = jnp.clip(chunk - 1, 0, chunk_index.shape[1] - 1)[None, None, :, None, None]
    index = jnp.take_along_axis(chunk_index, pick, axis=1)[:, 0]  # [Ll B Gl R]
    sel = retrieval.Selection(index, ret.count)
    later = Retrieved(retrieval.gather(pool.k, sel), retrieval.gather(pool.v, sel), ret.count, ret.doc)
    return _where_rows(chunk > 0, later, ret)


# --------------------------------------------------------------------------- segmented: decode


def _decode_geometry(cfg: Config, length: Int[Array, "B"]) -> tuple[Geometry, Array]:
    """The current segment of every row as training sees it: slots 0..j hold the row's tokens."""
    S, M = cfg.segment.len, cfg.segment.tail
    B = length.shape[0]
    j = length % S
    s = length // S
    slot = jnp.arange(S, dtype=jnp.int32)
    doc = (slot[None] <= j[:, None]).astype(jnp.int32)
    geo = Geometry(start=s * S, doc=doc, offset=jnp.broadcast_to(slot, (B, S)), first_doc=jnp.ones((B,), jnp.int32),
                   continuing=s >= 1, tail_doc=jnp.broadcast_to(jnp.where(s >= 1, 1, -1)[:, None], (B, M)))
    return geo, j


def _at_query(view: View, j: Array) -> View:
    """Restrict a segment view to the single query in slot j of each row."""
    q_pos = jnp.take_along_axis(view.q_pos, j[..., None], axis=-1)
    mask = AttentionMask(jnp.ones_like(q_pos), j[..., None], view.mask.k_doc, view.mask.k_time)
    return View(q_pos, view.k_pos, mask)


def fill_segmented(cfg: Config, cache: SegmentedCache, pool: Pool, filled: Array):
    """Rows whose segment just filled (their length is a multiple of S): the tail, the sinks,
    the pool and R for the next segment."""
    S, M, n = cfg.segment.len, cfg.segment.tail, cfg.segment.sinks
    B = filled.shape[0]
    s = (cache.length - 1) // S  # the segment that filled
    tail = _where_rows(filled, _on_stored(lambda k, v: tail_of(k, v, M, axis=2), cache.seg_k, cache.seg_v),
                       cache.tail)
    first = filled & (s == 0)
    head = lambda x: _on_stored(lambda a: a[:, :, :n], x)
    sinks = _first_sinks(cache.sinks, first, head(cache.seg_k), head(cache.seg_v))
    cache = dataclasses.replace(cache, tail=tail, sinks=sinks)
    if not has_pool(cfg):
        return cache, pool
    entries = lambda x: _on_stored(lambda a: _pool_entries(cfg, a), x)
    write = lambda buf, x: jax.tree.map(lambda b, e: _write_rows(b, e, s * S, filled, axis=2), buf, entries(x))
    pool = Pool(write(pool.k, cache.seg_k), write(pool.v, cache.seg_v))
    ret = _select_before(cfg, cache.seg_q, pool, jnp.full((B,), S, jnp.int32), (s + 1) * S)
    return dataclasses.replace(cache, ret=_where_rows(filled, _stored(cfg, ret), cache.ret)), pool


def _first_sinks(sinks: Sinks, first: Array, k, v) -> Sinks:
    """`first_sinks` on stored keys and values (the 8-bit data and the scales alike)."""
    if not isinstance(k, Quantized):
        return first_sinks(sinks, first, k, v)
    part = lambda f: first_sinks(dataclasses.replace(sinks, k=f(sinks.k), v=f(sinks.v)), first, f(k), f(v))
    data, scale = part(lambda x: x.data), part(lambda x: x.scale)
    return dataclasses.replace(data, k=Quantized(data.k, scale.k), v=Quantized(data.v, scale.v))


def _select_before(cfg: Config, seg_q: Array, pool: Pool, end: Int[Array, "B"], start: Int[Array, "B"]) -> Retrieved:
    """R selected with the query of the `query_window` segment slots before `end`, among the
    pool entries before `start` (the training rule: `retrieval_query`)."""
    S = cfg.segment.len
    B = end.shape[0]
    in_window = query_window(min(cfg.segment.retrieval.query_window, S), end, jnp.ones((B, S), jnp.int32))
    query = jax.vmap(lambda q: retrieval_query(q, in_window, role_plan(cfg).n_long))(seg_q)
    pool = _loaded(pool, seg_q.dtype)  # seg_q is kept in the compute dtype
    doc = jnp.ones((B, pool.k.shape[2]), jnp.int32)
    return retrieve(cfg, (pool.k, pool.v), query, None, start, doc, B)[0]


def refresh_segmented(cfg: Config, cache: SegmentedCache, pool: Pool, due: Array):
    """`refresh`: rows whose next token starts a chunk inside its segment select again,
    with the query of the `query_window` tokens before it (the training rule, `chunk_queries`)."""
    j = cache.length % cfg.segment.len
    ret = _select_before(cfg, cache.seg_q, pool, j, cache.length - j)
    return dataclasses.replace(cache, ret=_where_rows(due, _stored(cfg, ret), cache.ret)), pool


def decode_kernel(cfg: Config) -> str:
    """`inference.decode_kernel` made concrete: "pallas" or "xla"."""
    m = cfg.model
    return kernels.resolve(cfg.inference.decode_kernel, m.n_heads, m.n_kv_heads, m.dim_head, m.dtype)


def _part(k, v, layer, head_class, span) -> kernels.Part:
    """A cache buffer (every layer; 8-bit data and scales as stored) as the kernel reads it."""
    lo, hi, pos0 = span
    if isinstance(k, Quantized):
        return kernels.Part(k.data, v.data, k.scale, v.scale, layer, head_class, lo, hi, pos0)
    return kernels.Part(k, v, None, None, layer, head_class, lo, hi, pos0)


def _span(visible: Array, k_pos: Array):
    """(lo, hi, pos0) of one part's slots in a view at one query: its visible entries are one
    run [lo, hi) at positions pos0 + slot (decoding holds one document a row, so every view's
    prefix part and segment is such a run)."""
    count = visible.sum(-1, dtype=jnp.int32)
    lo = jnp.argmax(visible, axis=-1).astype(jnp.int32)
    pos0 = jnp.take_along_axis(k_pos, lo[..., None], axis=-1)[..., 0] - lo
    return lo, lo + count, pos0


def _spans(view: View, bounds: dict[str, tuple[int, int]]) -> dict:
    """`_span` of every part of a query's view; a part given as (end, start) is stored reversed
    in the view (the sinks, `tail_prefix`)."""
    visible, k_pos = view.mask.dense()[:, 0, 0, :], view.k_pos
    out = {}
    for name, (a, b) in bounds.items():
        part = (lambda x: x[..., a:b]) if a <= b else (lambda x: x[..., b:a][..., ::-1])
        out[name] = _span(part(visible), part(k_pos))
    return out


def _by_class(*spans):
    """Spans of the head classes (0: local heads, 1: long-range heads) -> (lo, hi, pos0) [B NC]."""
    return tuple(jnp.stack(xs, axis=-1) for xs in zip(*spans))


def _kernel_attention(cfg: Config, plan, q, cache: SegmentedCache, seg_k, seg_v, per: dict, layer,
                      t_spans: dict, l_spans: dict, t_view: View, l_view: View) -> Array:
    """A segmented decode step's attention by the decode kernels: the sinks, tail, retrieved
    and segment parts as stored (nothing rotated, dequantized, gathered or concatenated),
    merged by their log-sum-exp. q [B 1 H D] pre-RoPE -> [B 1 H D]."""
    B, _, H, D = q.shape
    G, r = plan.n_groups, plan.group_size
    inv_freq = model_frequencies(cfg.model)
    f32 = jnp.float32
    none = tuple(jnp.zeros((B,), jnp.int32) for _ in range(3))
    if plan.n_long:  # class 1: the long-range groups of this layer (their own view and positions)
        used = per["long_used_heads"][::r]
        head_class = jnp.zeros((G,), jnp.int32).at[jnp.where(used, per["long_groups"], G)].set(1, mode="drop")
        by_class = lambda local, long: _by_class(local, long)
    else:
        head_class = jnp.zeros((G,), jnp.int32)
        by_class = lambda local, long: _by_class(local)
    q_class = jnp.repeat(head_class, r)[None, None, :, None]
    qr = apply_rope(q.astype(f32), t_view.q_pos, inv_freq)
    if plan.n_long:
        qr = jnp.where(q_class == 1, apply_rope(q.astype(f32), l_view.q_pos, inv_freq), qr)
    qr = qr.reshape(B, G, r, D)
    parts = [_part(seg_k, seg_v, layer, head_class, by_class(t_spans["segment"], l_spans["segment"])),
             _part(cache.tail.k, cache.tail.v, layer, head_class, by_class(t_spans["tail"], none))]
    if cfg.segment.sinks:
        parts.append(_part(cache.sinks.k, cache.sinks.v, layer, head_class, by_class(t_spans["sinks"], none)))
    # every window position (prefix P + offset j) is below sinks + tail + retrieved + segment
    table = kernels.rope_table(inv_freq, cfg.segment.sinks + cfg.segment.tail + cache.ret.k.shape[2] + cfg.segment.len)
    results = [kernels.part_attention(qr, part, inv_freq, rope_table=table) for part in parts]
    if plan.n_long and cache.ret.k.shape[2]:  # the retrieved prefix: the long-range groups only
        groups = jnp.where(used, per["long_groups"], G)
        ql = jnp.take(qr, jnp.minimum(groups, G - 1), axis=1)  # [B Gl r D]
        ret = _part(cache.ret.k, cache.ret.v, per["long_slot"], jnp.zeros((plan.n_long,), jnp.int32),
                    _by_class(l_spans["retrieved"]))
        results.append(kernels.scatter_groups(kernels.part_attention(ql, ret, inv_freq, rope_table=table), groups, G))
    return kernels.combine(results).reshape(B, 1, H, D).astype(q.dtype)


def decode_segmented(model: Transformer, cfg: Config, cache: SegmentedCache, token: Int[Array, "B"]):
    """Consume one token per row; returns the new cache and the logits for the next token.
    Rows whose segment this completes need `fill_segmented` before their next token."""
    plan = role_plan(cfg)
    B = token.shape[0]
    rotate_attend = rope_attention(cfg, DECODE_BACKEND)
    dtype = model.dtype
    use_kernel = decode_kernel(cfg) == "pallas"
    ret = cache.ret if use_kernel else _loaded(cache.ret, dtype)  # the kernels read it as stored
    geo, j = _decode_geometry(cfg, cache.length)
    t_view, views = role_views(plan, geo, cache.sinks, ret, cfg.segment.tail, False)
    t_view = _at_query(t_view, j)
    views = jax.vmap(_at_query, in_axes=(0, None))(views, j)
    rows = jnp.arange(B)
    per_layer = layer_inputs(plan, cache.tail, cache.sinks)
    per_layer["layer"] = jnp.arange(plan.n_layers)
    if use_kernel:  # the kernels read the tail and sinks of every layer in place (no per-layer slices)
        n, M, R = cfg.segment.sinks, cfg.segment.tail, ret.k.shape[2]
        for name in ("tail_k", "tail_v", "sink_k", "sink_v"):
            per_layer.pop(name)
        S = cfg.segment.len
        t_spans = _spans(t_view, dict(tail=(n, n + M), segment=(n + M, n + M + S), **({"sinks": (n, 0)} if n else {})))
        long_spans = jax.vmap(lambda view: _spans(view, dict(retrieved=(0, R), segment=(R, R + S))))(views)

    def layer_fn(block, carry, per):
        x, seg_k, seg_v = carry
        layer = per["layer"]

        def mix(q, k, v):
            # the new token goes straight into the stacked buffers (in place: one slot per row);
            # the layer's slice is only read (stored keys and values: dequantized per layer)
            all_k, all_v = (jax.tree.map(lambda b, n: b.at[layer, rows, j].set(n), buf, _like(new[:, 0], buf))
                            for buf, new in ((seg_k, k), (seg_v, v)))
            if use_kernel:
                pick = per["is_long"].astype(jnp.int32)
                l_view, l_spans = jax.tree.map(lambda a: a[pick], (views, long_spans))
                o = _kernel_attention(cfg, plan, q, cache, all_k, all_v, per, layer, t_spans, l_spans, t_view, l_view)
                return o, (all_k, all_v, long_queries(plan, q, per)[:, 0])
            sk, sv = (load_kv(jax.tree.map(lambda b: jax.lax.dynamic_index_in_dim(b, layer, keepdims=False), buf),
                              dtype) for buf in (all_k, all_v))
            here = dict(per, **{name: load_kv(per[name], dtype) for name in ("tail_k", "tail_v", "sink_k", "sink_v")})
            pk, pv, rk, rv, l_view = layer_prefixes(plan, here, ret, views)
            o, ql, _, _ = role_attention(plan, q, sk, sv, pk, pv, rk, rv, t_view, l_view, here, rotate_attend)
            return o, (all_k, all_v, ql[:, 0])

        x, (seg_k, seg_v, ql) = apply_layer(block, x, mix)
        return (x, seg_k, seg_v), ql

    x = model.embed_tokens(token[:, None])
    (x, seg_k, seg_v), ql = scan_layers(model, (x, cache.seg_k, cache.seg_v), per_layer, layer_fn)
    seg_q = cache.seg_q
    if plan.n_long and has_pool(cfg):
        seg_q = seg_q.at[:, rows, j].set(long_layers_of(cfg, ql).astype(seg_q.dtype))
    logits = model.logits(x)[:, 0]
    return dataclasses.replace(cache, length=cache.length + 1, seg_k=seg_k, seg_v=seg_v, seg_q=seg_q), logits


# --------------------------------------------------------------------------- full attention


def prefill_full(model: Transformer, cfg: Config, tokens: Int[Array, "B T"], lengths: Int[Array, "B"],
                 capacity: int):
    """Causal attention over the prompts (right padding comes after every real token, so it
    is never seen; decoding overwrites its cache slots)."""
    B, T = tokens.shape
    x, (k, v) = full_hidden(model, cfg, tokens, jnp.ones((B, T), jnp.int32), single_doc=True, keep_kv=True)
    pad = [(0, 0), (0, 0), (0, capacity - T), (0, 0), (0, 0)]
    kept = lambda x: _on_stored(lambda a: jnp.pad(a, pad), store_kv(x, cfg.inference.kv_dtype))
    cache = FullCache(lengths.astype(jnp.int32), kept(k), kept(v))
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)
    return cache, None, model.logits(last)[:, 0]


def decode_full(model: Transformer, cfg: Config, cache: FullCache, token: Int[Array, "B"]):
    B = token.shape[0]
    C = jax.tree.leaves(cache.k)[0].shape[2]
    pos = cache.length[:, None]
    inv_freq = model_frequencies(cfg.model)
    rows = jnp.arange(B)
    slots = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (B, C))
    mask = AttentionMask(jnp.ones((B, 1), jnp.int32), pos, jnp.ones((B, C), jnp.int32), slots)

    use_kernel = decode_kernel(cfg) == "pallas"
    G, D = cfg.model.n_kv_heads, cfg.model.dim_head
    visible = (jnp.zeros((B, 1), jnp.int32), pos + 1, None)  # slots 0..length, stored rotated

    def layer_fn(block, carry, per):
        x, ks, vs = carry

        def mix(q, k, v):  # write the new slot in place, then read the layer's slice
            all_k, all_v = (jax.tree.map(lambda b, n: b.at[per, rows, cache.length].set(n), buf, _like(new[:, 0], buf))
                            for buf, new in ((ks, apply_rope(k, pos, inv_freq)), (vs, v)))
            if use_kernel:  # the whole buffers, read in place; only the query is rotated here
                qr = apply_rope(q.astype(jnp.float32), pos, inv_freq).reshape(B, G, -1, D)
                part = _part(all_k, all_v, per, jnp.zeros((G,), jnp.int32), visible)
                o = kernels.combine([kernels.part_attention(qr, part, inv_freq)])
                return o.reshape(q.shape).astype(q.dtype), (all_k, all_v)
            kl, vl = (load_kv(jax.tree.map(lambda b: jax.lax.dynamic_index_in_dim(b, per, keepdims=False), buf),
                              model.dtype) for buf in (all_k, all_v))
            return attend(apply_rope(q, pos, inv_freq), kl, vl, mask, DECODE_BACKEND), (all_k, all_v)

        x, (ks, vs) = apply_layer(block, x, mix)
        return (x, ks, vs), None

    x = model.embed_tokens(token[:, None])
    (x, k, v), _ = scan_layers(model, (x, cache.k, cache.v), jnp.arange(jax.tree.leaves(cache.k)[0].shape[0]),
                               layer_fn)
    return FullCache(cache.length + 1, k, v), model.logits(x)[:, 0]


def cache_bytes(cache) -> int:
    """Bytes of every array of a cache or pool (8-bit keys and values and their scales alike)."""
    return int(sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(cache)))
