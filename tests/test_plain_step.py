"""benchmarks/plain_step.py is the same model and optimizer as ours: same shape as the 1b
preset, same loss for the same parameters, same gradients and AdamW update (float32)."""

import dataclasses
import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import segexec_jax as sj
from segexec_jax.model.transformer import count_params, param_shapes
from segexec_jax.training.optim import optimizer as our_optimizer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "plain_step.py"
spec = importlib.util.spec_from_file_location("plain_step", SCRIPT)
plain = importlib.util.module_from_spec(spec)
sys.modules["plain_step"] = plain  # (dataclasses look their module up there)
spec.loader.exec_module(plain)

TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=96",
        "model.vocab_size=128", "model.dtype=float32", "segment.long_layers=[1]", "attention.mode=full",
        "segment.len=16", "segment.tail=8", "segment.retrieval.budget=8", "segment.retrieval.query_window=4",
        "segment.retrieval.block_size=4"]  # full-mode loss chunks its logits by segment.len: 2 chunks of 16 at T=32


def tiny():
    cfg = sj.load_config("1b", TINY)
    m = cfg.model
    shape = dataclasses.replace(plain.Shape.from_yaml(), vocab=m.vocab_size, d_model=m.d_model, n_layers=m.n_layers,
                                n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, d_ff=m.d_ff, dtype="float32")
    return cfg, shape


def to_plain(params: dict) -> dict:
    """Our parameter tree in the plain step's layout (head axes flattened)."""
    b = params["blocks"]
    L, d = b["wq"].shape[:2]
    return dict(embed=params["embed"], final_norm=params["final_norm"]["scale"], layers=dict(
        attn_norm=b["attn_norm"]["scale"], mlp_norm=b["mlp_norm"]["scale"],
        wq=b["wq"].reshape(L, d, -1), wk=b["wk"].reshape(L, d, -1), wv=b["wv"].reshape(L, d, -1),
        wo=b["wo"].reshape(L, -1, d), w_gate=b["w_gate"], w_up=b["w_up"], w_down=b["w_down"]))


def test_shape_is_the_1b_preset():
    cfg, s = sj.load_config("1b"), plain.Shape.from_yaml()
    m, t = cfg.model, cfg.train
    assert (s.vocab, s.d_model, s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim, s.d_ff) == (
        m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.dim_head, m.d_ff)
    assert m.tie_embeddings and not m.qkv_bias and not m.rope_scaling and m.param_dtype == "float32"
    assert (s.rope_theta, s.norm_eps, s.init_std, s.dtype) == (m.rope_theta, m.norm_eps, m.init_std, m.dtype)
    assert (s.lr, s.warmup_steps, s.steps, s.min_lr_ratio, s.weight_decay, s.grad_clip, s.b1, s.b2) == (
        t.lr, t.warmup_steps, t.steps, t.min_lr_ratio, t.weight_decay, t.grad_clip, t.b1, t.b2)
    assert t.schedule == "cosine"
    ours = param_shapes(cfg)
    theirs = jax.eval_shape(lambda: plain.init_params(s))
    assert count_params(jax.tree.map(np.zeros, ours, is_leaf=lambda x: isinstance(x, tuple))) == \
        sum(x.size for x in jax.tree.leaves(theirs)) == 1_057_581_056


def random_params(cfg, seed: int) -> dict:
    """Our parameter tree with random values (norm scales around 1, not all ones), from numpy
    (faster than `init_params` on a busy CPU)."""
    rng = np.random.default_rng(seed)
    is_scale = lambda path: getattr(path[-1], "key", None) == "scale"
    return jax.tree_util.tree_map_with_path(
        lambda path, shape: float(is_scale(path)) + 0.1 * rng.standard_normal(shape, np.float32),
        param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def test_same_loss_and_gradient_as_ours():
    cfg, s = tiny()
    params = random_params(cfg, seed=3)
    tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, cfg.model.vocab_size)
    ours, g_ours = jax.jit(jax.value_and_grad(lambda p: sj.loss(p, cfg, tokens)))(params)
    theirs, g_theirs = jax.jit(jax.value_and_grad(lambda p: plain.loss_fn(s, p, tokens, "layer", "xla")))(
        to_plain(params))
    assert abs(float(ours) - np.log(cfg.model.vocab_size)) < 2  # a sane loss, not a degenerate one
    np.testing.assert_allclose(theirs, ours, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(to_plain(g_ours)), jax.tree.leaves(g_theirs)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)


def test_same_optimizer_update():
    cfg, s = tiny()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, warmup_steps=2))
    s = dataclasses.replace(s, warmup_steps=2)
    params = random_params(cfg, seed=1)
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda a: rng.standard_normal(a.shape, np.float32), params)
    ours, theirs = our_optimizer(cfg.train), plain.optimizer(s)
    o_state, t_state = ours.init(params), theirs.init(to_plain(params))
    o_update, t_update = jax.jit(ours.update), jax.jit(theirs.update)
    for _ in range(4):  # through the warmup into the cosine
        o_up, o_state = o_update(grads, o_state, params)
        t_up, t_state = t_update(to_plain(grads), t_state, to_plain(params))
        for a, b in zip(jax.tree.leaves(to_plain(o_up)), jax.tree.leaves(t_up)):
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-12)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_hlo_stats_counts_matmuls_once_per_loop_trip():
    step_hlo = _script("step_hlo")

    def f(x, w):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]

    x, w = jnp.ones((8, 16), jnp.bfloat16), jnp.ones((3, 16, 16), jnp.bfloat16)
    lowered = jax.jit(f).lower(x, w)
    for text in (lowered.as_text(dialect="hlo"), lowered.compile().as_text()):
        st = step_hlo.stats(text)
        assert sum(d["n"] for d in st["dots"]) == 3, st["dots"]
        assert sum(d["n"] * d["flops"] for d in st["dots"]) == 3 * 2 * 8 * 16 * 16
        assert "3x" in step_hlo.report("f", st)


def test_trace_summary_reads_a_trace_and_never_fails(tmp_path, capsys):
    import gzip
    import json

    trace_summary = _script("trace_summary")
    events = [dict(ph="M", name="process_name", pid=1, args=dict(name="/device:GPU:0")),
              dict(ph="M", name="thread_name", pid=1, tid=7, args=dict(name="Stream #7(Compute)")),
              dict(ph="X", pid=1, tid=7, name="sm90_xmma_gemm_bf16bf16", dur=300.0, args=dict(hlo_op="dot.1")),
              dict(ph="X", pid=1, tid=7, name="loop_add_fusion", dur=100.0, args=dict(hlo_op="fusion.2")),
              dict(ph="X", pid=1, tid=7, name="cudnn_flash_fprop", dur=600.0, args=dict(hlo_op="custom-call.3"))]
    trace = tmp_path / "plugins" / "profile" / "run"
    trace.mkdir(parents=True)
    with gzip.open(trace / "host.trace.json.gz", "wt") as f:
        json.dump(dict(traceEvents=events), f)
    hlo = tmp_path / "step.hlo.txt"
    hlo.write_text('  %dot.1 = bf16[2,2]{1,0} dot(%a, %b), metadata={op_name="jit(step)/transpose(jvp())/dot_general"}\n')
    assert trace_summary.main([str(tmp_path), "--hlo", str(hlo)]) == 0
    text = capsys.readouterr().out
    assert "attention 0.60 ms (60%)" in text and "matmul 0.30 ms (30%)" in text
    assert "transpose(jvp())/dot_general" in text
    assert trace_summary.main([str(tmp_path / "nothing")]) == 0  # no trace: says so, exits 0
    assert "failed" in capsys.readouterr().out


def test_unembedding_backward_in_bf16_and_exact_in_float32():
    """`unembed_product`: a bf16 model's backward takes the logits' cotangent in bf16 (as the
    plain step does), not two float32 products over the vocabulary; in float32 it is the
    plain product, forward and reverse mode alike."""
    from segexec_jax.model.transformer import unembed_product

    step_hlo = _script("step_hlo")
    cfg = sj.load_config("1b", TINY + ["model.dtype=bfloat16"])
    params = random_params(cfg, seed=0)
    tokens = jnp.zeros((1, 32), jnp.int32)
    text = jax.jit(jax.grad(lambda p: sj.loss(p, cfg, tokens))).lower(params).as_text(dialect="hlo")
    V = cfg.model.vocab_size
    vocab_dots = [d for d in step_hlo.stats(text)["dots"] if f"{V}" in "".join(d["shapes"]) + d["out"]]
    assert len(vocab_dots) >= 3 and all(d["ins"] == "bf16" for d in vocab_dots), vocab_dots
    rng = np.random.default_rng(0)
    h, w, dh, dw = (rng.standard_normal(s, np.float32) for s in [(2, 3, 8), (5, 8), (2, 3, 8), (5, 8)])
    plain_product = lambda h, w: jnp.einsum("btd,vd->btv", h, w, precision="highest")
    for f in (lambda h, w: unembed_product("btd,vd->btv", h, w), plain_product):
        out, tangent = jax.jvp(f, (h, w), (dh, dw))
        np.testing.assert_allclose(out, plain_product(h, w), rtol=1e-6)
        np.testing.assert_allclose(tangent, plain_product(dh, w) + plain_product(h, dw), rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda h, w: jnp.sum(jnp.sin(unembed_product("btd,vd->btv", h, w))), argnums=(0, 1))(h, w)
    g_ref = jax.grad(lambda h, w: jnp.sum(jnp.sin(plain_product(h, w))), argnums=(0, 1))(h, w)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
