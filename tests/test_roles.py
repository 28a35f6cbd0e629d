"""A head role is one registered object (segexec_jax.segment.roles.Role): toy roles defined here,
outside the package, run in forward, loss and generate by their config name (with a toy
retrieval policy too), agree with their own slow rule in the per-token reference and with
generation, and their gradient follows what the role declares."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from helpers import F64, SHARP, max_abs_diff, random_tokens, tiny
from test_registry import assert_loss_and_generation_consistent

import segexec_jax as sx
from segexec_jax.config import FrozenMap
from segexec_jax.segment import retrieval, roles
from segexec_jax.segment.reference import reference_forward

# Local heads that see the sinks and their own segment, but no tail (the slow rule is
# written apart from the package's: the document's first n tokens, those before the
# previous segment's last M).
SINKS_ONLY = roles.Role(
    name="toy_sinks_only", sees=("sinks",), grad=False,
    reference=lambda q: [a for a in range(q.doc_start, q.doc_start + q.cfg.segment.sinks)
                         if a < q.seg_start - q.cfg.segment.tail],
)
# The built-in tail, detached: the same prefix, no gradient into the previous segment.
DETACHED_TAIL = roles.Role(name="toy_detached_tail", sees=("sinks", "tail"), grad=False,
                           reference=lambda q: q.sinks() + q.tail())


def _pick_newest(rcfg, scores, candidate, X, Gl):
    """The `budget` latest candidates of the row, whatever the query."""
    B, C = candidate.shape
    k = min(rcfg.budget, C)
    later = candidate.sum(-1, keepdims=True) - jnp.cumsum(candidate, axis=-1)  # candidates after each entry
    chosen = candidate & (later < k)
    key = jnp.where(chosen, jnp.arange(C) + C, jnp.arange(C))  # chosen ones sort last, ascending
    index = (jnp.sort(key, axis=-1)[:, C - k:] % C).astype(jnp.int32)
    count = jnp.minimum(candidate.sum(-1), k).astype(jnp.int32)
    return retrieval.Selection(jnp.broadcast_to(index[None, :, None], (X, B, Gl, k)), count)


NEWEST = retrieval.Policy(name="toy_newest", width=lambda rcfg, C: min(rcfg.budget, C), pick=_pick_newest,
                          reference=lambda rcfg, cands, score: sorted(cands)[-rcfg.budget:] if rcfg.budget else [],
                          query_dependent=False)

SEG = ["segment.len=8", "segment.tail=3", "segment.retrieval.budget=5", "segment.retrieval.query_window=4",
       "segment.sinks=2"]


@pytest.fixture(scope="module", autouse=True)
def registered():
    roles.register(SINKS_ONLY)
    roles.register(DETACHED_TAIL)
    retrieval.register(NEWEST)
    yield
    roles.ROLES.pop(SINKS_ONLY.name)
    roles.ROLES.pop(DETACHED_TAIL.name)
    retrieval.POLICIES.pop(NEWEST.name)


def with_roles(cfg: sx.Config, **slots: str) -> sx.Config:
    """`cfg` with `segment.roles` = slots ({slot: role name}), as `segment.roles={...}` sets it."""
    return cfg.replace(segment=dataclasses.replace(cfg.segment, roles=FrozenMap(slots)))


@pytest.mark.parametrize("policy", ["topk", "toy_newest"])
def test_toy_role_forward_equals_its_reference(x64, policy):
    base = tiny(*F64, *SHARP, "attention.backend=reference", *SEG, f"segment.retrieval.policy={policy}")
    cfg = with_roles(base, local="toy_sinks_only")
    assert (roles.role_plan(cfg).roles == "toy_sinks_only").sum() == 2 * 1  # one local group in each of 2 layers
    params = sx.init_params(cfg, seed=1)
    tokens = random_tokens(2, 37, seed=2)
    fast = sx.forward(params, cfg, tokens)
    assert max_abs_diff(fast, reference_forward(params, cfg, tokens)) < 1e-9
    assert max_abs_diff(fast, sx.forward(params, base, tokens)) > 1e-3  # not the built-in tail


def test_toy_role_and_policy_loss_and_generation_are_consistent():
    cfg = with_roles(tiny(*SHARP, "inference.max_len=96", *SEG, "segment.retrieval.policy=toy_newest"),
                     local="toy_sinks_only")
    params = sx.init_params(cfg, seed=1)
    tokens = random_tokens(2, 40, seed=3)
    assert_loss_and_generation_consistent(params, cfg, tokens)


def test_a_detached_tail_carries_no_gradient(x64):
    """Same prefix as `tail`, so the same values; no gradient into the previous segment, so
    at grad_horizon 1 the gradient of the built-in tail at grad_horizon 0."""
    base = [*F64, *SHARP, *SEG]
    cfg = with_roles(tiny(*base, "segment.grad_horizon=1"), local="toy_detached_tail")
    params = sx.init_params(cfg, seed=1)
    tokens = random_tokens(2, 30, seed=4)
    forward = jax.jit(sx.forward, static_argnums=1)  # one compile each, not op by op
    assert max_abs_diff(forward(params, cfg, tokens), forward(params, tiny(*base), tokens)) == 0
    grad = lambda c: jax.jit(jax.grad(sx.loss), static_argnums=1)(params, c, tokens)
    detached = grad(cfg)
    assert max_abs_diff(detached, grad(tiny(*base, "segment.grad_horizon=0"))) < 1e-12
    assert max_abs_diff(detached, grad(tiny(*base, "segment.grad_horizon=1"))) > 1e-4


def test_roles_are_found_by_name_and_must_fit_their_slot():
    """Checked when the config loads (a dotted override like any key)."""
    assert roles.role_plan(tiny(*SEG, "segment.roles={local: toy_sinks_only}")).local.name == "toy_sinks_only"
    with pytest.raises(sx.ConfigError, match=r"'segment.roles.long_elsewhere': unknown role 'nope' "
                                             r"\(registered: retrieval, segment, tail"):
        tiny(*SEG, "segment.roles={long_elsewhere: nope}")
    with pytest.raises(sx.ConfigError, match=r"'segment.roles': unknown slot 'far'"):
        tiny(*SEG, "segment.roles={far: tail}")
    with pytest.raises(sx.ConfigError, match=r"'segment.roles.long': role 'toy_sinks_only' sees sinks, which long "
                                             r"heads do not keep"):
        tiny(*SEG, "segment.roles={long: toy_sinks_only}")
    with pytest.raises(ValueError, match="only a tail carries gradient"):
        roles.Role("bad", ("retrieved",), True, lambda q: q.retrieved())
