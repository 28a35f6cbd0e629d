"""The objective L_K: its value, its exact gradient for every horizon, and its memory (SPEC §3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import F64, SHARP, max_abs_diff, pack, random_tokens, tiny

import segexec_jax as sx
from segexec_jax.segment.reference import unrolled_loss

value_and_grad = jax.jit(jax.value_and_grad(sx.loss), static_argnums=1)
loss_value = jax.jit(sx.loss, static_argnums=1)
unrolled_value_and_grad = jax.jit(jax.value_and_grad(unrolled_loss), static_argnums=1)
OPERATOR = ["attention.backend=reference", "segment.len=8", "segment.tail=3", "segment.retrieval.budget=5", "segment.sinks=2",
            "segment.retrieval.query_window=4"]


@pytest.mark.parametrize("K", [pytest.param("0", marks=pytest.mark.slow), "1", "2",
                               pytest.param("chain", marks=pytest.mark.slow)])  # chain: also test_gradient_through_forward_is_the_chain_gradient
def test_gradient_equals_brute_force_unrolled_objective(x64, K):
    """Packed documents, sinks and retrieval: jax.grad(loss) is exactly the gradient of L_K."""
    cfg = tiny(*F64, "model.init_std=0.3", *OPERATOR, f"segment.grad_horizon={K}")
    params = sx.init_params(cfg, seed=0)
    T = 37  # five segments, the last one partial
    tokens = random_tokens(2, T)
    docs = np.stack([pack([8, 3, 4, 17, 4], 8, T), pack([T], 8, T)])
    mask = (np.random.default_rng(1).random((2, T)) < 0.8).astype(np.float32)
    fast_value, fast_grad = value_and_grad(params, cfg, tokens, mask, docs)
    slow_value, slow_grad = unrolled_value_and_grad(params, cfg, tokens, mask, docs)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(slow_grad))
    assert scale > 1e-3
    assert abs(float(fast_value - slow_value)) < 1e-12
    assert max_abs_diff(fast_grad, slow_grad) < 1e-12 * max(scale, 1.0)


@pytest.mark.parametrize("K,policy", [("1", "topk"), pytest.param("chain", "topk_block", marks=pytest.mark.slow)])
def test_refresh_gradient_equals_brute_force_unrolled_objective(x64, K, policy):
    """`refresh`: the backward replays the chunks' saved selections; the unrolled reference
    selects afresh in every call. Packed documents, sinks, a loss mask."""
    cfg = tiny(*F64, "model.init_std=0.3", *OPERATOR, f"segment.grad_horizon={K}", "segment.retrieval.refresh=4",
               f"segment.retrieval.policy={policy}", "segment.retrieval.block_size=2", "segment.retrieval.budget=4")
    params = sx.init_params(cfg, seed=0)
    T = 37
    tokens = random_tokens(2, T)
    docs = np.stack([pack([8, 3, 4, 17, 4], 8, T), pack([T], 8, T)])
    mask = (np.random.default_rng(1).random((2, T)) < 0.8).astype(np.float32)
    fast_value, fast_grad = value_and_grad(params, cfg, tokens, mask, docs)
    slow_value, slow_grad = unrolled_value_and_grad(params, cfg, tokens, mask, docs)
    plain = tiny(*F64, "model.init_std=0.3", *OPERATOR, f"segment.grad_horizon={K}",
                 f"segment.retrieval.policy={policy}", "segment.retrieval.block_size=2", "segment.retrieval.budget=4")
    assert abs(float(fast_value - value_and_grad(params, plain, tokens, mask, docs)[0])) > 1e-6  # it changes L
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(slow_grad))
    assert scale > 1e-3
    assert abs(float(fast_value - slow_value)) < 1e-12
    assert max_abs_diff(fast_grad, slow_grad) < 1e-12 * max(scale, 1.0)


def test_gradient_on_one_document_rows(x64):
    cfg = tiny(*F64, "model.init_std=0.3", *OPERATOR, "segment.grad_horizon=1",
               "model.tie_embeddings=false", "segment.retrieval.policy=topk_block",
               "segment.retrieval.block_size=4", "segment.retrieval.budget=8")
    params = sx.init_params(cfg, seed=1)
    tokens = random_tokens(1, 37, seed=2)
    (a, ga), (b, gb) = value_and_grad(params, cfg, tokens), unrolled_value_and_grad(params, cfg, tokens)
    assert abs(float(a - b)) < 1e-12 and max_abs_diff(ga, gb) < 1e-12


@pytest.mark.slow
def test_horizons_share_values_but_not_gradients(x64):
    tokens = random_tokens(2, 40)
    results = {}
    for K in ["0", "1", "2", "chain"]:
        cfg = tiny(*F64, "model.init_std=0.3", *OPERATOR, f"segment.grad_horizon={K}")
        results[K] = value_and_grad(sx.init_params(cfg, seed=0), cfg, tokens)
    values = {K: float(v) for K, (v, _) in results.items()}
    assert len(set(values.values())) == 1, values
    grads = {K: g for K, (_, g) in results.items()}
    assert max_abs_diff(grads["0"], grads["1"]) > 1e-4
    assert max_abs_diff(grads["1"], grads["2"]) > 1e-6
    # five segments: K = 4 cuts nothing that matters, so it equals the full chain
    cfg4 = tiny(*F64, "model.init_std=0.3", *OPERATOR, "segment.grad_horizon=4")
    assert max_abs_diff(value_and_grad(sx.init_params(cfg4, seed=0), cfg4, tokens)[1], grads["chain"]) < 1e-12


def _embedding_gradient_by_segment(K: str, S: int = 6, n_seg: int = 5, target: int = 3):
    """|d l_target / d embedding row| of the tokens of every segment (each token unique).

    Four layers: through the tails, each segment hop back costs one layer of depth."""
    cfg = tiny(*F64, *SHARP, "attention.backend=reference", "model.tie_embeddings=false",
               "model.n_layers=4", f"segment.len={S}", "segment.tail=2",
               "segment.retrieval.budget=4", "segment.retrieval.query_window=2", "segment.sinks=1",
               f"segment.grad_horizon={K}")
    params = sx.init_params(cfg, seed=0)
    tokens = np.arange(S * n_seg, dtype=np.int32)[None] + 7  # token t appears only at position t-7
    mask = np.zeros_like(tokens, np.float32)
    mask[:, target * S:(target + 1) * S] = 1  # the loss of segment `target` alone
    grad = jax.jit(jax.grad(sx.loss), static_argnums=1)(params, cfg, tokens, mask)["embed"]
    rows = np.abs(np.asarray(grad))[tokens[0]].sum(-1)
    return rows.reshape(n_seg, S).sum(-1)


@pytest.mark.parametrize("K,reached", [("0", {3}), ("1", {2, 3}), ("2", {1, 2, 3}), ("chain", {0, 1, 2, 3})])
def test_gradient_reaches_exactly_the_horizon(x64, K, reached):
    """l_i's gradient reaches segments i-K..i (the tail chain) and nothing earlier, although
    earlier segments feed the pool, the sinks and the retrieved prefix."""
    per_segment = _embedding_gradient_by_segment(K)
    for s in range(5):
        if s in reached:
            assert per_segment[s] > 1e-6, (s, per_segment)
        else:
            assert per_segment[s] == 0.0, (s, per_segment)


def _manual_mean_ce(logits, tokens, weights):
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), -1)
    nll = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    w = weights[:, :-1]
    return float((nll * w).sum() / w.sum())


@pytest.mark.parametrize("mode", ["segmented", "full"])
def test_loss_is_masked_token_mean_of_next_token_cross_entropy(x64, mode):
    cfg = tiny(*F64, *OPERATOR, f"attention.mode={mode}")
    params = sx.init_params(cfg, seed=0)
    T = 30
    tokens = random_tokens(2, T, seed=3)
    docs = np.stack([pack([7, 10, 5], 8, T), pack([T], 8, T)])
    mask = (np.random.default_rng(4).random((2, T)) < 0.7).astype(np.float32)
    logits = jax.jit(sx.forward, static_argnums=1)(params, cfg, tokens, docs)
    # a position counts if masked in, and its next token is of the same (non-padding) document
    same = np.zeros((2, T), bool)
    same[:, :-1] = (docs[:, 1:] == docs[:, :-1]) & (docs[:, :-1] > 0)
    expected = _manual_mean_ce(logits, tokens, mask * same)
    got = loss_value(params, cfg, tokens, mask, docs)
    assert abs(float(got) - expected) < 1e-12
    assert abs(float(loss_value(params, cfg, tokens)) -
               _manual_mean_ce(jax.jit(sx.forward, static_argnums=1)(params, cfg, tokens),
                               tokens, np.ones((2, T)))) < 1e-12


def test_one_segment_loss_and_gradient_equal_full(x64):
    segmented = tiny(*F64, "attention.backend=reference", "segment.len=64", "segment.sinks=3")
    full = tiny(*F64, "attention.backend=reference", "attention.mode=full")
    params = sx.init_params(segmented, seed=0)
    tokens = random_tokens(2, 40)
    (a, ga), (b, gb) = value_and_grad(params, segmented, tokens), value_and_grad(params, full, tokens)
    assert abs(float(a - b)) < 1e-12 and max_abs_diff(ga, gb) < 1e-12


@pytest.mark.slow  # about 2 minutes of compiles on 2 cores: opt-in (`pytest -m slow`)
def test_training_memory_grows_linearly_with_length():
    """Compiled temp memory of value_and_grad at T = 1K, 2K, 4K, 8K with S fixed: equal
    increments per added token (linear), not the O(T^2/S) of a pool saved per step."""
    cfg = tiny()  # S = 64, M = 16, R = 16, one long layer
    params = sx.init_params(cfg, seed=0)
    step = jax.jit(jax.value_and_grad(sx.loss), static_argnums=1)
    temp = {}
    for T in [1024, 2048, 4096, 8192]:
        tokens = jax.ShapeDtypeStruct((1, T), jnp.int32)
        temp[T] = step.lower(params, cfg, tokens).compile().memory_analysis().temp_size_in_bytes
    per_token = [(temp[2 * T] - temp[T]) / T for T in [1024, 2048, 4096]]
    assert all(p > 0 for p in per_token), temp
    assert max(per_token) / min(per_token) < 1.25, (temp, per_token)
    # the slope is the per-token state (tail + pool + inputs), far below a pool copy per segment
    assert per_token[-1] < 1024, per_token
    full = tiny("attention.mode=full")
    full_temp = {T: step.lower(params, full, jax.ShapeDtypeStruct((1, T), jnp.int32)).compile()
                 .memory_analysis().temp_size_in_bytes for T in [1024, 4096]}
    assert full_temp[4096] > 8 * full_temp[1024]  # the XLA full-attention baseline is quadratic


def _forward_loss(params, cfg, tokens, mask, docs):
    """The token-mean cross entropy written on `forward`'s logits: any objective built on it."""
    logits = sx.forward(params, cfg, tokens, docs)
    logp = jax.nn.log_softmax(logits, -1)[:, :-1]
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    w = mask[:, :-1] * ((docs[:, 1:] == docs[:, :-1]) & (docs[:, :-1] > 0))
    return (nll * w).sum() / w.sum()


def _rows_for_gradients(T: int):
    """Packed documents, a left-padded row and one document: sinks, retrieval, a loss mask."""
    tokens = random_tokens(3, T, seed=5)
    docs = np.stack([pack([8, 3, 4, 17, 4], 8, T), (np.arange(T) >= 11).astype(np.int32), np.ones(T, np.int32)])
    mask = (np.random.default_rng(6).random((3, T)) < 0.8).astype(np.float32)
    return tokens, mask, docs


def test_gradient_through_forward_is_the_chain_gradient():
    """`forward` lets gradient through the tail chain only (the pool, sinks and retrieved
    entries are stop-gradient), so the loss written on its logits has the gradient of
    `loss` with grad_horizon=chain, in float32."""
    cfg = tiny("model.init_std=0.3", *OPERATOR, "segment.grad_horizon=chain", "segment.long_layers=[0,1]")
    params = sx.init_params(cfg, seed=0)
    tokens, mask, docs = _rows_for_gradients(37)
    value, grad = value_and_grad(params, cfg, tokens, mask, docs)
    value_f, grad_f = jax.jit(jax.value_and_grad(_forward_loss), static_argnums=1)(params, cfg, tokens, mask, docs)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad))
    assert scale > 1e-3
    assert abs(float(value - value_f)) < 1e-5 * float(value)
    assert max_abs_diff(grad, grad_f) < 1e-5 * scale


@pytest.mark.parametrize("K", ["1", "chain"])
def test_forward_mode_gives_the_gradient_of_L_K(x64, K):
    """jax.jvp of `loss` is <grad L_K, v>, the derivative that jax.grad defines, for every
    horizon; with `chain` it equals forward mode through `forward`."""
    cfg = tiny(*F64, "model.init_std=0.3", *OPERATOR, f"segment.grad_horizon={K}")
    params = sx.init_params(cfg, seed=0)
    tokens, mask, docs = _rows_for_gradients(37)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    v = jax.tree.unflatten(tree, [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)])

    def jvp(f):
        return jax.jit(lambda p, v: jax.jvp(lambda q: f(q, cfg, tokens, mask, docs), (p,), (v,)))(params, v)

    value, tangent = jvp(sx.loss)
    if K == "chain":
        value_f, tangent_f = jvp(_forward_loss)
        assert abs(float(value - value_f)) < 1e-12
        assert abs(float(tangent - tangent_f)) < 1e-12 * abs(float(tangent_f))
        return
    grad = value_and_grad(params, cfg, tokens, mask, docs)[1]
    expected = sum(float(jnp.vdot(g, t)) for g, t in zip(jax.tree.leaves(grad), jax.tree.leaves(v)))
    assert abs(expected) > 1e-3
    assert abs(float(tangent) - expected) < 1e-12 * abs(expected)
