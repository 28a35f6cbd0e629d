"""Retrieval policies against a plain numpy selection (property-based)."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from segexec_jax.config import RetrievalConfig
from segexec_jax.segment.retrieval import gather, select, width


def numpy_select(policy, budget, block, scores, candidate):
    """Indices R_{i-1} for one (layer, row, group): top scores among candidates, in order."""
    cands = np.flatnonzero(candidate)
    if policy == "all":
        return list(cands)
    if policy == "topk":
        ranked = sorted(cands, key=lambda a: (-scores[a], a))
        return sorted(ranked[:budget])
    C = len(scores)
    blocks = [b for b in range(C // block) if candidate[b * block:(b + 1) * block].all()]
    best = {b: scores[b * block:(b + 1) * block].max() for b in blocks}
    chosen = sorted(sorted(blocks, key=lambda b: (-best[b], b))[: budget // block])
    return [a for b in chosen for a in range(b * block, (b + 1) * block)]


@settings(max_examples=25, deadline=None)
@given(policy=st.sampled_from(["topk", "topk_block", "all"]), blocks=st.integers(1, 6),
       budget_blocks=st.integers(1, 4), seed=st.integers(0, 2**16), density=st.floats(0.0, 1.0))
def test_select_matches_numpy(policy, blocks, budget_blocks, seed, density):
    block = 4
    C, budget = blocks * block, budget_blocks * block
    r = np.random.default_rng(seed)
    Ll, B, Gl, D = 2, 2, 2, 3
    pool_k = r.normal(size=(Ll, B, C, Gl, D)).astype(np.float32)
    query = r.normal(size=(Ll, B, Gl, D)).astype(np.float32)
    candidate = r.random((B, C)) < density
    if policy == "topk_block":  # documents continue in whole blocks in practice; test both
        candidate[0] = np.repeat(r.random(blocks) < density, block)
    rcfg = RetrievalConfig(policy=policy, budget=budget, block_size=block)
    sel = select(rcfg, jnp.asarray(pool_k), jnp.asarray(query), jnp.asarray(candidate))
    R = width(rcfg, C)
    assert sel.index.shape == (Ll, B, Gl, R)
    all_scores = np.asarray(jnp.einsum("lbgd,lbcgd->lbgc", query, pool_k))  # same rounding as select
    for l in range(Ll):
        for b in range(B):
            for g in range(Gl):
                scores = all_scores[l, b, g]
                want = numpy_select(policy, budget, block, scores, candidate[b])
                count = int(sel.count[b])
                assert count == len(want)
                got = np.asarray(sel.index[l, b, g])
                assert list(got[R - count:]) == want  # valid entries last, in pool order
    picked = gather(jnp.asarray(pool_k), sel)
    np.testing.assert_array_equal(picked[0, 1, :, 1], pool_k[0, 1, np.asarray(sel.index[0, 1, 1]), 1])
