"""The splash backend (Pallas TPU kernels) against the float32 reference, run on the CPU in
Pallas interpret mode: every mask kind, GQA, bf16, gradients, the explicit xla fallback of
"general" masks, the whole model in segmented and full mode, and the kernel run per device
under `shard_map` on a device mesh."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SHARP, pack, random_tokens, tiny
from jax.sharding import NamedSharding

import segexec_jax as sx
from segexec_jax.model import attention, splash
from segexec_jax.model.attention import (
    AttentionMask,
    attend,
    reference_attention,
    resolve_backend,
)
from segexec_jax.model.sharding import MESH_AXES, spec
from segexec_jax.model.transformer import param_shardings


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    """Off a TPU the kernels run only when interpret mode is asked for."""
    monkeypatch.setattr(splash, "INTERPRET", True)


def random_qkv(B, Tq, Tk, H, G, D=16, seed=0, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.normal(size=s), dtype) for s in [(B, Tq, H, D), (B, Tk, G, D), (B, Tk, G, D)])


def prefix_mask(seg_doc: np.ndarray, prefix_valid: np.ndarray, kind: str) -> AttentionMask:
    """Keys [prefix P (time -1), the queries' own tokens]: the layout of `segment.prefix_view`.
    Valid prefix entries belong to the row's first document; invalid ones take document -1."""
    B, S = seg_doc.shape
    q_time = np.tile(np.arange(S, dtype=np.int32), (B, 1))
    k_doc = np.concatenate([np.where(prefix_valid, seg_doc[:, :1], -1), seg_doc], 1).astype(np.int32)
    k_time = np.concatenate([np.full(prefix_valid.shape, -1, np.int32), q_time], 1)
    return AttentionMask(*map(jnp.asarray, (seg_doc.astype(np.int32), q_time, k_doc, k_time)), kind=kind)


def one_document(B, S, P, invalid=(0, 0), pad=(0, 0)) -> AttentionMask:
    """"prefix_causal": row b has `invalid[b]` invalid prefix entries first and `pad[b]`
    padding tokens (document 0) at the end of the segment."""
    doc = np.ones((B, S), np.int32)
    for b in range(B):
        doc[b, S - pad[b]:] = 0
    valid = np.arange(P)[None] >= np.asarray(invalid)[:, None]
    return prefix_mask(doc, valid, "prefix_causal")


def packed(B, S, P, seed=0) -> AttentionMask:
    """"prefix_packed": documents of random lengths in the segment, a random valid prefix."""
    r = np.random.default_rng(seed)
    doc = np.sort(r.integers(1, 5, (B, S)), axis=1)  # runs of equal ids: packed documents
    return prefix_mask(doc, r.random((B, P)) < 0.6, "prefix_packed")


splash_jit = jax.jit(lambda q, k, v, mask: attend(q, k, v, mask, "splash"))


def check(q, k, v, mask, atol=1e-5):
    out = splash_jit(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask), atol=atol, rtol=1e-5)


# --------------------------------------------------------------------------- each mask kind


@pytest.mark.parametrize("H,G", [(4, 2), (6, 1)])
def test_plain_causal(H, G):
    T = 200  # padded to 256
    q, k, v = random_qkv(2, T, T, H, G)
    check(q, k, v, AttentionMask.causal(jnp.ones((2, T), jnp.int32), plain=True))


def test_prefix_causal_with_invalid_prefix_entries():
    """Row 0: 11 of 40 prefix entries invalid and 23 padding tokens; row 1: all valid."""
    q, k, v = random_qkv(2, 150, 190, 4, 2, seed=1)
    check(q, k, v, one_document(2, 150, 40, invalid=(11, 0), pad=(23, 0)))


def test_prefix_causal_empty_prefix():
    """The `segment` role: every prefix entry invalid (prefix of 16, block-misaligned)."""
    q, k, v = random_qkv(2, 128, 144, 4, 2, seed=2)
    check(q, k, v, one_document(2, 128, 16, invalid=(16, 16)))


@pytest.mark.parametrize("H,G,P", [(4, 2, 60), (8, 2, 0), (3, 3, 128)])
def test_packed_documents(H, G, P):
    """Several documents per row, with (P > 0, the segment operator) or without (P = 0, full
    mode) a prefix; P = 128 keeps the diagonal block-aligned."""
    q, k, v = random_qkv(2, 180, 180 + P, H, G, seed=3)
    check(q, k, v, packed(2, 180, P, seed=P))


def test_full_mode_packed_mask():
    doc = jnp.asarray(np.stack([pack([50, 20, 90], 64, 250), pack([250], 64, 250)]))
    mask = AttentionMask.causal(doc)
    assert mask.kind == "prefix_packed"
    q, k, v = random_qkv(2, 250, 250, 4, 2, seed=4)
    check(q, k, v, mask)


def test_long_blocks():
    """Padded lengths 640 and 1024: blocks of 128 and 512 (the largest dividing each)."""
    assert (splash._block(640), splash._block(1024), splash._block(768)) == (128, 512, 256)
    q, k, v = random_qkv(1, 600, 1000, 2, 1, seed=5)
    check(q, k, v, packed(1, 600, 400, seed=5))


def test_bfloat16():
    """bf16 in and out; the kernel rounds its softmax weights to bf16 like the output, so the
    bound is bf16-sized (as for cuDNN), relative to the float32 reference on the same inputs."""
    q, k, v = random_qkv(2, 150, 210, 8, 2, seed=6, dtype=jnp.bfloat16)
    mask = packed(2, 150, 60, seed=6)
    out = splash_jit(q, k, v, mask)
    assert out.dtype == jnp.bfloat16
    ref = reference_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask)
    err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    assert err < 1e-2, err


def test_gradients_match_reference():
    q, k, v = random_qkv(2, 150, 200, 4, 2, seed=7)
    mask = packed(2, 150, 50, seed=7)
    w = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), jnp.float32)

    def grads(backend):
        f = lambda q, k, v: (attend(q, k, v, mask, backend) * w).sum()
        return jax.jit(jax.grad(f, (0, 1, 2)))(q, k, v)

    for a, b in zip(grads("splash"), grads("reference")):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- fallback, errors, config


def test_general_mask_falls_back_to_xla(monkeypatch):
    """A chunk of the `refresh` attention: queries at times 32..63 of the segment over
    [R = 8 retrieved, the segment's 64 keys]. No static splash mask says that: xla runs it,
    and says so."""
    S, R, r = 64, 8, 32
    q_time = jnp.broadcast_to(jnp.arange(r, 2 * r, dtype=jnp.int32), (2, r))
    k_time = jnp.broadcast_to(jnp.concatenate([jnp.full((R,), -1, jnp.int32), jnp.arange(S, dtype=jnp.int32)]),
                              (2, R + S))
    mask = AttentionMask(jnp.ones((2, r), jnp.int32), q_time, jnp.ones((2, R + S), jnp.int32), k_time)
    assert mask.kind == "general" and not splash.takes(mask)

    def no_kernel(*args, **kwargs):
        raise AssertionError("the splash kernel must not run on a general mask")

    monkeypatch.setattr(splash, "splash_attention", no_kernel)
    q, k, v = random_qkv(2, r, R + S, 4, 2, seed=8)
    with pytest.warns(splash.SplashFallback, match="'general' mask .* runs on the xla backend"):
        out = attend(q, k, v, mask, "splash")
    np.testing.assert_array_equal(out, attend(q, k, v, mask, "xla"))
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_off_tpu_without_interpret_is_a_clear_error(monkeypatch):
    if jax.default_backend() == "tpu":
        pytest.skip("on a TPU the kernel runs natively")
    monkeypatch.setattr(splash, "INTERPRET", False)
    q, k, v = random_qkv(1, 8, 8, 2, 1)
    with pytest.raises(RuntimeError, match="needs a TPU .* SEGEXEC_SPLASH_INTERPRET=1"):
        attend(q, k, v, AttentionMask.causal(jnp.ones((1, 8), jnp.int32), plain=True), "splash")


def test_float64_is_a_clear_error(x64):
    q, k, v = random_qkv(1, 8, 8, 2, 1, dtype=jnp.float64)
    with pytest.raises(ValueError, match="bfloat16, float16 or float32 inputs, got float64"):
        attend(q, k, v, AttentionMask.causal(jnp.ones((1, 8), jnp.int32), plain=True), "splash")


def test_auto_picks_splash_on_tpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve_backend("auto", jnp.bfloat16) == "splash"
    assert resolve_backend("auto", jnp.float32) == "splash"
    assert resolve_backend("auto", jnp.float64) == "xla"  # splash has no float64 kernel
    assert resolve_backend("xla", jnp.bfloat16) == "xla"
    assert "splash" in attention.BACKENDS


def test_config_accepts_splash():
    assert tiny("attention.backend=splash").attention.backend == "splash"
    with pytest.raises(sx.ConfigError, match="attention.backend"):
        tiny("attention.backend=splashy")


# --------------------------------------------------------------------------- the whole model

SEG = [*SHARP, "segment.len=64", "segment.tail=16", "segment.sinks=2", "segment.retrieval.budget=16",
       "segment.retrieval.query_window=8"]
T = 230
DOCS = np.stack([pack([30, 20, 70, 10, 30], 64, T), pack([T], 64, T)])


def both(*overrides):
    return tiny(*overrides, "attention.backend=splash"), tiny(*overrides, "attention.backend=reference")


def relative_max_diff(a, b, real) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b)[real].max() / np.abs(b[real]).max())


def check_model(overrides, docs, with_loss=False, warns=False):
    """Logits (max difference relative to the largest logit) and, `with_loss`, L_K."""
    cfg, ref = both(*overrides)
    params = sx.init_params(cfg, seed=0)
    tokens = random_tokens(2, T)
    fwd = jax.jit(sx.forward, static_argnums=1)
    with warnings_expected(warns):
        a = fwd(params, cfg, tokens, docs)
    real = np.ones((2, T), bool) if docs is None else docs > 0
    assert relative_max_diff(a, fwd(params, ref, tokens, docs), real) < 1e-5
    if with_loss:
        loss = jax.jit(sx.loss, static_argnums=1)
        np.testing.assert_allclose(float(loss(params, cfg, tokens, None, docs)),
                                   float(loss(params, ref, tokens, None, docs)), rtol=1e-5)


def warnings_expected(warns: bool):
    return pytest.warns(splash.SplashFallback) if warns else contextlib.nullcontext()


@pytest.mark.parametrize("packed_rows", [True, False])
def test_segmented_model_every_role(packed_rows):
    """Layer 1 group 1 retrieves (long-range layer), layer 0 group 1 is a `segment` head,
    group 0 tail heads with 2 sinks; packed rows take "prefix_packed" masks, one-document
    rows "prefix_causal" ones. (The loss runs the same attention calls: checked once.)"""
    check_model(SEG, DOCS if packed_rows else None, with_loss=packed_rows)


def test_segmented_model_refresh():
    """`refresh` with per-layer long-range heads (both layers retrieve, different groups):
    the chunked long-range attention falls back to xla (with a warning), the tail heads
    stay on splash."""
    over = [*SEG, "segment.retrieval.refresh=16", "segment.long_layers=[0,1]", "segment.long_heads={0: [0], 1: [1]}"]
    check_model(over, DOCS, warns=True)


@pytest.mark.parametrize("packed_rows", [True, False])
def test_full_mode(packed_rows):
    check_model([*SHARP, "attention.mode=full"], DOCS if packed_rows else None, with_loss=packed_rows)


@pytest.mark.slow
def test_segmented_loss_gradient():
    """jax.grad of L_K (K = 1) through the splash kernels' backward pass."""
    cfg, ref = both(*SEG)
    params = sx.init_params(cfg, seed=0)
    tokens = random_tokens(2, T)
    grad = jax.jit(jax.grad(sx.loss), static_argnums=1)
    ga, gb = grad(params, cfg, tokens, None, DOCS), grad(params, ref, tokens, None, DOCS)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        assert float(jnp.abs(x - y).max()) <= 1e-5 * float(jnp.abs(y).max()) + 1e-7


# --------------------------------------------------------------------------- on a device mesh

MESHES = {"data2_tensor2": (2, 1, 2), "data2_fsdp2_tensor2": (2, 2, 2)}


def make_mesh(name):
    shape = MESHES[name]
    return jax.make_mesh(shape, MESH_AXES, devices=jax.devices()[:np.prod(shape)],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)


def on_mesh(mesh, q, k, v, mask):
    """q, k, v and the mask laid out as the model lays them out: rows over the batch axes,
    heads over tensor."""
    put = lambda x, axes: jax.device_put(x, NamedSharding(mesh, spec(axes, x.shape, mesh)))
    rows = lambda x: put(x, ("batch", None))
    return (put(q, ("batch", None, "q_heads", None)), put(k, ("batch", None, "kv_heads", None)),
            put(v, ("batch", None, "kv_heads", None)), jax.tree.map(rows, mask))


@pytest.fixture
def kernel_shapes(monkeypatch):
    """The q shapes the per-device code is traced with."""
    seen, local = [], splash._local

    def recording(q, *args, **kwargs):
        seen.append(q.shape)
        return local(q, *args, **kwargs)

    monkeypatch.setattr(splash, "_local", recording)
    return seen


@pytest.mark.parametrize("mesh_name,B", [("data2_tensor2", 2), ("data2_fsdp2_tensor2", 4)])
def test_sharded_kernel_runs_per_device(mesh_name, B, kernel_shapes):
    """Under `jax.set_mesh` the kernel runs inside a shard_map on each device's rows (B over
    data × fsdp) and heads (4 query heads, 2 KV groups over tensor), and equals the
    reference; XLA could not partition the kernel's custom call itself."""
    mesh = make_mesh(mesh_name)
    q, k, v = random_qkv(B, 100, 140, 4, 2, seed=9)
    mask = packed(B, 100, 40, seed=9)
    with jax.set_mesh(mesh):
        args = on_mesh(mesh, q, k, v, mask)
        hlo = splash_jit.lower(*args).as_text()
        out = splash_jit(*args)
    rows = B // (mesh.shape["data"] * mesh.shape["fsdp"])
    assert kernel_shapes == [(rows, 100, 2, 16)]
    assert "manual_computation" in hlo or "{manual}" in hlo  # Shardy or GSPMD spelling
    assert out.sharding.spec == spec(("batch", None, "q_heads", None), q.shape, mesh)
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_sharded_heads_only_where_tensor_divides_both(kernel_shapes):
    """H = 6 over G = 3 KV groups: tensor = 2 divides the query heads but not the groups, so
    heads stay whole and only the rows split."""
    mesh = make_mesh("data2_tensor2")
    q, k, v = random_qkv(2, 100, 100, 6, 3, seed=10)
    mask = AttentionMask.causal(jnp.ones((2, 100), jnp.int32), plain=True)
    with jax.set_mesh(mesh):
        out = splash_jit(*on_mesh(mesh, q, k, v, mask))
    assert kernel_shapes == [(1, 100, 6, 16)]
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_sharded_gradients_match_reference(kernel_shapes):
    """jax.grad through the shard_map: the kernels' backward pass also runs per device."""
    mesh = make_mesh("data2_fsdp2_tensor2")
    q, k, v = random_qkv(4, 100, 140, 4, 2, seed=11)
    mask = packed(4, 100, 40, seed=11)
    w = jnp.asarray(np.random.default_rng(11).normal(size=q.shape), jnp.float32)

    def grads(backend, q, k, v, mask):
        f = lambda q, k, v: (attend(q, k, v, mask, backend) * w).sum()
        return jax.jit(jax.grad(f, (0, 1, 2)))(q, k, v)

    with jax.set_mesh(mesh):
        sharded = grads("splash", *on_mesh(mesh, q, k, v, mask))
    assert set(kernel_shapes) == {(1, 100, 2, 16)}
    for a, b in zip(sharded, grads("reference", q, k, v, mask)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_kernel_cache_serves_every_mesh():
    """A kernel is built once per shape, here first inside one mesh's shard_map: its tables
    belong to no mesh, so the same kernel then runs under another mesh and under none."""
    splash._kernel.cache_clear()
    q, k, v = random_qkv(4, 100, 100, 4, 2, seed=12)
    mask = AttentionMask.causal(jnp.ones((4, 100), jnp.int32), plain=True)
    ref = reference_attention(q, k, v, mask)
    for name in MESHES:
        mesh = make_mesh(name)
        with jax.set_mesh(mesh):
            np.testing.assert_allclose(splash_jit(*on_mesh(mesh, q, k, v, mask)), ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(splash_jit(q, k, v, mask), ref, atol=1e-5, rtol=1e-5)
    assert splash._kernel.cache_info().misses == 1


def test_sharded_full_mode_model(kernel_shapes):
    """The model's forward in full mode (packed rows) on data = 2, tensor = 2 with sharded
    parameters: every attention call runs on one row and half the heads per device, and the
    logits equal the reference backend's on one device."""
    cfg, ref = both(*SHARP, "attention.mode=full")
    params = sx.init_params(cfg, seed=0)
    tokens = random_tokens(2, T)
    fwd = jax.jit(sx.forward, static_argnums=1)
    mesh = make_mesh("data2_tensor2")
    rows = NamedSharding(mesh, spec(("batch", None), tokens.shape, mesh))
    with jax.set_mesh(mesh):
        a = fwd(jax.device_put(params, param_shardings(cfg, params, mesh)), cfg,
                jax.device_put(tokens, rows), jax.device_put(DOCS, rows))
    assert kernel_shapes and set(kernel_shapes) == {(1, T, cfg.model.n_heads // 2, cfg.model.dim_head)}
    assert relative_max_diff(a, fwd(params, ref, tokens, DOCS), DOCS > 0) < 1e-5
