"""The segmented prefill with an 8-bit cache: each layer quantizes its own new keys and values
and dequantizes its own tail, so no all-layer copy of the segment buffers in the compute dtype
(or in float32) exists, and the values stored are `store_kv` of what the float cache holds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_tokens, tiny

import segexec_jax as sx
from segexec_jax.inference.decode import store_kv
from segexec_jax.inference.generate import _engine

SEG = ["segment.len=8", "segment.tail=3", "segment.sinks=2", "segment.retrieval.budget=5",
       "segment.retrieval.query_window=4", "inference.max_len=64"]


@pytest.fixture(scope="module")
def params():
    return sx.init_params(tiny(*SEG), seed=0)


def _prefill(params, lengths, *overrides):
    cfg = tiny(*SEG, *overrides)
    T = -(-max(lengths) // 8) * 8
    tokens = np.zeros((len(lengths), T), np.int32)
    tokens[:, :max(lengths)] = random_tokens(len(lengths), max(lengths), seed=3)
    return _engine(cfg)[0](params, tokens, np.array(lengths, np.int32), 64)


def _same(got, want, what):
    np.testing.assert_array_equal(np.asarray(got.data), np.asarray(want.data), err_msg=what)
    np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(want.scale), err_msg=what)


@pytest.mark.parametrize("kv_dtype", ["int8", "float8_e4m3fn"])
def test_8bit_values_are_store_kv_of_the_float_cache(params, kv_dtype):
    """Row 0 fills segment 0 (its tail, sinks and pool entries come from segment 0) and goes
    on into segment 1; row 1 ends inside segment 0 (the segment buffers hold it). Everything
    segment 0 leaves is computed from an empty cache, so both caches hold the same keys and
    values there: the 8-bit one must hold exactly `store_kv` of the float one's."""
    f_cache, f_pool, _ = _prefill(params, (13, 5))
    q_cache, q_pool, _ = _prefill(params, (13, 5), f"inference.kv_dtype={kv_dtype}")
    row = lambda x, b: jax.tree.map(lambda a: a[:, b:b + 1], x)
    for name in ("seg_k", "seg_v"):
        _same(row(getattr(q_cache, name), 1), store_kv(row(getattr(f_cache, name), 1), kv_dtype), name)
    for part in ("tail", "sinks"):
        for kv in ("k", "v"):
            got, want = getattr(getattr(q_cache, part), kv), getattr(getattr(f_cache, part), kv)
            _same(row(got, 0), store_kv(row(want, 0), kv_dtype), f"{part}.{kv}")
    for kv in ("k", "v"):  # segment 0's pool entries (slots 0..7) of row 0
        first = lambda x: jax.tree.map(lambda a: a[:, :1, :8], x)
        _same(first(getattr(q_pool, kv)), store_kv(first(getattr(f_pool, kv)), kv_dtype), f"pool.{kv}")


def _temp_bytes(*overrides: str) -> int:
    """Compiled prefill's temporary bytes for a model whose segment buffers dominate."""
    cfg = tiny("segment.len=256", "segment.tail=32", "segment.retrieval.budget=32", "model.n_layers=8",
               "model.n_kv_heads=4", "model.d_model=64", "segment.long_layers=[3]", "inference.max_len=512",
               *overrides)
    params = jax.eval_shape(lambda: sx.init_params(cfg, seed=0))
    tokens = jax.ShapeDtypeStruct((1, 512), jnp.int32)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    compiled = _engine(cfg)[0].lower(params, tokens, lengths, 512).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_8bit_prefill_keeps_no_float_copy_of_the_segment_buffers():
    """Before, the prefill dequantized every layer's segment buffers (an all-layer float copy)
    and requantized them after the layers (float32 temporaries of the same size): the 8-bit
    cache needed more temporary memory than the float one. Now it needs no more than the
    float cache's, well under one all-layer copy [L B S G D] of the buffers in float32."""
    float_temp = _temp_bytes()
    int8_temp = _temp_bytes("inference.kv_dtype=int8")
    seg_copy = 8 * 1 * 256 * 4 * 16 * 4  # L B S G D, float32
    assert int8_temp <= float_temp + seg_copy // 4, (int8_temp, float_temp, seg_copy)


def _float_stacks(jaxpr, L: int, B: int, lengths: set[int]) -> list:
    """Floating-point arrays [L B X ... D] (X in `lengths`) anywhere in a jaxpr (scan and
    loop bodies too): an all-layer stack of tail or segment entries in a float format.
    Broadcasts are left out: the empty state's zeros, whose values nothing reads (XLA drops them)."""
    found = []
    for eqn in jaxpr.eqns:
        for var in eqn.outvars if eqn.primitive.name != "broadcast_in_dim" else ():
            shape, dtype = var.aval.shape, var.aval.dtype
            if (len(shape) >= 4 and shape[:2] == (L, B) and shape[2] in lengths and shape[-1] > 1
                    and jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize > 1):
                found.append((str(eqn.primitive), shape, str(dtype)))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jax.extend.core.Jaxpr):
                    found += _float_stacks(sub, L, B, lengths)
    return found


@pytest.mark.parametrize("refresh", [[], ["segment.retrieval.refresh=4"]])
def test_8bit_prefill_writes_each_layer_in_place(refresh):
    """Each layer quantizes its tail, segment keys/values, pool entries and retrieval queries
    and writes them into the 8-bit cache itself: no float array holding every layer's tail
    [L B M G D] or segment entries [L B S ...] exists (before, the layers' tails and pool
    entries were stacked in the compute dtype, then quantized all at once)."""
    cfg = tiny(*SEG, "model.n_layers=3", "segment.long_layers=[1]", "inference.kv_dtype=int8", *refresh)
    params = jax.eval_shape(lambda: sx.init_params(cfg, seed=0))
    tokens = jax.ShapeDtypeStruct((2, 24), jnp.int32)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p, t, n: _engine(cfg)[0](p, t, n, 64))(params, tokens, lengths).jaxpr
    assert _float_stacks(jaxpr, 3, 2, {cfg.segment.tail, cfg.segment.len}) == []
