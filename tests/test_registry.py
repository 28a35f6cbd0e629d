"""A retrieval policy is one registered object (segexec_jax.segment.retrieval.Policy): a toy policy
defined here, outside the package, runs in forward, loss and generate by its config name,
and agrees with its own slow rule in the per-token reference and with generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import F64, SHARP, max_abs_diff, random_tokens, tiny

import segexec_jax as sx
from segexec_jax.segment import retrieval
from segexec_jax.segment.reference import reference_forward


def _pick_oldest(rcfg, scores, candidate, X, Gl):
    """The `budget` earliest candidates of the row, whatever the query (the fast rule)."""
    B, C = candidate.shape
    k = min(rcfg.budget, C)
    chosen = candidate & (jnp.cumsum(candidate, axis=-1) <= k)
    key = jnp.where(chosen, jnp.arange(C) + C, jnp.arange(C))  # chosen ones sort last, ascending
    index = (jnp.sort(key, axis=-1)[:, C - k:] % C).astype(jnp.int32)
    count = jnp.minimum(candidate.sum(-1), k).astype(jnp.int32)
    return retrieval.Selection(jnp.broadcast_to(index[None, :, None], (X, B, Gl, k)), count)


OLDEST = retrieval.Policy(
    name="toy_oldest",
    width=lambda rcfg, C: min(rcfg.budget, C),
    pick=_pick_oldest,
    reference=lambda rcfg, cands, score: sorted(cands)[: rcfg.budget],  # the slow rule, written apart
    query_dependent=False,
)

SEG = ["segment.len=8", "segment.tail=3", "segment.retrieval.budget=5", "segment.retrieval.query_window=4",
       "segment.sinks=1"]


@pytest.fixture(scope="module", autouse=True)
def registered():
    retrieval.register(OLDEST)
    yield
    retrieval.POLICIES.pop(OLDEST.name)


def test_toy_policy_forward_equals_its_reference(x64):
    cfg = tiny(*F64, *SHARP, "attention.backend=reference", *SEG, "segment.retrieval.policy=toy_oldest")
    params = sx.init_params(cfg, seed=1)
    tokens = random_tokens(2, 45, seed=2)
    fast = sx.forward(params, cfg, tokens)
    assert max_abs_diff(fast, reference_forward(params, cfg, tokens)) < 1e-9
    topk = tiny(*F64, *SHARP, "attention.backend=reference", *SEG)
    assert max_abs_diff(fast, sx.forward(params, topk, tokens)) > 1e-3  # it is a different choice


def test_toy_policy_loss_and_generation_are_consistent():
    cfg = tiny(*SHARP, "inference.max_len=96", *SEG, "segment.retrieval.policy=toy_oldest")
    params = sx.init_params(cfg, seed=1)
    tokens = random_tokens(2, 40, seed=3)
    assert_loss_and_generation_consistent(params, cfg, tokens)


def assert_loss_and_generation_consistent(params, cfg, tokens):
    """The loss is the forward's NLL with finite gradients, and every generated token's
    log-prob is the forward's (used by tests/test_roles.py too)."""
    value, grads = jax.value_and_grad(sx.loss)(params, cfg, tokens)
    logp = jax.nn.log_softmax(sx.forward(params, cfg, tokens), -1)
    nll = -np.take_along_axis(np.asarray(logp[:, :-1]), tokens[:, 1:, None], -1).mean()
    assert abs(float(value) - nll) < 1e-5 and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    prompts = [tokens[0, :21].tolist(), tokens[1, :13].tolist()]
    result = sx.generate(params, cfg, prompts, max_new_tokens=19)
    for b, seq in enumerate(result.sequences):
        ref = jax.nn.log_softmax(sx.forward(params, cfg, np.array([seq])), -1)[0]
        L, n = len(prompts[b]), int(result.num_generated[b])
        assert np.abs(np.asarray(ref[L - 1:L - 1 + n])[np.arange(n), seq[L:]] - result.logprobs[b, :n]).max() < 1e-4


def test_an_unknown_policy_names_the_registered_ones():
    with pytest.raises(sx.ConfigError, match=r"'segment.retrieval.policy': unknown policy 'nope' \(registered: all, none"):
        tiny("segment.retrieval.policy=nope")
