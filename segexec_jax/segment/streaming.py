"""Streaming mode (StreamingLLM): attention sinks plus a window of recent tokens, inference only.

A query at position t sees the first `inference.stream_sinks` tokens (the sinks) and the
last `inference.stream_window` tokens up to itself; everything else has been evicted.
Positions follow the cache, as in StreamingLLM: window keys keep their distance to the
query (t - u), while the sinks are seen from position min(t, sinks + window - 1), so no
distance exceeds the cache size.

Prompts are processed in chunks of at most `window` tokens against the same cache that
decoding uses (a decode step is a chunk of one), so `forward` in this mode and generation
agree by construction. Rows are one document each.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ..config import Config
from ..model import numerics
from ..model.rope import apply_rope, model_frequencies
from ..model.transformer import Transformer, apply_layer, scan_layers

pytree = jax.tree_util.register_dataclass
CHUNK = 512


@pytree
@dataclasses.dataclass(frozen=True)
class StreamingCache:
    length: Int[Array, "B"]
    sink_k: Float[Array, "L B n G D"]  # keys rotated at their own positions 0..n-1
    sink_v: Float[Array, "L B n G D"]
    ring_k: Float[Array, "L B W G D"]  # the recent non-sink tokens, slot (u - n) % W
    ring_v: Float[Array, "L B W G D"]
    ring_pos: Int[Array, "B W"]  # position held by each ring slot (-1: empty)


def chunk_size(cfg: Config) -> int:
    return min(cfg.inference.stream_window, CHUNK)


def empty_cache(cfg: Config, B: int, dtype) -> StreamingCache:
    m = cfg.model
    n, W = cfg.inference.stream_sinks, cfg.inference.stream_window
    z = lambda k: jnp.zeros((m.n_layers, B, k, m.n_kv_heads, m.dim_head), dtype)
    return StreamingCache(jnp.zeros((B,), jnp.int32), z(n), z(n), z(W), z(W), jnp.full((B, W), -1, jnp.int32))


def _attend(q_t, q_p, sink_k, sink_v, ring_k, ring_v, k, v, sink_ok, ring_ok, chunk_ok):
    """One softmax over [sinks, ring, chunk] keys with per-query masks; float32 or wider."""
    B, Q, H, D = q_t.shape
    G = k.shape[2]
    work = jnp.promote_types(q_t.dtype, jnp.float32)
    split = lambda x: x.astype(work).reshape(B, Q, G, H // G, D)
    scale = 1.0 / jnp.sqrt(jnp.asarray(D, work))
    logits = jnp.concatenate([
        numerics.einsum("bqgrd,bkgd->bgrqk", split(q_p), sink_k.astype(work)),
        numerics.einsum("bqgrd,bkgd->bgrqk", split(q_t), ring_k.astype(work)),
        numerics.einsum("bqgrd,bkgd->bgrqk", split(q_t), k.astype(work)),
    ], axis=-1) * scale
    visible = jnp.concatenate([sink_ok, ring_ok, chunk_ok], axis=-1)[:, None, None]  # [B 1 1 Q K]
    weights = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
    values = jnp.concatenate([sink_v, ring_v, v], axis=1).astype(work)
    out = numerics.einsum("bgrqk,bkgd->bqgrd", weights, values)
    return out.reshape(B, Q, H, D).astype(q_t.dtype)


def chunk_forward(model: Transformer, cfg: Config, cache: StreamingCache, tokens: Int[Array, "B Q"],
                  valid: Array):
    """Run up to `window` new tokens per row (those marked `valid`, a prefix of the chunk)
    against the cache; returns the hidden states and the updated cache."""
    n, W = cfg.inference.stream_sinks, cfg.inference.stream_window
    B, Q = tokens.shape
    inv_freq = model_frequencies(cfg.model)
    t = cache.length[:, None] + jnp.arange(Q, dtype=jnp.int32)[None]  # [B Q]
    p = jnp.minimum(t, n + W - 1)  # where the sinks are seen from
    u_sink = jnp.arange(n, dtype=jnp.int32)
    sink_ok = jnp.broadcast_to((u_sink[None, None] < jnp.minimum(cache.length, n)[:, None, None]), (B, Q, n))
    lo = jnp.maximum(n, t - W + 1)[..., None]
    ring_ok = (cache.ring_pos[:, None] >= lo) & (cache.ring_pos[:, None] >= 0)
    i = jnp.arange(Q)
    chunk_ok = (i[None, None] <= i[None, :, None]) & valid[:, None, :]
    rows = jnp.arange(B)[:, None]
    is_sink = t < n
    sink_slot = jnp.where(is_sink & valid, t, n)  # n: dropped
    ring_slot = jnp.where(~is_sink & valid, (t - n) % W, W)  # W: dropped

    def layer_fn(block, carry, layer):
        x, sk, sv, rk, rv = carry

        def mix(q, k, v):
            k = apply_rope(k, t, inv_freq)
            at = lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False)
            o = _attend(apply_rope(q, t, inv_freq), apply_rope(q, p, inv_freq), at(sk), at(sv), at(rk), at(rv),
                        k, v, sink_ok, ring_ok, chunk_ok)
            new = (at(sk).at[rows, sink_slot].set(k, mode="drop"), at(sv).at[rows, sink_slot].set(v, mode="drop"),
                   at(rk).at[rows, ring_slot].set(k, mode="drop"), at(rv).at[rows, ring_slot].set(v, mode="drop"))
            return o, new

        x, new = apply_layer(block, x, mix)
        sk, sv, rk, rv = (jax.lax.dynamic_update_index_in_dim(a, b, layer, 0) for a, b in zip((sk, sv, rk, rv), new))
        return (x, sk, sv, rk, rv), None

    x = model.embed_tokens(tokens)
    carry = (x, cache.sink_k, cache.sink_v, cache.ring_k, cache.ring_v)
    (x, sk, sv, rk, rv), _ = scan_layers(model, carry, jnp.arange(cfg.model.n_layers), layer_fn)
    ring_pos = cache.ring_pos.at[rows, ring_slot].set(t, mode="drop")
    length = cache.length + valid.sum(-1).astype(jnp.int32)
    return x, StreamingCache(length, sk, sv, rk, rv, ring_pos)


def _run(model: Transformer, cfg: Config, tokens: Int[Array, "B T"], lengths: Int[Array, "B"], emit):
    Q = chunk_size(cfg)
    B, T = tokens.shape
    pad = -T % Q
    tokens = jnp.pad(tokens, ((0, 0), (0, pad)))
    chunks = jnp.swapaxes(tokens.reshape(B, -1, Q), 0, 1)

    def step(cache, xs):
        c, chunk = xs
        valid = (c * Q + jnp.arange(Q))[None] < lengths[:, None]
        x, cache = chunk_forward(model, cfg, cache, chunk, valid)
        return cache, emit(x, c)

    return jax.lax.scan(step, empty_cache(cfg, B, model.dtype), (jnp.arange(chunks.shape[0]), chunks))


def forward_streaming(model: Transformer, cfg: Config, tokens: Int[Array, "B T"]):
    """Logits of every position as streaming generation would compute them."""
    B, T = tokens.shape
    _, logits = _run(model, cfg, tokens, jnp.full((B,), T, jnp.int32), lambda x, c: model.logits(x))
    return jnp.swapaxes(logits, 0, 1).reshape(B, -1, logits.shape[-1])[:, :T]


def prefill_streaming(model: Transformer, cfg: Config, tokens, lengths, capacity: int):
    Q = chunk_size(cfg)
    last = lengths - 1

    def emit(x, c):
        here = (last // Q) == c
        xl = jnp.take_along_axis(x, jnp.clip(last - c * Q, 0, Q - 1)[:, None, None], axis=1)
        return jnp.where(here[:, None], model.logits(xl)[:, 0], 0.0)

    cache, logits = _run(model, cfg, tokens, lengths, emit)
    return cache, None, logits.sum(0)


def decode_streaming(model: Transformer, cfg: Config, cache: StreamingCache, token):
    x, cache = chunk_forward(model, cfg, cache, token[:, None], jnp.ones((token.shape[0], 1), bool))
    return cache, model.logits(x)[:, 0]
