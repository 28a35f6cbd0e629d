"""Matmul precision (segexec_jax/numerics.py): every product of float32 operands asks for
HIGHEST explicitly, so that a TPU's one-pass bf16 default cannot break the consistency
obligation; products of bf16 operands keep DEFAULT."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SHARP, tiny

import segexec_jax as sx
from segexec_jax.inference.generate import _engine
from segexec_jax.model import numerics
from segexec_jax.segment.reference import reference_forward

SEG = ["segment.len=8", "segment.tail=3", "segment.retrieval.budget=5", "segment.retrieval.query_window=4",
       "segment.sinks=1"]
CONFIGS = {
    "segmented": SEG,
    "refresh": SEG + ["segment.retrieval.refresh=4"],
    "full": ["attention.mode=full"],
    "streaming": ["attention.mode=streaming", "inference.stream_sinks=2", "inference.stream_window=6"],
}
DOT = re.compile(r"stablehlo\.dot_general .*?(precision = \[(\w+), (\w+)\])? : \(tensor<([^>]*)>, tensor<([^>]*)>\)")


def dots(text: str) -> list[tuple[str | None, str, str]]:
    """(precision, lhs element type, rhs element type) of every dot_general in StableHLO text."""
    out = []
    for line in text.splitlines():
        if "stablehlo.dot_general" not in line:
            continue
        m = DOT.search(line)
        assert m, line
        out.append((m.group(2), m.group(4).split("x")[-1], m.group(5).split("x")[-1]))
    return out


def lowered_programs(cfg) -> dict[str, str]:
    """StableHLO of the forward, the loss gradient, the prefill and a decode step."""
    params = sx.init_params(cfg, seed=0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 21)), jnp.int32)
    prefill, step, *_ = _engine(cfg)
    lengths = jnp.array([21, 13], jnp.int32)
    cache, *_ = prefill(params, tokens, lengths, 32)
    programs = {
        "forward": jax.jit(sx.forward, static_argnums=1).lower(params, cfg, tokens).as_text(),
        "prefill": prefill.lower(params, tokens, lengths, 32).as_text(),
        "decode step": step.lower(params, cache, tokens[:, 0]).as_text(),
    }
    if cfg.attention.mode != "streaming":  # (inference-only)
        programs["loss gradient"] = jax.jit(jax.grad(sx.loss), static_argnums=1).lower(params, cfg, tokens).as_text()
    return programs


PRECISION_CASES = ([pytest.param("segmented", "float32", marks=pytest.mark.slow)]  # (refresh covers its programs)
                   + [(name, "float32") for name in CONFIGS if name != "segmented"] + [("refresh", "bfloat16")])


@pytest.mark.parametrize("name,dtype", PRECISION_CASES)
def test_every_float32_product_asks_for_highest(name, dtype):
    cfg = tiny(*CONFIGS[name], f"model.dtype={dtype}", "inference.max_len=32")
    for program, text in lowered_programs(cfg).items():
        found = dots(text)
        assert found, program
        if dtype == "float32":
            assert all(p == "HIGHEST" for p, _, _ in found), program
        elif program != "loss gradient":  # (a bf16 product's backward inherits its DEFAULT)
            for precision, lhs, rhs in found:  # bf16 products DEFAULT, the float32 selection scores HIGHEST
                assert (precision == "HIGHEST") == ("f32" in (lhs, rhs)), (program, precision, lhs, rhs)


def one_pass_bf16(spec, *operands, **kwargs):
    """What a TPU's DEFAULT precision does to float32 operands: one bf16 pass, float32 sums."""
    kwargs.setdefault("preferred_element_type", jnp.promote_types(operands[0].dtype, jnp.float32))
    return jnp.einsum(spec, *(x.astype(jnp.bfloat16) for x in operands), **kwargs)


def test_consistency_under_the_tpu_default_precision():
    """Run every product that goes through `numerics.einsum` (projections, logits, selection
    scores) at what a TPU's DEFAULT does to float32 operands, one bf16 pass: generation
    still equals the forward to 1e-4 (SPEC §4: both round the same way), but the forward is
    then only bf16-close to the float64 reference, which is why float32 products ask for
    HIGHEST (the first test) wherever exactness is promised."""
    from test_generate import logprob_gap

    cfg = tiny(*SHARP, *SEG, "inference.max_len=64")
    params = sx.init_params(cfg, seed=1)
    prompts = [np.random.default_rng(3).integers(0, 256, 21).tolist()]
    tokens = np.array([prompts[0]])
    forward = jax.jit(sx.forward, static_argnums=1)
    exact_gap = np.abs(np.asarray(forward(params, cfg, tokens)) - reference_forward(params, cfg, tokens)).max()
    assert exact_gap < 1e-4
    exact_einsum, numerics.einsum = numerics.einsum, one_pass_bf16
    try:
        jax.clear_caches()
        _engine.cache_clear()
        result = sx.generate(params, cfg, prompts, max_new_tokens=11)
        consistency_gap = logprob_gap(params, cfg, prompts, result)
        rounded_gap = np.abs(np.asarray(jax.jit(sx.forward, static_argnums=1)(params, cfg, tokens))
                             - reference_forward(params, cfg, tokens)).max()
    finally:  # no compiled program of the rounded products outlives the test
        numerics.einsum = exact_einsum
        jax.clear_caches()
        _engine.cache_clear()
    assert consistency_gap < 1e-4
    assert rounded_gap > 100 * exact_gap and rounded_gap > 1e-3


def test_mixed_precision_gradient_is_summed_and_returned_in_float32():
    """bf16 compute over float32 master weights: the segmented gradient (computed on the
    bf16 view of the weights) is summed over segments in float32 and returned in float32,
    never rounded to bf16 as a whole, and agrees with plain autodiff of the unrolled L_K."""
    from segexec_jax.segment.reference import unrolled_loss

    cfg = tiny(*SEG, "model.dtype=bfloat16", "model.param_dtype=float32", "attention.backend=xla",
               "model.init_std=0.3", "segment.grad_horizon=1")
    params = sx.init_params(cfg, seed=0)
    tokens = np.random.default_rng(0).integers(0, 256, (1, 24), dtype=np.int32)
    grads = jax.jit(jax.grad(sx.loss), static_argnums=1)(params, cfg, tokens)
    ref = jax.jit(jax.grad(unrolled_loss), static_argnums=1)(params, cfg, tokens)
    wq, ref_wq = np.asarray(grads["blocks"]["wq"]), np.asarray(ref["blocks"]["wq"])
    assert wq.dtype == np.float32
    rounded = np.asarray(jnp.asarray(wq).astype(jnp.bfloat16).astype(jnp.float32))
    assert np.mean(wq != rounded) > 0.5  # a float32 sum, not a bf16 value cast up
    assert np.max(np.abs(wq - ref_wq)) < 2e-2 * np.max(np.abs(ref_wq))  # bf16 compute on both sides
