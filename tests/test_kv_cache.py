"""The inference cache's storage type (`inference.kv_dtype`): the default changes nothing,
8-bit caches take about half of bfloat16's bytes, and their accuracy cost is small but real."""

import jax
import numpy as np
import pytest
from helpers import random_tokens, tiny

import segexec_jax as sx
from segexec_jax.config import ConfigError
from segexec_jax.inference.decode import Quantized, cache_bytes
from segexec_jax.inference.generate import _engine

SEG = ["segment.len=8", "segment.tail=3", "segment.sinks=2", "segment.retrieval.budget=5",
       "segment.retrieval.query_window=4", "inference.max_len=64"]
MODES = {"segmented": SEG, "refresh": SEG + ["segment.retrieval.refresh=4"],
         "full": ["attention.mode=full", "inference.max_len=64"]}
PROMPTS = [random_tokens(1, n, seed=n)[0].tolist() for n in (21, 13, 5)]  # decoding crosses segment fills
NEW = 12
# the largest error of one stored value, over the largest |value| of its entry and KV head:
# half a step of 1/127 (int8); the unit roundoff of 4 (float8 e4m3) or 8 (bfloat16) significant
# bits
STEP = {"int8": 0.5 / 127, "float8_e4m3fn": 2.0 ** -4, "bfloat16": 2.0 ** -8}


def _generate(params, mode: str, *overrides: str):
    return sx.generate(params, tiny(*MODES[mode], *overrides), PROMPTS, max_new_tokens=NEW)


@pytest.fixture(scope="module")
def params():
    return sx.init_params(tiny(*SEG), seed=0)


@pytest.fixture(scope="module")
def exact(params):
    """The default cache's generation of each mode, made once for the module's tests."""
    made = {}
    return lambda mode: made[mode] if mode in made else made.setdefault(mode, _generate(params, mode))


@pytest.mark.parametrize("mode", ["segmented", "full"])
def test_default_is_the_compute_dtype(params, exact, mode):
    """kv_dtype unset keeps the cache in the compute dtype: bit for bit what it was."""
    unset = exact(mode)
    named = _generate(params, mode, "inference.kv_dtype=float32")
    np.testing.assert_array_equal(unset.tokens, named.tokens)
    np.testing.assert_array_equal(unset.logprobs, named.logprobs)
    assert unset.timings["cache_bytes"] == named.timings["cache_bytes"]
    assert unset.timings["pool_bytes"] == named.timings["pool_bytes"]


def _kv_arrays(cache, pool):
    """The key and value arrays of a cache and pool, by name."""
    parts = {"pool": pool} if pool is not None else {}
    if hasattr(cache, "tail"):
        parts.update(tail=cache.tail, sinks=cache.sinks, ret=cache.ret)
        arrays = {"seg_k": cache.seg_k, "seg_v": cache.seg_v}
    else:
        parts, arrays = {}, {"k": cache.k, "v": cache.v}
    for name, part in parts.items():
        arrays[f"{name}.k"], arrays[f"{name}.v"] = part.k, part.v
    return arrays


def _prefill(params, mode: str, kv_dtype: str):
    cfg = tiny(*MODES[mode], f"inference.kv_dtype={kv_dtype}")
    tokens = np.zeros((2, 16), np.int32)
    tokens[:, :13] = random_tokens(2, 13)
    S = cfg.segment.len if mode != "full" else 1
    capacity = -(-cfg.inference.max_len // S) * S
    cache, pool, _ = _engine(cfg)[0](params, tokens, np.array([13, 9], np.int32), capacity)
    return cache, pool


@pytest.mark.parametrize("mode", ["segmented", "full"])
@pytest.mark.parametrize("kv_dtype", ["int8", "float8_e4m3fn"])
def test_8bit_cache_bytes(params, mode, kv_dtype):
    """Every key and value array is stored in 8 bits with one float32 scale per entry and KV
    head: (D + 4) / (2 D) of bfloat16's bytes (0.625 at the tiny model's D = 16, 0.516 at D = 128)."""
    D = tiny().model.dim_head
    bf16_cache, bf16_pool = _prefill(params, mode, "bfloat16")
    q_cache, q_pool = _prefill(params, mode, kv_dtype)
    bf16_kv, q_kv = _kv_arrays(bf16_cache, bf16_pool), _kv_arrays(q_cache, q_pool)
    for name, ref in bf16_kv.items():
        got = q_kv[name]
        assert isinstance(got, Quantized) and got.data.dtype == np.dtype(kv_dtype), name
        assert got.data.shape == ref.shape and got.scale.shape == ref.shape[:-1] + (1,), name
    kv_bf16 = sum(a.size * 2 for a in bf16_kv.values())
    expected_kv = sum(a.size + a.size // D * 4 for a in bf16_kv.values())
    assert expected_kv == kv_bf16 * (D + 4) // (2 * D)
    total_bf16 = cache_bytes(bf16_cache) + cache_bytes(bf16_pool)
    total_q = cache_bytes(q_cache) + cache_bytes(q_pool)
    # the rest (lengths, counts, segmented's retrieval queries in the compute dtype) is as it was
    assert total_q == total_bf16 - kv_bf16 + expected_kv


@pytest.mark.parametrize("mode", ["segmented", "refresh", "full"])
@pytest.mark.parametrize("kv_dtype", ["int8", "float8_e4m3fn", "bfloat16"])
def test_accuracy_cost(params, exact, mode, kv_dtype):
    """float32 model: a stored value's error is at most STEP of its entry's largest |value|; the
    log-probabilities move by less than that relative step (the model does not amplify the
    cache's error), and they do move (the quantization is not a no-op)."""
    exact = exact(mode)
    stored = _generate(params, mode, f"inference.kv_dtype={kv_dtype}")
    np.testing.assert_array_equal(exact.tokens, stored.tokens)  # same greedy path: comparable log-probs
    gap = float(np.nanmax(np.abs(exact.logprobs - stored.logprobs)))
    assert 0 < gap < STEP[kv_dtype], gap


def test_bad_kv_dtype():
    with pytest.raises(ConfigError, match=r"inference\.kv_dtype") as err:
        tiny("inference.kv_dtype=fp8")
    assert "int8" in str(err.value) and "float8_e4m3fn" in str(err.value)
    with pytest.raises(ConfigError, match=r"inference\.kv_dtype"):
        tiny("attention.mode=streaming", "inference.kv_dtype=int8")


def test_quantize_round_trip():
    """Stored 8-bit entries dequantize to within half a step of their row's largest |value|."""
    from segexec_jax.inference.decode import load_kv, store_kv

    x = jax.random.normal(jax.random.key(0), (3, 5, 2, 16)) * jax.numpy.arange(1, 4)[:, None, None, None]
    x = x.at[0, 0, 0].set(0.0)  # an all-zero entry: scale 0, no NaN
    for kv_dtype, step in STEP.items():
        back = np.asarray(load_kv(store_kv(x, kv_dtype), jax.numpy.float32))
        row_max = np.abs(np.asarray(x)).max(-1, keepdims=True)
        assert np.all(np.abs(back - np.asarray(x)) <= step * row_max * (1 + 1e-6)), kv_dtype
        assert np.all(back[0, 0, 0] == 0)
