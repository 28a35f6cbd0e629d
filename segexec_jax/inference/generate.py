"""`generate`: prefill the prompts, then decode token by token with the cache donated.

The log-probabilities returned are the model's own (log-softmax of the logits, before
temperature, top-k or top-p), so they can be compared with `forward` on the same tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..config import Config, ConfigError
from ..model.transformer import bind
from ..segment.operator import refresh_chunks
from .decode import (
    cache_bytes,
    decode_full,
    decode_segmented,
    fill_segmented,
    prefill_full,
    prefill_segmented,
    refresh_segmented,
)


@dataclasses.dataclass
class GenerateResult:
    tokens: np.ndarray  # int32 [B, N] generated tokens; -1 after a row stopped
    logprobs: np.ndarray  # float32 [B, N] log p(token); NaN after a row stopped
    num_generated: np.ndarray  # int32 [B]
    finish_reasons: list[str]  # "length", "stop_token" or "stop_string" per row
    prompts: list[list[int]]
    text: list[str] | None = None  # decoded generations, when a tokenizer was given
    timings: dict = dataclasses.field(default_factory=dict)

    @property
    def sequences(self) -> list[list[int]]:
        """Prompt followed by the generated tokens, per row."""
        return [p + self.tokens[b, : self.num_generated[b]].tolist() for b, p in enumerate(self.prompts)]


def sample(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None, top_p: float | None):
    """Greedy at temperature 0; otherwise softmax(logits / T) restricted to the top k tokens
    and to the smallest set whose probability reaches top_p."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        drop_sorted = before >= top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _prompts_as_lists(prompts, tokenizer) -> list[list[int]]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, np.ndarray) or isinstance(prompts, jax.Array):
        arr = np.asarray(prompts)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise ValueError(f"prompts must be token lists or a [batch, length] array, got shape {arr.shape}")
        return [row.tolist() for row in arr]
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer")
            p = tokenizer.encode(p)
        out.append([int(t) for t in p])
    return out


def _memory(kind: str):
    return jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=kind)


PAD_MULTIPLE = 256  # full and streaming prefill: prompt batches padded to a multiple of this (at least)


def pad_unit(mode_unit: int, longest: int) -> int:
    """Full and streaming prompts pad to 1/16 of their power of two (at least PAD_MULTIPLE):
    at most 16 prefill shapes per octave of prompt length, at most 6% padding."""
    if mode_unit > 1:
        return mode_unit  # segmented: whole segments
    return max(PAD_MULTIPLE, 1 << max(longest.bit_length() - 5, 0))


@functools.lru_cache(maxsize=8)
def _engine(cfg: Config):
    """Jitted prefill, decode step, segment fill and chunk refresh for a config (caches are
    donated)."""
    fill = refresh = None
    if cfg.attention.mode == "segmented":
        prefill, step, fill = prefill_segmented, decode_segmented, fill_segmented
        refresh = refresh_segmented if refresh_chunks(cfg) > 1 else None
    elif cfg.attention.mode == "full":
        prefill, step = prefill_full, decode_full
    else:
        from ..segment.streaming import decode_streaming, prefill_streaming

        prefill, step = prefill_streaming, decode_streaming
    on_host = cfg.inference.pool_on_host and fill is not None

    def run_prefill(params, tokens, lengths, capacity):
        return prefill(bind(cfg, params), cfg, tokens, lengths, capacity)

    def run_step(params, cache, token):
        cache, logits = step(bind(cfg, params), cfg, cache, token)
        return cache, logits.astype(jnp.float32)

    def between_tokens(update):
        def run(cache, pool, rows):
            if on_host:  # bring the pool over, and send it back
                pool = jax.device_put(pool, _memory("device"))
            cache, pool = update(cfg, cache, pool, rows)
            if on_host:
                pool = jax.device_put(pool, _memory("pinned_host"))
            return cache, pool

        return jax.jit(run, donate_argnums=(0, 1)) if update is not None else None

    return (jax.jit(run_prefill, static_argnums=3), jax.jit(run_step, donate_argnums=(1,)),
            between_tokens(fill), between_tokens(refresh), on_host)


class _CompileClock:
    """Seconds JAX spends tracing, lowering and compiling while active, from its monitoring
    events (a jitted function's first call with new shapes, an eager op's first use). Nested
    spans (a function traced inside another) count once. Process-wide: compilation in another
    thread meanwhile counts too."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        self.spans: list[tuple[float, float]] = []

    def _record(self, event: str, start: float, end: float, **_) -> None:
        if event in self.EVENTS:
            self.spans.append((start, end))

    def __enter__(self):
        jax.monitoring.register_event_time_span_listener(self._record)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_time_span_listener(self._record)

    def seconds(self) -> float:
        total, reach = 0.0, float("-inf")
        for start, end in sorted(self.spans):
            if end > reach:
                total += end - max(start, reach)
                reach = end
        return total


def _peak_device_bytes() -> int | None:
    try:
        return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    except Exception:  # backends without memory statistics
        return None


def generate(params: dict, cfg: Config, prompts, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             stop_tokens: Sequence[int] = (), stop_strings: Sequence[str] = (), tokenizer=None,
             on_token: Callable[[int, int], None] | None = None, mesh=None) -> GenerateResult:
    """Generate up to `max_new_tokens` per prompt, in `cfg.attention.mode`.

    `prompts`: token lists (ragged lengths allowed), a [batch, length] array, or strings
    with a `tokenizer`. `on_token(row, token)` is called as tokens come (streaming).

    `mesh`: run on it, `params` laid out on it (`load_checkpoint(path, mesh)`). With
    `mesh.tensor` > 1 every weight is split over heads, and the KV caches and pools follow
    (tensor parallel): a model larger than one device."""
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext(), _CompileClock() as compiling:
        return _generate(params, cfg, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens,
                         stop_strings, tokenizer, on_token, compiling)


def _generate(params, cfg, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, stop_strings,
              tokenizer, on_token, compiling: _CompileClock) -> GenerateResult:
    start = time.perf_counter()
    rows = _prompts_as_lists(prompts, tokenizer)
    B = len(rows)
    if B == 0 or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt must hold at least one token")
    V = cfg.model.vocab_size
    if any(t < 0 or t >= V for r in rows for t in r):
        raise ValueError(f"prompt token ids must lie in [0, model.vocab_size={V})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    limit = cfg.inference.max_len
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > limit:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"inference.max_len={limit}")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError("need temperature >= 0, top_k >= 1 and 0 < top_p <= 1")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer")

    S = cfg.segment.len if cfg.attention.mode == "segmented" else 1
    capacity = -(-limit // S) * S
    unit = pad_unit(S, longest)  # prompts padded to a few shapes: few compilations
    T = min(-(-longest // unit) * unit, capacity)
    tokens = np.zeros((B, T), np.int32)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = r
    lengths = np.array([len(r) for r in rows], np.int32)
    prefill, step, fill, refresh, pool_on_host = _engine(cfg)
    chunk = cfg.segment.retrieval.refresh or S

    def maintain(cache, pool, position, segment_fills: bool = True):
        """Between two tokens: a filled segment moves on; with `refresh`, a new chunk selects."""
        filled = position % S == 0
        if segment_fills and fill is not None and filled.any():
            cache, pool = fill(cache, pool, jnp.asarray(filled))
        due = ~filled & (position % chunk == 0)
        if refresh is not None and due.any():
            cache, pool = refresh(cache, pool, jnp.asarray(due))
        return cache, pool

    t0 = time.perf_counter()
    cache, pool, logits = prefill(params, jnp.asarray(tokens), jnp.asarray(lengths), capacity)
    logits = jax.block_until_ready(logits).astype(jnp.float32)
    prefill_wall, prefill_compile = time.perf_counter() - t0, compiling.seconds()
    if pool_on_host:
        pool = jax.device_put(pool, _memory("pinned_host"))
    position = lengths.copy()
    cache, pool = maintain(cache, pool, position, segment_fills=False)  # prefill did the fills

    key = jax.random.key(seed)
    out = np.full((B, max_new_tokens), -1, np.int32)
    lps = np.full((B, max_new_tokens), np.nan, np.float32)
    done = np.zeros(B, bool)
    n_gen = np.zeros(B, np.int32)
    reasons = ["length"] * B
    texts = [""] * B
    stop_set = set(int(t) for t in stop_tokens)
    t1, before_decode = time.perf_counter(), compiling.seconds()
    for i in range(max_new_tokens):
        key, sub = jax.random.split(key)
        nxt = sample(logits, sub, temperature, top_k, top_p)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), nxt[:, None], axis=-1)[:, 0]
        nxt_np, logp_np = np.asarray(nxt), np.asarray(logp)
        for b in range(B):
            if done[b]:
                continue
            out[b, i], lps[b, i] = nxt_np[b], logp_np[b]
            n_gen[b] += 1
            if on_token is not None:
                on_token(b, int(nxt_np[b]))
            if int(nxt_np[b]) in stop_set:
                done[b], reasons[b] = True, "stop_token"
            elif stop_strings:
                texts[b] = tokenizer.decode(out[b, : n_gen[b]])
                if any(s in texts[b] for s in stop_strings):
                    done[b], reasons[b] = True, "stop_string"
        if done.all() or i == max_new_tokens - 1:
            break
        cache, logits = step(params, cache, jnp.asarray(nxt_np))
        position += 1
        cache, pool = maintain(cache, pool, position)
    jax.block_until_ready(logits)
    end, compile_s = time.perf_counter(), compiling.seconds()
    # compilation is timed apart: prefill_s and decode_s are the wall times less the compilation
    # inside them. Each row's first token comes from the prefill's logits; the rest, from decode steps.
    prefill_s = max(prefill_wall - prefill_compile, 0.0)
    decode_s = max(end - t1 - (compile_s - before_decode), 0.0)
    decoded = int(np.maximum(n_gen - 1, 0).sum())
    timings = dict(compile_s=compile_s, prefill_s=prefill_s, time_to_first_token_s=prefill_s, decode_s=decode_s,
                   decode_tokens=decoded, decode_tokens_per_s=decoded / decode_s if decode_s > 0 else 0.0,
                   wall_s=end - start, cache_bytes=cache_bytes(cache),
                   pool_bytes=cache_bytes(pool) if pool is not None else 0,
                   pool_on_host=pool_on_host, peak_device_bytes=_peak_device_bytes())
    text = [tokenizer.decode(out[b, : n_gen[b]]) for b in range(B)] if tokenizer is not None else None
    return GenerateResult(out, lps, n_gen, reasons, rows, text, timings)
