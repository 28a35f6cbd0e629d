"""The segmented forward against the per-token reference (SPEC §2, §7)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import F64, SHARP, max_abs_diff, pack, random_tokens, tiny

import segexec_jax as sx
from segexec_jax.segment.reference import reference_forward
from segexec_jax.segment.roles import RETRIEVAL, SEGMENT, TAIL, role_plan

forward = jax.jit(sx.forward, static_argnums=1)


def seg(S, M, R=0, policy="topk", sinks=0, window=4, block=4, extra=()):
    return [f"segment.len={S}", f"segment.tail={M}", f"segment.retrieval.budget={R}",
            f"segment.retrieval.policy={policy}", f"segment.sinks={sinks}",
            f"segment.retrieval.query_window={window}", f"segment.retrieval.block_size={block}",
            *extra]


# Every role and retrieval policy; several S, M, R; lengths that end mid-segment.
CASES = {
    "topk": (seg(8, 3, 5), 45),
    "topk_sinks": (seg(8, 3, 5, sinks=2), 45),
    "topk_block": (seg(8, 8, 8, "topk_block", block=4), 37),
    "all": (seg(8, 2, 0, "all"), 30),
    "none": (seg(8, 4, 4, "none"), 29),
    "short_S_M_equals_S": (seg(4, 4, 3, window=2), 23),
    "no_tail": (seg(6, 0, 4, sinks=1, window=3), 26),
    "R_beyond_pool": (seg(16, 5, 40, window=16), 40),
    "two_long_heads_map": (seg(8, 3, 6, extra=["segment.long_layers=[0,1]",
                                               "segment.long_heads={0: [0, 1], 1: [1]}"]), 34),
    "all_heads_long": (seg(8, 3, 4, extra=["segment.long_heads=[0,1]"]), 27),
    "scattered_long_heads": (seg(8, 3, 4, extra=["model.n_kv_heads=4", "segment.long_heads=[0,2]",
                                                 "segment.long_layers=[0]"]), 27),
    "no_long_heads": (seg(8, 3, 4, extra=["segment.long_heads=[]"]), 27),
    "untied_gqa4": (seg(8, 3, 4, extra=["model.tie_embeddings=false", "model.n_kv_heads=1",
                                        "segment.long_heads=[0]"]), 27),
    # query-aware variant: every chunk of r tokens selects again with the window before it
    "refresh": (seg(8, 3, 5, window=2, extra=["segment.retrieval.refresh=4"]), 45),
    "refresh_every_2_sinks_map": (seg(8, 3, 4, window=2, sinks=2, extra=[
        "segment.retrieval.refresh=2", "segment.long_layers=[0,1]", "segment.long_heads={0: [0, 1], 1: [1]}"]), 37),
    "refresh_topk_block": (seg(8, 8, 8, "topk_block", block=4, window=4, extra=["segment.retrieval.refresh=4"]), 37),
}


@pytest.mark.parametrize("name", list(CASES))
def test_segmented_forward_matches_per_token_reference(x64, name):
    overrides, T = CASES[name]
    cfg = tiny(*F64, *SHARP, "attention.backend=reference", *overrides)
    params = sx.init_params(cfg, seed=1)
    tokens = random_tokens(2, T, seed=2)
    fast = forward(params, cfg, tokens)
    slow = reference_forward(params, cfg, tokens)
    assert fast.shape == (2, T, 256) and fast.dtype == jnp.float64
    assert max_abs_diff(fast, slow) < 1e-9


@pytest.mark.parametrize("name", ["topk_sinks", "topk_block", "all", "refresh_every_2_sinks_map"])
def test_packed_documents_match_reference(x64, name):
    overrides, _ = CASES[name]
    cfg = tiny(*F64, *SHARP, "attention.backend=reference", *overrides)
    S = cfg.segment.len
    T = 6 * S + 3
    docs = np.stack([pack([S, 3, 4, 2 * S + 4, 2, 5], S, T), pack([T], S, T)])
    params = sx.init_params(cfg, seed=3)
    tokens = random_tokens(2, T, seed=4)
    fast = forward(params, cfg, tokens, doc_ids=docs)
    slow = reference_forward(params, cfg, tokens, doc_ids=docs)
    real = docs > 0  # padding positions compute something, but nothing reads them
    assert np.abs(np.asarray(fast) - slow)[real].max() < 1e-9


def test_packed_document_equals_document_alone(x64):
    """Every document sees, token for token, what it would see alone (SPEC §2)."""
    cfg = tiny(*F64, *SHARP, *seg(8, 3, 5, sinks=2))
    S = cfg.segment.len
    lengths = [5, 2 * S + 3, 3, S, 6]
    T = 7 * S
    doc = pack(lengths, S, T)
    tokens = random_tokens(1, T, seed=5)
    params = sx.init_params(cfg, seed=6)
    packed = np.asarray(forward(params, cfg, tokens, doc_ids=doc[None]))
    for d in range(1, len(lengths) + 1):
        where = np.flatnonzero(doc == d)
        alone = np.asarray(forward(params, cfg, tokens[:, where]))
        assert np.abs(packed[0, where] - alone[0]).max() < 1e-10, d


def test_full_mode_matches_reference(x64):
    cfg = tiny(*F64, *SHARP, "attention.mode=full", "attention.backend=reference")
    params = sx.init_params(cfg, seed=1)
    tokens = random_tokens(2, 21)
    docs = np.stack([pack([5, 9, 7], 64, 21), pack([21], 64, 21)])
    assert max_abs_diff(forward(params, cfg, tokens, doc_ids=docs),
                        reference_forward(params, cfg, tokens, doc_ids=docs)) < 1e-9


@pytest.mark.parametrize("backend", ["reference", "xla"])
def test_one_segment_equals_full(x64, backend):
    """S >= T: one segment, no prefix: exactly causal attention."""
    base = [*F64, *SHARP, f"attention.backend={backend}", "segment.sinks=2"]
    segmented = tiny(*base, "segment.len=64")
    full = tiny(*base, "attention.mode=full")
    params = sx.init_params(segmented, seed=0)
    tokens = random_tokens(3, 50)
    assert max_abs_diff(forward(params, segmented, tokens), forward(params, full, tokens)) < 1e-10


def test_one_segment_equals_full_float32():
    segmented = tiny(*SHARP, "attention.backend=xla", "segment.len=64")
    full = tiny(*SHARP, "attention.backend=xla", "attention.mode=full")
    params = sx.init_params(segmented, seed=0)
    tokens = random_tokens(3, 50)
    assert max_abs_diff(forward(params, segmented, tokens), forward(params, full, tokens)) < 1e-4


def test_segment_role_with_unit_segments_sees_only_itself():
    """Every head `segment` and S = 1: each token's logits depend on that token alone."""
    cfg = tiny(*SHARP, "segment.len=1", "segment.tail=0", "segment.long_heads=[0,1]",
               "segment.long_layers=[]", "segment.retrieval.query_window=1")
    assert (role_plan(cfg).roles == SEGMENT).all()
    params = sx.init_params(cfg, seed=0)
    tokens = random_tokens(2, 12)
    together = forward(params, cfg, tokens)
    for t in range(12):
        alone = forward(params, cfg, tokens[:, t:t + 1])
        np.testing.assert_allclose(together[:, t], alone[:, 0], atol=1e-5, rtol=1e-5)
    # ...while with a one-token tail each layer reaches one token further back: with L
    # layers, token t depends on tokens t-L..t and on nothing earlier.
    tail = tiny(*SHARP, "segment.len=1", "segment.tail=1", "segment.long_heads=[]",
                "segment.retrieval.query_window=1")
    L = tail.model.n_layers
    changed = tokens.copy()
    changed[:, 5] = (changed[:, 5] + 1) % 256
    a, b = forward(params, tail, tokens), forward(params, tail, changed)
    for t in range(6, 6 + L):
        assert np.abs(a[:, t] - b[:, t]).max() > 1e-3
    np.testing.assert_allclose(a[:, 6 + L:], b[:, 6 + L:], atol=1e-5)


def test_role_table():
    cfg = tiny("model.n_layers=3", "model.n_kv_heads=4", "segment.long_layers=[1]",
               "segment.long_heads={1: [2, 3], 2: [0]}")
    roles = role_plan(cfg).roles
    np.testing.assert_array_equal(roles, [[TAIL] * 4, [TAIL, TAIL, RETRIEVAL, RETRIEVAL],
                                          [SEGMENT, TAIL, TAIL, TAIL]])


def test_positions_never_exceed_window():
    """No extrapolation: window positions stay below S + max(M + sinks, R) at any length."""
    from segexec_jax.segment.operator import Sinks, document_starts, geometry, tail_view

    S, M, n = 8, 3, 2
    T = 20 * S
    doc = jnp.ones((1, T), jnp.int32)
    starts = document_starts(doc)
    sinks = Sinks(jnp.zeros((1, 1, n, 1, 2)), jnp.zeros((1, 1, n, 1, 2)), jnp.ones((1,), jnp.int32),
                  jnp.zeros((1,), jnp.int32))
    for s in range(20):
        view = tail_view(geometry(S, M, jnp.int32(s), doc, starts), sinks, M)
        assert int(view.k_pos.max()) == int(view.q_pos.max()) == (S - 1 + (n + M if s else 0))


@pytest.mark.parametrize("backend", ["xla", "reference"])
def test_no_token_sees_the_future(backend):
    """Changing tokens after position p changes no logit at positions <= p."""
    cfg = tiny(*SHARP, f"attention.backend={backend}", "segment.len=16", "segment.tail=4",
               "segment.sinks=2", "segment.retrieval.budget=8", "segment.retrieval.query_window=4",
               "segment.long_layers=[0,1]")
    params = sx.init_params(cfg, seed=0)
    T = 100
    tokens = random_tokens(1, T, seed=1)
    base = np.asarray(forward(params, cfg, tokens))
    for p in [3, 15, 16, 40, 77]:
        changed = tokens.copy()
        changed[:, p + 1:] = random_tokens(1, T - p - 1, seed=p)
        out = np.asarray(forward(params, cfg, changed))
        np.testing.assert_array_equal(out[:, :p + 1], base[:, :p + 1])
        assert np.abs(out[:, p + 1:] - base[:, p + 1:]).max() > 1e-3
