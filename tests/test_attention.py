"""Every attention backend against the float32 einsum reference (SPEC §7)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SHARP, pack, random_tokens, tiny

import segexec_jax as sx
from segexec_jax.model.attention import AttentionMask, attend, reference_attention
from segexec_jax.segment.operator import (
    Retrieved,
    Sinks,
    document_starts,
    geometry,
    prefix_view,
    retrieval_view,
    tail_view,
)
from segexec_jax.segment.reference import reference_forward

ON_GPU = jax.default_backend() == "gpu"


def brute_force(q, k, v, q_doc, q_time, k_doc, k_time):
    """One query at a time, in float64: the definition of the mask written out."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, Tq, H, D = q.shape
    G = k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for t in range(Tq):
            vis = [j for j in range(k.shape[1]) if k_doc[b, j] == q_doc[b, t] and k_time[b, j] <= q_time[b, t]]
            for h in range(H):
                g = h // (H // G)
                s = k[b, vis, g] @ q[b, t, h] / np.sqrt(D)
                w = np.exp(s - s.max())
                out[b, t, h] = (w / w.sum()) @ v[b, vis, g]
    return out


def random_qkv(B, Tq, Tk, H, G, D, seed=0, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.normal(size=s), dtype) for s in [(B, Tq, H, D), (B, Tk, G, D), (B, Tk, G, D)])


def prefix_mask(B, P, S, seed=0):
    """[prefix P (time -1, some invalid: doc -1), segment S with two documents]."""
    r = np.random.default_rng(seed)
    q_doc = np.ones((B, S), np.int32)
    q_doc[:, S // 2:] = 2
    q_time = np.tile(np.arange(S, dtype=np.int32), (B, 1))
    p_doc = np.where(r.random((B, P)) < 0.7, 1, -1).astype(np.int32)
    k_doc = np.concatenate([p_doc, q_doc], 1)
    k_time = np.concatenate([np.full((B, P), -1, np.int32), q_time], 1)
    return q_doc, q_time, k_doc, k_time


@pytest.mark.parametrize("H,G", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("backend", ["reference", "xla"])
def test_backends_match_brute_force(backend, H, G):
    B, P, S, D = 2, 5, 9, 8  # query length 9, key length 14
    q, k, v = random_qkv(B, S, P + S, H, G, D)
    masks = prefix_mask(B, P, S)
    out = attend(q, k, v, AttentionMask(*map(jnp.asarray, masks)), backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(out, brute_force(q, k, v, *masks), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "xla", "cudnn"])
def test_plain_causal_flag_equals_explicit_mask(backend, request):
    """The `plain` promise (kind "causal") and the explicit mask it stands for, each against
    the brute force: backends that read the kind take another code path for it (cuDNN's
    causal mode, here run through XLA's kernel on the CPU)."""
    if backend == "cudnn":
        request.getfixturevalue("cudnn_via_xla")
    q, k, v = random_qkv(2, 12, 12, 4, 2, 8)
    doc = np.ones((2, 12), np.int32)
    time = np.tile(np.arange(12, dtype=np.int32), (2, 1))
    expected = brute_force(q, k, v, doc, time, doc, time)
    flagged = AttentionMask.causal(jnp.asarray(doc), plain=True)
    explicit = AttentionMask.causal(jnp.asarray(doc))
    assert (flagged.kind, explicit.kind) == ("causal", "prefix_packed")
    for mask in (flagged, explicit):
        np.testing.assert_allclose(attend(q, k, v, mask, backend), expected, atol=2e-6, rtol=1e-5)


def role_views(S=8, M=3, n=2, R=4, B=2, seg=3, single_doc=False):
    """The masks the segment operator builds for each role at segment `seg`: row 0 packed
    (unless `single_doc`), row 1 one document; 3 of row 0's R retrieved entries valid."""
    T = 5 * S
    row0 = pack([T], S, T) if single_doc else pack([S + 3, 2, 2 * S, 3], S, T)
    doc = jnp.asarray(np.stack([row0, pack([T], S, T)]))
    starts = document_starts(doc)
    geo = geometry(S, M, jnp.int32(seg), doc, starts)
    at = seg * S
    sinks = Sinks(*(jnp.zeros((1, B, n, 1, 4)),) * 2, doc[:, at], starts[:, at])
    prev = doc[:, at - 1] if seg else jnp.full((B,), -1, jnp.int32)
    ret = Retrieved(*(jnp.zeros((1, B, R, 1, 4)),) * 2, jnp.array([3, R], jnp.int32), prev)
    return {
        "tail": tail_view(geo, sinks, M, single_doc),
        "retrieval": retrieval_view(geo, ret, single_doc),
        "segment": prefix_view(geo, jnp.zeros((B, R), bool), single_doc),
    }


@pytest.mark.parametrize("role", ["tail", "retrieval", "segment"])
@pytest.mark.parametrize("backend", ["reference", "xla"])
def test_backends_on_each_role_mask(backend, role):
    view = role_views()[role]
    B, S = view.q_pos.shape
    K = view.k_pos.shape[1]
    q, k, v = random_qkv(B, S, K, 4, 2, 8, seed=3)
    m = view.mask
    out = attend(q, k, v, m, backend)
    np.testing.assert_allclose(out, brute_force(q, k, v, m.q_doc, m.q_time, m.k_doc, m.k_time),
                               atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("seg", [0, 1, 3])
@pytest.mark.parametrize("role", ["tail", "retrieval", "segment"])
def test_prefix_causal_trick_is_exact(role, seg):
    """The cuDNN path for one-document rows (padded queries + penalty dimension), run
    through XLA's causal attention on the CPU in float32, against the reference."""
    from segexec_jax.model.attention import _cudnn_prefix_causal

    view = role_views(seg=seg, single_doc=True)[role]
    B, S = view.q_pos.shape
    q, k, v = random_qkv(B, S, view.k_pos.shape[1], 4, 2, 8, seed=seg)
    fast = _cudnn_prefix_causal(q, k, v, view.mask, implementation="xla")
    np.testing.assert_allclose(fast, reference_attention(q, k, v, view.mask), atol=2e-6, rtol=1e-5)


def test_role_masks_by_hand():
    """Segment 3 (tokens 24..31): row 0's document 3 began at token 16; row 1 is one document."""
    views = role_views()
    tail = views["tail"]
    # prefix = 2 sinks (stored reversed) + 3 tail entries (21..23 in row 0); the sinks
    # (tokens 16, 17 of row 0) lie before the tail window: valid, at positions 0, 1
    np.testing.assert_array_equal(tail.mask.k_doc[:, :5] > 0, [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(tail.k_pos[:, :5], [[1, 0, 2, 3, 4]] * 2)
    np.testing.assert_array_equal(tail.q_pos[0, :4], [5, 6, 7, 8])
    ret = views["retrieval"]  # 3 of row 0's 4 entries valid, the last ones
    np.testing.assert_array_equal(ret.mask.k_doc[:, :4] > 0, [[0, 1, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(ret.k_pos[0, 1:4], [0, 1, 2])
    assert (views["segment"].mask.k_doc[:, :4] == -1).all()
    # At segment 1 the sinks of row 1 (tokens 0, 1) overlap the tail window (5..7) only
    # for S - M <= 1: here both are usable and come first in position.
    early = role_views(seg=1)["tail"]
    np.testing.assert_array_equal(early.k_pos[1, :5], [1, 0, 2, 3, 4])


@pytest.mark.parametrize("backend", ["reference", "xla"])
def test_segmented_model_same_under_every_backend(backend):
    """The whole operator (every role, packed documents) with each backend in float32, against
    the per-token float64 reference (`reference_forward`, which shares no code with it)."""
    cfg = tiny(*SHARP, f"attention.backend={backend}", "segment.len=8", "segment.tail=3",
               "segment.retrieval.budget=4", "segment.retrieval.query_window=4", "segment.sinks=1")
    params = sx.init_params(cfg, seed=0)
    tokens = random_tokens(2, 37)
    docs = np.stack([pack([4, 13, 3, 9], 8, 37), pack([37], 8, 37)])
    fast = np.asarray(jax.jit(sx.forward, static_argnums=1)(params, cfg, tokens, docs))
    slow = reference_forward(params, cfg, tokens, doc_ids=docs)
    real = docs > 0  # padding positions compute something, but nothing reads them
    assert np.abs(fast - slow)[real].max() < 1e-4


def test_reference_attention_float64(x64):
    q, k, v = random_qkv(1, 6, 9, 2, 1, 4, dtype=jnp.float64)
    masks = prefix_mask(1, 3, 6)
    out = reference_attention(q, k, v, AttentionMask(*map(jnp.asarray, masks)))
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, brute_force(q, k, v, *masks), atol=1e-12)


def test_unknown_backend_is_a_clear_error():
    q, k, v = random_qkv(1, 4, 4, 2, 1, 4)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        attend(q, k, v, AttentionMask.causal(jnp.ones((1, 4), jnp.int32)), "flash")


# --------------------------------------------------------------------------- cuDNN (GPU only)

gpu = pytest.mark.skipif(not ON_GPU, reason="cuDNN flash attention needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("single_doc,seg", [(False, 3), (True, 3), (True, 0)])
@pytest.mark.parametrize("role", ["tail", "retrieval", "segment"])
def test_cudnn_matches_reference_on_role_masks(role, single_doc, seg):
    """Packed rows take the bias path; single-document rows the prefix-causal path."""
    view = role_views(S=128, M=64, n=8, R=64, seg=seg, single_doc=single_doc)[role]
    assert view.mask.kind == ("prefix_causal" if single_doc else "prefix_packed")
    B, S = view.q_pos.shape
    K = view.k_pos.shape[1]
    q, k, v = random_qkv(B, S, K, 8, 2, 128, seed=4, dtype=jnp.bfloat16)
    out = attend(q, k, v, view.mask, "cudnn").astype(jnp.float32)
    ref = reference_attention(q, k, v, view.mask).astype(jnp.float32)
    real = np.asarray(view.mask.q_doc > 0)  # trailing padding may differ on the fast path
    err = float(jnp.linalg.norm((out - ref)[real]) / jnp.linalg.norm(ref[real]))
    assert err < 1e-2, err

    def f(backend):
        return lambda q, k, v: (attend(q, k, v, view.mask, backend).astype(jnp.float32)[real] ** 2).sum()

    for a, b in zip(jax.grad(f("cudnn"), (0, 1, 2))(q, k, v), jax.grad(f("reference"), (0, 1, 2))(q, k, v)):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 2e-2


@pytest.mark.gpu
@gpu
def test_cudnn_plain_causal_and_gradients():
    q, k, v = random_qkv(2, 256, 256, 8, 2, 128, seed=5, dtype=jnp.bfloat16)
    mask = AttentionMask.causal(jnp.ones((2, 256), jnp.int32), plain=True)

    def f(backend):
        return lambda q, k, v: attend(q, k, v, mask, backend).astype(jnp.float32).sum()

    out = attend(q, k, v, mask, "cudnn").astype(jnp.float32)
    ref = reference_attention(q, k, v, mask).astype(jnp.float32)
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 1e-2
    g_cudnn = jax.grad(f("cudnn"), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(f("reference"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_cudnn, g_ref):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 2e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_segmented_model_matches_reference_backend(packed):
    over = ["model.dtype=bfloat16", "model.d_model=512", "model.n_heads=4", "model.n_kv_heads=2",
            "segment.len=128", "segment.tail=64", "segment.retrieval.budget=64", "segment.sinks=4",
            "segment.retrieval.query_window=16", "segment.long_heads=[1]"]
    cfg, ref = tiny(*over, "attention.backend=cudnn"), tiny(*over, "attention.backend=reference")
    params = sx.init_params(cfg, seed=0)
    T = 4 * 128 + 40
    tokens = random_tokens(2, T)
    docs = np.stack([pack([100, 200, 60], 128, T), pack([T], 128, T)]) if packed else None
    fwd = jax.jit(sx.forward, static_argnums=1)
    a, b = fwd(params, cfg, tokens, docs), fwd(params, ref, tokens, docs)
    real = np.ones((2, T), bool) if docs is None else docs > 0
    assert float(jnp.linalg.norm((a - b)[real]) / jnp.linalg.norm(b[real])) < 2e-2
    loss = jax.jit(jax.value_and_grad(sx.loss), static_argnums=1)
    (la, ga), (lb, gb) = loss(params, cfg, tokens, None, docs), loss(params, ref, tokens, None, docs)
    assert abs(float(la - lb)) < 2e-2 * abs(float(lb))
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        assert float(jnp.linalg.norm(x - y) / (jnp.linalg.norm(y) + 1e-12)) < 5e-2


@pytest.fixture
def cudnn_via_xla(monkeypatch):
    """Run the cuDNN backend's code (masks, padding, rotations) with XLA's kernel on the CPU."""
    original = jax.nn.dot_product_attention

    def through_xla(*args, implementation=None, **kwargs):
        return original(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", through_xla)


@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_code_path_matches_reference(cudnn_via_xla, packed):
    """Sinks that partly overlap the tail (n + M > S) and retrieval budgets larger than the
    early pool exercise partial prefixes on the one-document fast path."""
    over = [*SHARP, "segment.len=8", "segment.tail=5", "segment.sinks=4", "segment.retrieval.budget=12",
            "segment.retrieval.query_window=4", "segment.long_layers=[0,1]"]
    cfg, ref = tiny(*over, "attention.backend=cudnn"), tiny(*over, "attention.backend=reference")
    params = sx.init_params(cfg, seed=2)
    T = 45
    tokens = random_tokens(2, T, seed=3)
    docs = np.stack([pack([4, 13, 3, 9], 8, T), pack([T], 8, T)]) if packed else None
    fwd = jax.jit(sx.forward, static_argnums=1)
    a, b = np.asarray(fwd(params, cfg, tokens, docs)), np.asarray(fwd(params, ref, tokens, docs))
    real = np.ones((2, T), bool) if docs is None else docs > 0
    assert np.abs(a - b)[real].max() < 1e-4
