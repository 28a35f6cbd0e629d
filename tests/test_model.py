"""The model and the public functions: parameters, dtypes, remat policies, input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_abs_diff, random_tokens, tiny

import segexec_jax as sx
from segexec_jax.model.transformer import (
    REMAT_POLICIES,
    count_params,
    logical_axes,
    param_shapes,
)


def test_parameters_shapes_and_count():
    cfg = tiny()
    params = sx.init_params(cfg, seed=0)
    m = cfg.model
    assert params["embed"].shape == (m.vocab_size, m.d_model)
    assert params["blocks"]["wq"].shape == (m.n_layers, m.d_model, m.n_heads, m.dim_head)
    assert params["blocks"]["wk"].shape == (m.n_layers, m.d_model, m.n_kv_heads, m.dim_head)
    assert "unembed" not in params
    per_layer = 2 * m.d_model + m.d_model * m.dim_head * (2 * m.n_heads + 2 * m.n_kv_heads) + 3 * m.d_model * m.d_ff
    assert count_params(params) == m.vocab_size * m.d_model + m.n_layers * per_layer + m.d_model
    untied = sx.init_params(tiny("model.tie_embeddings=false"), seed=0)
    assert untied["unembed"].shape == (m.d_model, m.vocab_size)
    assert jax.tree.map(jnp.shape, params) == param_shapes(cfg)


def test_init_is_deterministic_per_seed():
    cfg = tiny()
    assert max_abs_diff(sx.init_params(cfg, 3), sx.init_params(cfg, 3)) == 0
    assert max_abs_diff(sx.init_params(cfg, 3), sx.init_params(cfg, 4)) > 0


def test_every_parameter_has_logical_axes_of_its_rank():
    cfg = tiny("model.tie_embeddings=false")
    axes = logical_axes(cfg)
    shapes = param_shapes(cfg)
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    flat_shapes = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
    assert len(flat_axes) == len(flat_shapes)
    for a, s in zip(flat_axes, flat_shapes):
        assert len(a) == len(s), (a, s)
    assert axes["blocks"]["wq"] == ("layers", "embed", "q_heads", "head_dim")


@pytest.mark.parametrize("mode", ["segmented", "full"])
def test_bfloat16_compute_tracks_float32(mode):
    over = [f"attention.mode={mode}", "segment.len=16", "segment.tail=4", "segment.retrieval.budget=4",
            "segment.retrieval.query_window=4"]
    f32, bf16 = tiny(*over), tiny(*over, "model.dtype=bfloat16")
    params = sx.init_params(f32, seed=0)
    tokens = random_tokens(2, 50)
    a = sx.forward(params, f32, tokens)
    b = sx.forward(params, bf16, tokens)
    assert a.dtype == b.dtype == jnp.float32
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 2e-2
    la, lb = sx.loss(params, f32, tokens), sx.loss(params, bf16, tokens)
    assert abs(float(la - lb)) < 2e-2 * float(la)


GRAD = jax.jit(jax.value_and_grad(sx.loss), static_argnums=1)
REMAT_BASE = ["segment.len=16", "segment.tail=4", "segment.retrieval.budget=4", "segment.retrieval.query_window=4"]


@pytest.mark.parametrize("policy", sorted(set(REMAT_POLICIES) - {"none"}))
def test_remat_policies_change_nothing_but_memory(policy):
    params = sx.init_params(tiny(*REMAT_BASE), seed=0)
    tokens = random_tokens(2, 40)
    ref = GRAD(params, tiny(*REMAT_BASE, "attention.mode=full"), tokens)
    out = GRAD(params, tiny(*REMAT_BASE, "attention.mode=full", f"model.remat={policy}"), tokens)
    assert max_abs_diff(ref, out) < 1e-6


def test_segment_remat_changes_nothing_but_memory():
    params = sx.init_params(tiny(*REMAT_BASE), seed=0)
    tokens = random_tokens(2, 40)
    ref = GRAD(params, tiny(*REMAT_BASE), tokens)
    assert max_abs_diff(ref, GRAD(params, tiny(*REMAT_BASE, "segment.remat=full"), tokens)) < 1e-6


def test_parameters_that_do_not_match_the_config_are_a_clear_error():
    params = sx.init_params(tiny(), seed=0)
    with pytest.raises(ValueError, match="parameters do not match the config's model"):
        sx.forward(params, tiny("model.tie_embeddings=false"), random_tokens(1, 8))
    with pytest.raises(ValueError, match="parameters do not match"):
        sx.forward({"embed": params["embed"]}, tiny(), random_tokens(1, 8))


def test_bad_inputs_are_clear_errors():
    cfg = tiny()
    params = sx.init_params(cfg, seed=0)
    tokens = random_tokens(2, 10)
    with pytest.raises(ValueError, match="token ids must lie in"):
        sx.forward(params, cfg, tokens + 300)
    with pytest.raises(ValueError, match=r"tokens must be a \[batch, length\] array"):
        sx.forward(params, cfg, tokens[0])
    with pytest.raises(ValueError, match="tokens must not be empty"):
        sx.forward(params, cfg, tokens[:, :0])
    with pytest.raises(ValueError, match="tokens must be integers"):
        sx.forward(params, cfg, tokens.astype(np.float32))
    with pytest.raises(ValueError, match="doc_ids must be integers shaped like tokens"):
        sx.forward(params, cfg, tokens, doc_ids=np.ones((2, 9), np.int32))
    with pytest.raises(ValueError, match="doc_ids must be >= 0"):
        sx.forward(params, cfg, tokens, doc_ids=-np.ones((2, 10), np.int32))
    with pytest.raises(ValueError, match="loss_mask must be shaped like tokens"):
        sx.loss(params, cfg, tokens, loss_mask=np.ones((2, 3)))


def test_float64_needs_x64():
    with pytest.raises(sx.ConfigError, match="model.dtype"):
        sx.init_params(tiny("model.dtype=float64", "model.param_dtype=float64"), seed=0)


def test_public_functions_jit_and_grad():
    cfg = tiny()
    params = sx.init_params(cfg, seed=0)
    tokens = random_tokens(2, 70)
    logits = jax.jit(sx.forward, static_argnums=1)(params, cfg, tokens)
    assert logits.shape == (2, 70, 256) and logits.dtype == jnp.float32
    value, grads = jax.jit(jax.value_and_grad(sx.loss), static_argnums=1)(params, cfg, tokens)
    assert np.isfinite(float(value)) and abs(float(value) - np.log(256)) < 0.5
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_parameter_shape_mismatch_names_the_parameter():
    params = sx.init_params(tiny(), seed=0)
    with pytest.raises(ValueError, match=r"\['blocks'\]\['w_(down|gate|up)'\] has shape .*128.*, the config needs .*96"):
        sx.loss(params, tiny("model.d_ff=96"), random_tokens(1, 8))


def test_remat_auto_follows_the_attention_kernel():
    """`auto` (the default of model.remat and segment.remat) rematerialises the layers
    wherever attention runs unfused, and not where a fused kernel keeps memory linear."""
    from segexec_jax.model.transformer import remat_policy

    assert sx.Config().model.remat == sx.Config().segment.remat == "auto"
    for backend, policy in [("xla", "full"), ("reference", "full"), ("cudnn", "none"), ("splash", "none")]:
        assert remat_policy(tiny(f"attention.backend={backend}"), "auto") == policy, backend
    assert remat_policy(tiny("attention.backend=xla"), "dots") == "dots"
    on_cpu = tiny("attention.backend=auto", "model.remat=auto")  # auto resolves to xla here
    assert remat_policy(on_cpu, on_cpu.model.remat) == "full"
