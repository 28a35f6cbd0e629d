"""Packed rows (document ids) on the fused cuDNN path: `attention._cudnn_packed`.

On the CPU the packed layout (offsets, lengths, the prefix reordered, zero queries) runs
through `packed_causal_xla`, cuDNN's packed causal attention written out with XLA in float32,
against the einsum reference: random documents, a document continuing from the previous
segment (valid prefix entries), a row with one document, documents of length 1, padding,
more documents than one call holds (the dense fallback). The whole model runs with that
kernel in place of cuDNN's against the reference backend, and the training masks are checked
to take the packed path. On a GPU (`pytest -m gpu`) the real cuDNN call, in bfloat16, against
the reference and the xla backend.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SHARP, pack, random_tokens, tiny

import segexec_jax as sx
from segexec_jax.model import attention
from segexec_jax.model.attention import (
    AttentionMask,
    PackedFallback,
    attend,
    packed_causal_xla,
    packed_layout,
    reference_attention,
)
from segexec_jax.segment.operator import (
    Retrieved,
    Sinks,
    document_runs,
    document_starts,
    geometry,
    prefix_view,
    retrieval_view,
    tail_view,
)

ON_GPU = jax.default_backend() == "gpu"


def packed_mask(rows: list[list[int]], n_valid: list, P: int) -> AttentionMask:
    """A "prefix_packed" mask: row b holds documents of the lengths rows[b] (run ids from
    `document_runs`); its prefix of P entries has
    n_valid[b] entries of the first document: an int (the last ones, as the segment operator
    stores them) or a boolean pattern (any order)."""
    S = sum(rows[0])
    assert all(sum(r) == S for r in rows)
    doc = np.stack([np.repeat(np.arange(1, len(r) + 1), r) for r in rows]).astype(np.int32)
    doc = np.asarray(document_runs(jnp.asarray(doc)))
    valid = np.zeros((len(rows), P), bool)
    for b, nv in enumerate(n_valid):
        if isinstance(nv, (int, np.integer)):
            valid[b, P - nv:] = True
        else:
            valid[b] = nv
    time = np.tile(np.arange(S, dtype=np.int32), (len(rows), 1))
    k_doc = np.concatenate([np.where(valid, doc[:, :1], -1), doc], 1)
    k_time = np.concatenate([np.full(valid.shape, -1, np.int32), time], 1)
    return AttentionMask(*map(jnp.asarray, (doc, time, k_doc, k_time)), kind="prefix_packed")


def random_rows(rng, B: int, S: int, max_docs: int) -> list[list[int]]:
    """Row 0: one document; row 1: documents of length 1 around a longer one; the rest random."""
    rows = [[S], [1, 1, S - 4, 1, 1]]
    while len(rows) < B:
        cuts = np.sort(rng.choice(np.arange(1, S), size=rng.integers(1, max_docs), replace=False))
        rows.append(list(np.diff(np.concatenate([[0], cuts, [S]]))))
    return rows[:B]


def random_qkv(B, Tq, Tk, H, G, D, seed=0, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.normal(size=s), dtype) for s in [(B, Tq, H, D), (B, Tk, G, D), (B, Tk, G, D)])


def packed(max_docs=None, implementation="xla"):
    return lambda q, k, v, mask: attention._cudnn_packed(q, k, v, mask, implementation, max_docs)


def assert_close_with_grads(fast, slow, q, k, v, mask, atol=2e-6, grad_atol=2e-5):
    """Outputs and gradients (under a generic cotangent) of fast and slow, jitted."""
    w = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), q.dtype)

    @functools.partial(jax.jit, static_argnums=4)
    def value_and_grads(q, k, v, mask, f):
        out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, mask), q, k, v)
        return out, vjp(w)

    (out_a, grads_a), (out_b, grads_b) = (value_and_grads(q, k, v, mask, f) for f in (fast, slow))
    np.testing.assert_allclose(out_a, out_b, atol=atol, rtol=1e-5)
    for a, b in zip(grads_a, grads_b):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(a, b, atol=grad_atol, rtol=1e-4)


# --------------------------------------------------------------------------- the layout


def test_layout_by_hand():
    # row 0: prefix of 4 with entries 1 and 3 valid; documents of 3, 1, 2 tokens
    # row 1: the whole prefix valid; one document
    mask = packed_mask([[3, 1, 2], [6]], [np.array([0, 1, 0, 1], bool), 4], P=4)
    lay = packed_layout(mask, max_docs=3)
    np.testing.assert_array_equal(lay.order, [[0, 2, 1, 3], [0, 1, 2, 3]])
    # sequences: invalid prefix [0, 2), first document with its 2 prefix entries [2, 7),
    # then [7, 8), [8, 10); row 1: no invalid entry, one sequence over all 10 slots
    np.testing.assert_array_equal(lay.offset, [[0, 2, 7, 8, -1], [-1, 0, -1, -1, -1]])
    np.testing.assert_array_equal(lay.length, [[2, 5, 1, 2], [-1, 10, -1, -1]])
    assert not lay.overflow
    assert packed_layout(mask, max_docs=2).overflow


@pytest.mark.parametrize("P", [0, 1, 7])
def test_every_slot_in_exactly_one_sequence(P):
    """cuDNN leaves the outputs and gradients of uncovered slots undefined: the layout covers
    every slot of [prefix, queries], each once, in sequences that are contiguous runs."""
    rng = np.random.default_rng(P)
    rows = random_rows(rng, 6, 17, 6)
    n_valid = [int(x) for x in rng.integers(0, P + 1, len(rows))]
    lay = packed_layout(packed_mask(rows, n_valid, P), max_docs=8)
    for b in range(len(rows)):
        cover = np.zeros(P + 17, int)
        for off, ln in zip(np.asarray(lay.offset[b, :-1]), np.asarray(lay.length[b])):
            assert (off < 0) == (ln < 0) and ln != 0
            if ln > 0:
                cover[off:off + ln] += 1
        assert (cover == 1).all(), (b, cover)


# --------------------------------------------------------------------------- the path, float32


@pytest.mark.parametrize("H,G", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("P", [0, 5, 16])
def test_packed_path_matches_reference(P, H, G):
    """Random documents (one per row, length 1, many), prefixes fully, partly or not valid,
    in the operator's order (valid last) or any order, against the einsum reference."""
    rng = np.random.default_rng(P + H)
    S, B, D = 24, 6, 8
    rows = random_rows(rng, B, S, 8)
    n_valid = [P, 0, int(rng.integers(0, P + 1)), rng.random(P) < 0.5, P // 2, rng.random(P) < 0.2]
    mask = packed_mask(rows, n_valid, P)
    q, k, v = random_qkv(B, S, P + S, H, G, D, seed=P)
    assert_close_with_grads(packed(max_docs=8), reference_attention, q, k, v, mask)


def test_row_with_more_documents_takes_the_dense_path_exactly():
    rows = [[2] * 6, [12]]  # 6 documents in row 0
    mask = packed_mask(rows, [3, 1], P=4)
    q, k, v = random_qkv(2, 12, 16, 4, 2, 8, seed=1)
    for max_docs in (5, 6, 12):  # dense, packed, packed without a cond
        assert_close_with_grads(packed(max_docs), reference_attention, q, k, v, mask)
    assert bool(packed_layout(mask, 5).overflow) and not bool(packed_layout(mask, 6).overflow)


def test_packed_off_takes_the_dense_path(monkeypatch):
    monkeypatch.setattr(attention, "PACKED_MAX_DOCS", 0)
    mask = packed_mask([[3, 9]], [2], P=3)
    q, k, v = random_qkv(1, 12, 15, 2, 1, 8)
    np.testing.assert_allclose(packed()(q, k, v, mask), reference_attention(q, k, v, mask), atol=2e-6)


def test_uncovered_slots_are_poisoned():
    """The kernel's twin makes what cuDNN leaves undefined NaN (so the tests above would see a
    layout that leaves slots uncovered)."""
    q, k, v = random_qkv(1, 6, 6, 2, 1, 4)
    length = jnp.array([[3, -1]], jnp.int32)  # slots 3..5 in no sequence
    offset = jnp.array([[0, -1, -1]], jnp.int32)
    out = packed_causal_xla(q, k, v, length, offset)
    assert np.isfinite(out[0, :3]).all() and np.isnan(out[0, 3:]).all()
    dk = jax.grad(lambda k: packed_causal_xla(q, k, v, length, offset)[:, :3].sum())(k)
    assert np.isfinite(dk[0, :3]).all() and np.isnan(dk[0, 3:]).all()


def operator_views(S=8, M=3, n=2, R=4, seg=3):
    """Views the segment operator builds at segment `seg` of packed rows (SPEC §2 packing):
    row 0's document 2 spans the boundary into this segment (valid tail, sinks, retrieved),
    then documents of 1 and 2 tokens; row 1 one document; row 2 a segment starting with a
    new document."""
    T = 5 * S
    doc = jnp.asarray(np.stack([pack([S + 3, S + 5, 1, 2], S, T), pack([T], S, T), pack([3 * S, 5, 1], S, T)]))
    doc = document_runs(doc)
    B = doc.shape[0]
    starts = document_starts(doc)
    geo = geometry(S, M, jnp.int32(seg), doc, starts)
    at = seg * S
    sinks = Sinks(*(jnp.zeros((1, B, n, 1, 4)),) * 2, doc[:, at - 1], starts[:, at - 1])
    ret = Retrieved(*(jnp.zeros((1, B, R, 1, 4)),) * 2, jnp.array([3, R, 2], jnp.int32), doc[:, at - 1])
    views = {
        "tail": tail_view(geo, sinks, M),
        "sinks_only": tail_view(geo, sinks, M, sees=("sinks",)),  # valid entries not last
        "retrieval": retrieval_view(geo, ret),
        "segment": prefix_view(geo, jnp.zeros((B, R), bool), False),
    }
    assert all(v.mask.kind == "prefix_packed" for v in views.values())
    return views


@pytest.mark.parametrize("role", ["tail", "sinks_only", "retrieval", "segment"])
def test_packed_path_on_operator_views(role):
    view = operator_views()[role]
    m = view.mask
    assert (np.asarray(m.k_doc)[:, : m.k_doc.shape[1] - m.q_doc.shape[1]] >= 0).any() or role == "segment"
    q, k, v = random_qkv(*m.q_doc.shape, m.k_doc.shape[1], 4, 2, 8, seed=5)
    assert_close_with_grads(packed(), reference_attention, q, k, v, m)


# --------------------------------------------------------------------------- the model


@pytest.fixture
def packed_via_xla(monkeypatch):
    """The cuDNN backend's code on the CPU: XLA's kernels for cuDNN's (the packed twin for the
    packed call, XLA's attention for the causal and dense-bias calls)."""
    original = jax.nn.dot_product_attention

    def through_xla(*args, implementation=None, **kwargs):
        return original(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", through_xla)
    monkeypatch.setattr(attention, "_packed_kernel", lambda implementation: (packed_causal_xla, None))


def model_inputs(T=45, S=8):
    docs = np.stack([pack([4, 13, 1, 1, 3, 9], S, T), pack([T], S, T), pack([2 * S, 5, 1, 6], S, T)])
    return random_tokens(3, T, seed=3), docs


OVER = [*SHARP, "segment.len=8", "segment.tail=5", "segment.sinks=2", "segment.retrieval.budget=6",
        "segment.retrieval.query_window=4", "segment.long_layers=[0]"]


# segmented, max_docs 2: the calls of segment 2 (4 and 3 documents in rows 0 and 2) take
# the cond's dense branch, those of the other segments the packed path
@pytest.mark.parametrize("mode,max_docs", [("segmented", 2), ("full", 16)])
def test_model_with_packed_path_matches_reference(packed_via_xla, monkeypatch, mode, max_docs):
    """Training loss and gradients (every role, sinks, retrieval, K = 1) through the packed
    path, its kernel's float32 twin in place of cuDNN's, against the reference backend."""
    monkeypatch.setattr(attention, "PACKED_MAX_DOCS", max_docs)
    over = [*OVER, f"attention.mode={mode}"]
    cfg, ref = tiny(*over, "attention.backend=cudnn"), tiny(*over, "attention.backend=reference")
    params = sx.init_params(cfg, seed=2)
    tokens, docs = model_inputs()
    grad = jax.jit(jax.value_and_grad(sx.loss), static_argnums=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PackedFallback)
        la, ga = grad(params, cfg, tokens, None, docs)
    lb, gb = grad(params, ref, tokens, None, docs)
    assert abs(float(la - lb)) < 1e-5
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        assert float(jnp.abs(x - y).max()) <= 1e-4 * float(jnp.abs(y).max()) + 1e-7


@pytest.mark.parametrize("mode", ["segmented", "full"])
def test_training_masks_take_the_packed_path(monkeypatch, mode):
    """What `train.py` computes (loss and gradients on rows with document ids) sends every
    attention call of the cuDNN backend to the packed path, none to the dense bias; rows
    without ids keep the one-document kernels."""
    calls = []

    def spy(name):
        def f(q, k, v, mask, *args, **kwargs):
            calls.append((name, mask.kind))
            return reference_attention(q, k, v, mask)
        return f

    monkeypatch.setattr(attention, "_cudnn_packed", spy("packed"))
    monkeypatch.setattr(attention, "_cudnn_dense", spy("dense"))
    monkeypatch.setattr(attention, "_cudnn_prefix_causal", spy("prefix_causal"))
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda q, k, v, *a, is_causal=False, **kw: calls.append(("causal", is_causal)) or q)
    cfg = tiny(*OVER, f"attention.mode={mode}", "attention.backend=cudnn", "model.dtype=bfloat16")
    params = sx.init_params(cfg, seed=0)
    tokens, docs = model_inputs()
    value_and_grad = jax.value_and_grad(sx.loss)
    jax.eval_shape(lambda p, t, d: value_and_grad(p, cfg, t, None, d), params, tokens, docs)
    assert calls and {c for c in calls} == {("packed", "prefix_packed")}, set(calls)
    calls.clear()
    jax.eval_shape(lambda p, t: value_and_grad(p, cfg, t), params, tokens)
    assert calls and all(name in ("causal", "prefix_causal") for name, _ in calls), set(calls)


def test_without_packed_layout_warns_and_stays_exact(monkeypatch):
    """A jax without the packed layout (or not on a Hopper GPU) runs the dense-bias path."""
    original = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, implementation=None, **kw: original(*a, implementation="xla", **kw))
    monkeypatch.setattr(attention, "_cudnn_packed_api", lambda: (None, "no packed layout in this jax"))
    mask = packed_mask([[5, 7]], [2], P=3)
    q, k, v = random_qkv(1, 12, 15, 4, 2, 8)
    with pytest.warns(PackedFallback, match="no packed layout in this jax"):
        out = attend(q, k, v, mask, "cudnn")
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask), atol=2e-6)


# --------------------------------------------------------------------------- cuDNN (GPU only)

gpu = pytest.mark.skipif(not ON_GPU, reason="cuDNN's packed layout needs a CUDA GPU (Hopper or newer)")


def rel(a, b) -> float:
    a, b = (jnp.asarray(x, jnp.float32) for x in (a, b))
    return float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + 1e-30))


def cudnn_against_reference(mask, H=8, G=2, D=128, seed=4, max_docs=None):
    B, S = mask.q_doc.shape
    q, k, v = random_qkv(B, S, mask.k_doc.shape[1], H, G, D, seed=seed, dtype=jnp.bfloat16)
    w = jnp.asarray(np.random.default_rng(seed).normal(size=q.shape), jnp.float32)
    fast = lambda q, k, v: attention._cudnn_packed(q, k, v, mask, "cudnn", max_docs)
    slow = lambda q, k, v: reference_attention(q, k, v, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PackedFallback)  # the packed call itself, not a fallback
        out = jax.jit(fast)(q, k, v)
        grads = jax.jit(jax.grad(lambda q, k, v: (fast(q, k, v).astype(jnp.float32) * w).sum(), (0, 1, 2)))(q, k, v)
    assert rel(out, slow(q, k, v)) < 1e-2
    ref = jax.grad(lambda q, k, v: (slow(q, k, v).astype(jnp.float32) * w).sum(), (0, 1, 2))(q, k, v)
    for a, b in zip(grads, ref):
        assert np.isfinite(np.asarray(a, np.float32)).all()
        assert rel(a, b) < 2e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("P", [0, 96])
def test_cudnn_packed_matches_reference(P):
    rng = np.random.default_rng(P)
    rows = random_rows(rng, 4, 256, 12)
    n_valid = [P, 0, P // 3, rng.random(P) < 0.5]
    cudnn_against_reference(packed_mask(rows, n_valid, P))


@pytest.mark.gpu
@gpu
def test_cudnn_packed_overflow_takes_the_dense_path():
    rows = [[32] * 8, [256]]
    cudnn_against_reference(packed_mask(rows, [40, 0], 64), max_docs=4)


@pytest.mark.gpu
@gpu
@pytest.mark.xfail(strict=False, reason="jax 0.10 scales packed key offsets by the query heads; "
                   "XPASS: this jax reads GQA offsets right (SEGEXEC_PACKED_NATIVE_GQA=1 saves the repeat)")
def test_cudnn_packed_native_gqa(monkeypatch):
    monkeypatch.setattr(attention, "PACKED_NATIVE_GQA", True)
    rows = [[100, 1, 155], [256]]
    cudnn_against_reference(packed_mask(rows, [50, 64], 64))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", ["segmented", "full"])
def test_cudnn_training_with_doc_ids_matches_xla_backend(mode):
    """Loss and gradients of packed rows in bfloat16: the cuDNN backend (packed path) against
    the xla backend (dense mask), segments spanning documents included."""
    over = ["model.dtype=bfloat16", "model.d_model=512", "model.n_heads=4", "model.n_kv_heads=2",
            "segment.len=128", "segment.tail=64", "segment.retrieval.budget=64", "segment.sinks=4",
            "segment.retrieval.query_window=16", "segment.long_heads=[1]", f"attention.mode={mode}"]
    cfg, ref = tiny(*over, "attention.backend=cudnn"), tiny(*over, "attention.backend=xla")
    params = sx.init_params(cfg, seed=0)
    T = 4 * 128 + 40
    tokens = random_tokens(2, T)
    docs = np.stack([pack([100, 1, 200, 60, 3], 128, T), pack([40, T - 40], 128, T)])
    loss = jax.jit(jax.value_and_grad(sx.loss), static_argnums=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PackedFallback)
        la, ga = loss(params, cfg, tokens, None, docs)
    lb, gb = loss(params, ref, tokens, None, docs)
    assert abs(float(la - lb)) < 2e-2 * abs(float(lb))
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        assert rel(x, y) < 5e-2
