"""Full mode's chunked cross entropy: its value and derivatives against the plain one over
[B, T, V] logits, and the vocabulary products it takes (once per chunk, not rematerialised)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import F64, max_abs_diff, pack, random_tokens, tiny

import segexec_jax as sx
from segexec_jax.model.transformer import bind
from segexec_jax.segment.forward import check_inputs, full_hidden
from segexec_jax.segment.objective import (
    chunked_cross_entropy_sum,
    cross_entropy_sum,
    targets_and_weights,
)
from segexec_jax.segment.operator import document_runs

T = 37  # chunks of 8 positions: the last one padded


def _rows():
    tokens = random_tokens(2, T, seed=5)
    docs = np.stack([pack([9, 4, 13, 5], 8, T), pack([T], 8, T)])
    mask = (np.random.default_rng(6).random((2, T)) < 0.8).astype(np.float32)
    return tokens, docs, mask


def _losses(cfg, chunked: bool):
    """The loss sum as a function of (params, loss_mask): the chunked one, or the plain cross
    entropy over all logits at once (the reference)."""
    tokens, docs, _ = _rows()

    def f(params, mask):
        tok, doc, mask = check_inputs(cfg, tokens, docs, mask)
        targets, weights = targets_and_weights(tok, doc, mask)
        model = bind(cfg, params)
        x = full_hidden(model, cfg, tok, document_runs(doc), single_doc=False)
        if chunked:
            return chunked_cross_entropy_sum(model, x, targets, weights, cfg.segment.len)
        return cross_entropy_sum(model.logits(x), targets, weights)

    return f


def _config(dtype: str, tied: bool):
    over = [*F64] if dtype == "float64" else []
    return tiny(*over, "model.init_std=0.3", "attention.mode=full", "attention.backend=reference",
                "segment.len=8", "segment.tail=3", "segment.retrieval.budget=4",
                f"model.tie_embeddings={str(tied).lower()}")


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_value_and_gradients_equal_the_plain_cross_entropy(dtype, tied):
    """Gradients w.r.t. every parameter and w.r.t. the loss mask (float64: to 1e-12; float32:
    to float32 rounding of the largest gradient)."""
    with jax.enable_x64(dtype == "float64"):
        cfg = _config(dtype, tied)
        params = sx.init_params(cfg, seed=0)
        mask = jnp.asarray(_rows()[2], dtype)
        grad = lambda chunked: jax.jit(jax.value_and_grad(_losses(cfg, chunked), argnums=(0, 1)))(params, mask)
        (value, g), (ref_value, ref_g) = grad(True), grad(False)
        scale = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(ref_g))
        assert scale > 1e-2
        tol = 1e-12 if dtype == "float64" else 1e-6
        assert abs(float(value - ref_value)) < tol * abs(float(ref_value))
        assert max_abs_diff(g, ref_g) < tol * scale
        assert max_abs_diff(g[1], ref_g[1]) < tol * float(jnp.abs(ref_g[1]).max())  # the mask's own scale


def test_forward_mode_is_the_gradient_dotted_with_the_tangent(x64):
    """Tangents of the parameters (float64: to 1e-12) and of the loss mask (the objective
    weighs tokens in float32: to float32 rounding)."""
    cfg = _config("float64", tied=False)
    params = sx.init_params(cfg, seed=1)
    mask = jnp.asarray(_rows()[2], jnp.float64)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves) + 1)
    v = jax.tree.unflatten(tree, [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)])
    v_mask = jax.random.normal(keys[-1], mask.shape, jnp.float32).astype(jnp.float64)
    f = _losses(cfg, chunked=True)
    g = jax.jit(jax.grad(_losses(cfg, chunked=False), argnums=(0, 1)))(params, mask)
    zero = lambda t: jax.tree.map(jnp.zeros_like, t)
    for tangents, tol in (((v, zero(mask)), 1e-12), ((zero(params), v_mask), 1e-6)):
        _, tangent = jax.jit(lambda p, m, t: jax.jvp(f, (p, m), t))(params, mask, tangents)
        expected = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(tangents)))
        assert abs(expected) > 1e-2
        assert abs(float(tangent) - expected) < tol * abs(expected)


def _vocab_products(jaxpr, V: int) -> int:
    """dot_generals with an operand of V along some axis, in `jaxpr` and every sub-jaxpr."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and any(V in v.aval.shape for v in eqn.invars):
            count += 1
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _vocab_products(inner, V)
    return count


@pytest.mark.parametrize("tied", [True, False])
def test_the_gradient_takes_three_vocabulary_products(tied):
    """The logits once, then their pullback to x and to the table: 3 products over the
    vocabulary in `jax.grad(loss)` of full mode. A rematerialised chunk would take 4."""
    cfg = tiny("attention.mode=full", "attention.backend=reference", "segment.len=8", "segment.tail=3",
               "segment.retrieval.budget=4", "model.vocab_size=384", f"model.tie_embeddings={str(tied).lower()}")
    params = sx.init_params(cfg, seed=0)
    tokens, docs, mask = _rows()
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: sx.loss(p, cfg, tokens, mask, docs)))(params).jaxpr
    assert _vocab_products(jaxpr, 384) == 3
