"""The decode attention kernels (model/decode_attention.py, `inference.decode_kernel`): the Triton
and Mosaic kernels in interpret mode against the slow float32 rule, the lowering of each for its
platform (Triton IR for a CUDA GPU, a Mosaic compile for a TPU v5e, both on this CPU), and whole
decoding with the kernels against the xla decode (segmented, refresh, full; rows of different
lengths; a float32 and an int8 cache). On a GPU (`pytest -m gpu`) the compiled Triton kernel."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_tokens, tiny

import segexec_jax as sx
from segexec_jax.config import ConfigError
from segexec_jax.inference.generate import _engine
from segexec_jax.model import decode_attention as da
from segexec_jax.model.rope import inverse_frequencies

ON_GPU = any(d.platform == "gpu" for d in jax.devices())
TOL = dict(rtol=2e-6, atol=2e-6)  # float32 throughout: only the order of the sums differs


def _part(rng, L, B, K, G, D, NC, dtype, rotate=True, spans=None):
    """Random buffers [L B K G D] (8-bit: with scales), head classes and per-row spans."""
    k = rng.normal(size=(L, B, K, G, D)).astype(np.float32)
    v = rng.normal(size=(L, B, K, G, D)).astype(np.float32)
    scales = (None, None)
    if dtype in ("int8", "float8_e4m3fn"):
        qmax = 127.0 if dtype == "int8" else 448.0
        ks, vs = (np.abs(x).max(-1, keepdims=True) / qmax for x in (k, v))
        conv = (lambda x: np.round(x).astype(np.int8)) if dtype == "int8" else (lambda x: jnp.asarray(x, dtype))
        k, v, scales = conv(k / ks), conv(v / vs), (jnp.asarray(ks), jnp.asarray(vs))
    else:
        k, v = (jnp.asarray(x, dtype) for x in (k, v))
    if spans is None:
        lo = rng.integers(0, K, (B, NC))
        hi = np.minimum(lo + rng.integers(0, K, (B, NC)), K)
        spans = lo, hi
    pos0 = jnp.asarray(rng.integers(0, 300, (B, NC)), jnp.int32) if rotate else None
    head_class = jnp.asarray(np.arange(G) % NC, jnp.int32)
    return da.Part(jnp.asarray(k), jnp.asarray(v), *scales, jnp.int32(L - 1), head_class,
                   jnp.asarray(spans[0], jnp.int32), jnp.asarray(spans[1], jnp.int32), pos0)


def _check(q, part, inv, kernel, block_k=None):
    got = da.part_attention(q, part, inv, kernel=kernel, interpret=True, block_k=block_k)
    ref = da.reference_part(q, part, inv)
    np.testing.assert_allclose(da.combine([got]), da.combine([ref]), **TOL)
    # the log-sum-exp of the part (over the kernel's splits) is the reference's
    lse = jax.nn.logsumexp(got[1], axis=1)
    np.testing.assert_allclose(np.where(np.isfinite(lse), lse, 0.0), np.where(np.isfinite(ref[1][:, 0]), ref[1][:, 0], 0.0),
                               **TOL)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref[1][:, 0]))


@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
@pytest.mark.parametrize("dtype,rotate", [("float32", True), ("float32", False), ("int8", True),
                                          ("float8_e4m3fn", True)])
def test_kernel_matches_reference(kernel, dtype, rotate):
    """GQA (2 query heads a KV head), two head classes with their own spans and positions,
    empty spans, a key count that no block divides, the last layer of the buffers."""
    rng = np.random.default_rng(hash((kernel, dtype, rotate)) % 2**32)
    B, K, G, r, D = 3, 37, 4, 2, 16
    spans = ([[0, 3], [5, 5], [2, 0]], [[10, 30], [5, 5], [37, 1]])  # row 1 sees nothing
    part = _part(rng, 2, B, K, G, D, 2, dtype, rotate, spans)
    q = jnp.asarray(rng.normal(size=(B, G, r, D)), jnp.float32)
    _check(q, part, inverse_frequencies(D, 10000.0), kernel, block_k=8)


def test_gpu_kernel_reads_angles_from_a_rope_table():
    """MHA (one query head a KV head, two KV heads a program): the angles of pre-RoPE keys
    read from `rope_table` give the reference's rotation, blocks that start before position 0
    (pos0 < 0: the visible run starts past slot 0) and heads of a class with nothing to see;
    with the next block's loads issued early (`prefetch`)."""
    rng = np.random.default_rng(5)
    B, K, G, D = 3, 45, 4, 16
    spans = ([[20, 0], [3, 40], [0, 0]], [[45, 0], [30, 45], [0, 9]])
    part = _part(rng, 1, B, K, G, D, 2, "bfloat16", True, spans)
    part = da.Part(part.k, part.v, None, None, part.layer, part.head_class, part.lo, part.hi,
                   jnp.asarray([[-19, 5], [0, -38], [7, 0]], jnp.int32))
    q = jnp.asarray(rng.normal(size=(B, G, 1, D)), jnp.float32)
    inv = inverse_frequencies(D, 10000.0)
    ref = da.reference_part(q, part, inv)
    for block_k, block_h, prefetch in ((16, 2, False), (8, 1, True)):
        got = da.part_attention(q, part, inv, kernel="gpu", interpret=True, block_k=block_k, block_h=block_h,
                                rope_table=da.rope_table(inv, 60), prefetch=prefetch)
        np.testing.assert_allclose(da.combine([got]), da.combine([ref]), **TOL)


def test_gpu_kernel_splits_long_parts():
    """A part long enough to be split over programs (each split one lse), merged exactly."""
    rng = np.random.default_rng(3)
    part = _part(rng, 1, 2, 700, 2, 16, 1, "float32", spans=([[0], [130]], [[700], [650]]))
    q = jnp.asarray(rng.normal(size=(2, 2, 1, 16)), jnp.float32)
    got = da.part_attention(q, part, inverse_frequencies(16, 10000.0), kernel="gpu", interpret=True)
    assert got[0].shape[1] > 1  # split
    _check(q, part, inverse_frequencies(16, 10000.0), "gpu")


def test_combine_is_attention_over_the_union():
    """Two parts merged by their lse equal one part holding both (same positions)."""
    rng = np.random.default_rng(4)
    whole = _part(rng, 1, 2, 24, 2, 8, 1, "float32", spans=([[0], [0]], [[24], [17]]))
    inv = inverse_frequencies(8, 10000.0)
    q = jnp.asarray(rng.normal(size=(2, 2, 1, 8)), jnp.float32)
    cut = lambda a, b: da.Part(whole.k[:, :, a:b], whole.v[:, :, a:b], None, None, whole.layer, whole.head_class,
                               jnp.clip(whole.lo - a, 0, b - a), jnp.clip(whole.hi - a, 0, b - a), whole.pos0 + a)
    parts = [da.reference_part(q, cut(0, 10), inv), da.reference_part(q, cut(10, 24), inv)]
    np.testing.assert_allclose(da.combine(parts), da.combine([da.reference_part(q, whole, inv)]), **TOL)


# --------------------------------------------------------------------------- lowering for the platforms


def test_gpu_kernel_lowers_to_triton():
    """The Triton kernel lowers for a CUDA GPU (Pallas -> Triton IR, on this CPU): bf16, a
    pre-rotated float32 cache, int8 and float8 caches, at the LLaMA-2-7B head shape; angles
    computed and read from a table."""
    L, B, K, G, r, D = 2, 3, 4101, 32, 1, 128
    S = jax.ShapeDtypeStruct
    inv = inverse_frequencies(D, 10000.0)
    for dtype, quant, rotate in [("bfloat16", False, True), ("float32", False, False), ("int8", True, True),
                                 ("float8_e4m3fn", True, True)]:
        scale = S((L, B, K, G, 1), jnp.float32) if quant else None

        def f(q, k, v, ks, vs, spans, rotate=rotate):
            part = da.Part(k, v, ks, vs, jnp.int32(1), jnp.zeros((G,), jnp.int32), spans, spans + 9,
                           spans if rotate else None)
            out = [da.part_attention(q, part, inv, kernel="gpu", interpret=False)]
            if rotate:  # angles from a table; the next block loaded early
                out.append(da.part_attention(q, part, inv, kernel="gpu", interpret=False,
                                             rope_table=da.rope_table(inv, K + 64), prefetch=True))
            return da.combine(out)

        args = (S((B, G, r, D), jnp.float32), S((L, B, K, G, D), dtype), S((L, B, K, G, D), dtype), scale, scale,
                S((B, 1), jnp.int32))
        exported = jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
        assert "xla.gpu.triton" in exported.mlir_module(), dtype


def _libtpu_missing() -> str | None:
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        return f"libtpu is not installed ({e}): `pip install -e '.[dev]'`"
    return None


MOSAIC = textwrap.dedent("""
    import json, jax, jax.numpy as jnp
    from segexec_jax.evaluation import aot
    from segexec_jax.model import decode_attention as da
    from segexec_jax.model.rope import inverse_frequencies
    device = aot.tpu_slice("v5e:2x2").devices[0]
    on = jax.sharding.SingleDeviceSharding(device)
    S = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=on)
    L, B, K, G, r, D = 2, 3, 301, 8, 4, 128
    inv = inverse_frequencies(D, 10000.0)
    out = {}
    for dtype, quant, rotate in [("bfloat16", False, True), ("float32", False, False), ("int8", True, True),
                                 ("float8_e4m3fn", True, True)]:
        scale = S((L, B, K, G, 1), jnp.float32) if quant else None
        def f(q, k, v, ks, vs, cls, lo, hi, pos0, rotate=rotate):
            part = da.Part(k, v, ks, vs, jnp.int32(1), cls, lo, hi, pos0 if rotate else None)
            return da.combine([da.part_attention(q, part, inv, kernel="tpu", interpret=False)])
        compiled = jax.jit(f).lower(S((B, G, r, D), jnp.float32), S((L, B, K, G, D), dtype), S((L, B, K, G, D), dtype),
                                    scale, scale, S((G,), jnp.int32), *[S((B, 2), jnp.int32)] * 3).compile()
        out[dtype] = compiled.as_text().count('custom_call_target="tpu_custom_call"')
    print(json.dumps(out))
""")


@pytest.mark.skipif(_libtpu_missing() is not None, reason=_libtpu_missing() or "")
def test_tpu_kernel_compiles_with_mosaic():
    """The Mosaic kernel compiles for a TPU v5e chip (libtpu's compile-only devices, in a fresh
    process as `python -m segexec_jax.aot` does): bf16, pre-rotated float32, int8 and float8."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", MOSAIC], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts == dict(bfloat16=1, float32=1, int8=1, float8_e4m3fn=1), counts


# --------------------------------------------------------------------------- decoding with the kernels

SEG = ["segment.len=8", "segment.tail=3", "segment.sinks=2", "segment.retrieval.budget=5",
       "segment.retrieval.query_window=4", "inference.max_len=40"]
MODES = {"segmented": SEG, "refresh": SEG + ["segment.retrieval.refresh=4"],
         "full": ["attention.mode=full", "inference.max_len=40"]}
LENGTHS = (21, 13, 5)  # rows at different offsets; decoding crosses segment fills and refreshes


@pytest.fixture(scope="module")
def params():
    return sx.init_params(tiny(*SEG), seed=0)


def _decode_both(params, cfg_xla, cfg_pallas, steps: int):
    """Prefill once, then decode `steps` tokens per row with both kernels from the same cache
    (segment fills and refreshes between tokens as `generate` does them): the logits of each."""
    prefill, step_x, fill, refresh, _ = _engine(cfg_xla)
    step_p = _engine(cfg_pallas)[1]
    S = cfg_xla.segment.len if cfg_xla.attention.mode == "segmented" else 1
    capacity = -(-cfg_xla.inference.max_len // S) * S
    T = -(-max(LENGTHS) // S) * S
    tokens = np.zeros((len(LENGTHS), T), np.int32)
    for b, n in enumerate(LENGTHS):
        tokens[b, :n] = random_tokens(1, n, seed=n)[0]
    cache, pool, _ = prefill(params, tokens, np.array(LENGTHS, np.int32), capacity)
    position = np.array(LENGTHS)
    chunk = cfg_xla.segment.retrieval.refresh or cfg_xla.segment.len
    out_x, out_p = [], []
    for i in range(steps):
        if i and fill is not None:
            filled = position % cfg_xla.segment.len == 0
            if filled.any():
                cache, pool = fill(cache, pool, jnp.asarray(filled))
            due = ~filled & (position % chunk == 0)
            if refresh is not None and due.any():
                cache, pool = refresh(cache, pool, jnp.asarray(due))
        token = jnp.asarray(random_tokens(1, len(LENGTHS), seed=100 + i)[0], jnp.int32)
        copy = jax.tree.map(jnp.copy, cache)  # the steps donate their cache
        _, logits_p = step_p(params, copy, token)
        cache, logits_x = step_x(params, cache, token)
        out_x.append(jax.nn.log_softmax(logits_x))
        out_p.append(jax.nn.log_softmax(logits_p))
        position += 1
    return np.stack(out_x), np.stack(out_p)


SLOW = pytest.mark.slow  # ~30 s each (compiles): the default run keeps two that cover every path


@pytest.mark.parametrize("mode,kv_dtype,flavour", [
    ("refresh", "int8", "gpu"), ("full", None, "tpu"),
    pytest.param("segmented", None, "gpu", marks=SLOW), pytest.param("refresh", None, "tpu", marks=SLOW),
    pytest.param("full", "int8", "gpu", marks=SLOW), pytest.param("segmented", "int8", "tpu", marks=SLOW),
])
def test_pallas_decode_equals_xla_decode(params, monkeypatch, mode, kv_dtype, flavour):
    """`inference.decode_kernel=pallas` (interpret mode here) gives the xla decode's log-probs
    in float32, every row at its own offset, across segment fills and `refresh` re-selections."""
    monkeypatch.setattr(da, "CPU_FLAVOUR", flavour)
    extra = [f"inference.kv_dtype={kv_dtype}"] if kv_dtype else []
    cfg_x = tiny(*MODES[mode], *extra, "inference.decode_kernel=xla")
    cfg_p = tiny(*MODES[mode], *extra, "inference.decode_kernel=pallas")
    lp_x, lp_p = _decode_both(params, cfg_x, cfg_p, steps=8)  # every row fills a segment, then refreshes
    np.testing.assert_allclose(lp_p, lp_x, rtol=0, atol=2e-5)


def test_auto_is_xla_on_the_cpu_bit_for_bit(params):
    """`auto` decodes with xla on the CPU: the default path is unchanged."""
    cfg = tiny(*SEG)
    assert cfg.inference.decode_kernel == "auto"
    from segexec_jax.inference.decode import decode_kernel
    from segexec_jax.model.platform import compiling_for

    assert decode_kernel(cfg) == "xla"
    with compiling_for("gpu"):
        assert decode_kernel(cfg) == "pallas"
        assert decode_kernel(tiny(*SEG, "inference.decode_kernel=xla")) == "xla"
    with compiling_for("tpu"):
        assert decode_kernel(cfg) == "pallas"


def test_bad_settings_name_the_key():
    for over in (["inference.decode_kernel=triton"], ["inference.decode_kernel=pallas", "attention.mode=streaming"],
                 ["inference.decode_kernel=pallas", "model.dtype=float64"]):
        with pytest.raises(ConfigError, match="inference.decode_kernel"):
            tiny(*over)


# --------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="the compiled Triton kernel needs a CUDA GPU")
@pytest.mark.parametrize("dtype,rotate", [("float32", True), ("float32", False), ("bfloat16", True), ("int8", True),
                                          ("float8_e4m3fn", True)])
def test_gpu_kernel_compiled_matches_reference(dtype, rotate):
    """The compiled Triton kernel at the 7B head shape (32 KV heads of 128, with and without
    a rope table and prefetch) and at GQA (8 of 4), against the float32 rule (its einsums at HIGHEST: a
    GPU's default float32 dot is TF32; the kernel has no dot, its sums are plain float32)."""
    rng = np.random.default_rng(7)
    inv = inverse_frequencies(128, 10000.0)
    table = da.rope_table(inv, 1400)
    for G, r, rope, prefetch in ((32, 1, None, False), (32, 1, table, True), (8, 4, None, False)):
        part = _part(rng, 2, 3, 1000, G, 128, 2, dtype, rotate, spans=([[0, 0], [3, 500], [0, 0]],
                                                                      [[1000, 1000], [900, 501], [0, 7]]))
        q = jnp.asarray(rng.normal(size=(3, G, r, 128)), jnp.float32)
        f = lambda q, p, rope: da.combine([da.part_attention(q, p, inv, kernel="gpu", interpret=False,
                                                             rope_table=rope, prefetch=prefetch)])
        got = jax.jit(f)(q, part, rope)
        ref = da.combine([da.reference_part(q, part, inv)])
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="the compiled Triton kernel needs a CUDA GPU")
@pytest.mark.parametrize("mode,kv_dtype", [("segmented", None), ("refresh", None), ("full", None),
                                           ("segmented", "int8"), ("full", "int8")])
def test_gpu_pallas_decode_equals_xla_decode(params, mode, kv_dtype):
    extra = [f"inference.kv_dtype={kv_dtype}"] if kv_dtype else []
    lp_x, lp_p = _decode_both(params, tiny(*MODES[mode], *extra, "inference.decode_kernel=xla"),
                              tiny(*MODES[mode], *extra, "inference.decode_kernel=pallas"), steps=12)
    np.testing.assert_allclose(lp_p, lp_x, rtol=0, atol=1e-4)
