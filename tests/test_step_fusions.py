"""The training step's fusions change how it runs, not what it computes: the non-finite guard
as a conditional (training/loop.py) gives the states and metrics of the select over the whole
state it replaced, and costs no copy of the state in the compiled step.

Bit for bit only on the first step: from the second on, XLA fuses AdamW's moment update
`b1 * mu + (1 - b1) * g` differently in the two programs and rounds it differently in the
last bit (on CPU the select's own program differs from the same step without any guard by as
much), so later steps agree to float32 rounding."""

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import random_tokens, tiny

import segexec_jax as sx
from segexec_jax.model.sharding import batch_sharding, make_mesh, replicated
from segexec_jax.segment.objective import token_count
from segexec_jax.training import loop as train
from segexec_jax.training.optim import optimizer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_hlo.py"
spec = importlib.util.spec_from_file_location("step_hlo", SCRIPT)
step_hlo = importlib.util.module_from_spec(spec)
sys.modules["step_hlo"] = step_hlo
spec.loader.exec_module(step_hlo)

SMALL = ["train.seq_len=64", "train.batch_size=4", "segment.len=32", "segment.tail=8", "segment.retrieval.budget=8",
         "segment.retrieval.query_window=8", "mesh.data=1", "train.warmup_steps=1", "train.lr=1e-2"]


def select_step(cfg, opt, guard: bool = True):
    """The step as it was: the update always computed, then `where(finite, new, old)` over
    params and optimizer state (the reference for the conditional); `guard=False`: the update
    always applied."""
    A = cfg.train.grad_accum

    def step(state, batch):
        params = state["params"]
        tokens, docs = batch["tokens"], batch.get("doc_ids")
        split = lambda a: None if a is None else train.strided_micro_batches(a, A)

        def micro(carry, mb):
            g_acc, l_acc, n_acc = carry
            t, d = mb
            n = token_count(t, d).astype(jnp.float32)
            value, grads = jax.value_and_grad(train.loss)(params, cfg, t, None, d)
            g_acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype) * n, g_acc, grads)
            return (g_acc, l_acc + value * n, n_acc + n), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (g, total, n), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)), (split(tokens), split(docs)))
        n = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda a, p: (a / n).astype(p.dtype), g, params)
        value = total / n
        grad_norm = optax.tree.norm(grads) if hasattr(optax, "tree") else optax.global_norm(grads)
        ok = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        updates, opt_state = opt.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old) if guard else new
        return (dict(params=keep(new_params, params), opt_state=keep(opt_state, state["opt_state"]),
                     step=state["step"] + 1, rng=state["rng"]),
                dict(loss=value, grad_norm=grad_norm, finite=ok, tokens=n))

    return step


def compiled(cfg, opt, make, poisoned: bool, monkeypatch):
    """`make(cfg, opt)` jitted as `compile_step` does it (donated state); `poisoned`: its loss
    is NaN (traced with the trainer's `loss` replaced)."""
    mesh = make_mesh(cfg)
    abstract, shardings = train.state_shardings(cfg, opt, mesh)
    rows = batch_sharding(mesh, cfg.train.batch_size // cfg.train.grad_accum)
    fn = jax.jit(make(cfg, opt), in_shardings=(shardings, {"tokens": rows, "doc_ids": rows}),
                 out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))
    shape = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len), jnp.int32, sharding=rows)
    with monkeypatch.context() as m:
        if poisoned:
            m.setattr(train, "loss", lambda *a, **k: sx.loss(*a, **k) * jnp.nan)
        with jax.set_mesh(mesh):
            return fn.lower(abstract, {"tokens": shape, "doc_ids": shape}).compile()


def bits(tree):
    return [np.array(a) for a in jax.tree.leaves(tree)]  # copies: the step donates the state


@pytest.mark.parametrize("mode,accum", [("full", 1), ("full", 2), ("segmented", 2)])
def test_the_conditional_guard_is_the_select(mode, accum, monkeypatch):
    """Four steps, the second with a NaN loss: the same losses, norms, flags, parameters and
    optimizer state as the select over the state (bit for bit on the first step); the NaN step
    changes nothing but the step counter."""
    cfg = tiny(*SMALL, f"attention.mode={mode}", f"train.grad_accum={accum}")
    opt = optimizer(cfg.train)
    steps = {name: {p: compiled(cfg, opt, make, p, monkeypatch) for p in (False, True)}
             for name, make in (("cond", train.make_train_step), ("select", select_step))}
    docs = np.ones((4, 64), np.int32)
    docs[1, 40:] = 2  # two documents in one row: the weights and the token count differ per micro-batch
    batches = [dict(tokens=jnp.asarray(random_tokens(4, 64, seed=s)), doc_ids=jnp.asarray(docs)) for s in range(4)]
    fresh = lambda: jax.jit(train.init_state(cfg, opt))()
    states = {name: fresh() for name in steps}
    for i, batch in enumerate(batches):
        poisoned = i == 1
        before = bits(states["cond"])
        out = {}
        for name, step in steps.items():
            states[name], out[name] = step[poisoned](states[name], batch)
        for a, b in zip(bits(out["cond"]) + bits(states["cond"]), bits(out["select"]) + bits(states["select"])):
            if i == 0:
                np.testing.assert_array_equal(a, b)
            else:  # two programs (cond, select) fuse and round differently: float32 rounding at
                # the leaf's scale (8 ulps of its largest entry), not per entry, since entries
                # far below that scale carry the rounding of the sums they came from
                scale = float(np.abs(b).max()) if b.size else 0.0
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=8 * np.finfo(np.float32).eps * scale)
        assert bool(out["cond"]["finite"]) is not poisoned
        if poisoned:  # params and moments as they were; only the step counter moved
            after = bits(states["cond"])
            moved = [not np.array_equal(a, b, equal_nan=True) for a, b in zip(before, after)]
            assert moved == [leaf is states["cond"]["step"] for leaf in jax.tree.leaves(states["cond"])]
    assert int(states["cond"]["step"]) == 4


def _copy_bytes(compiled_step) -> int:
    """Bytes of the top-level copies of arrays (scalars, such as loop counters, left out)."""
    st = step_hlo.stats(compiled_step.as_text())
    scalar = lambda m: m["shape"].endswith("[]")
    return sum(m["n"] * m["bytes"] for m in st["moves"] if m["op"] == "copy" and not m["fused"] and not scalar(m))


def test_the_guard_copies_no_state(monkeypatch):
    """The compiled step copies no more than the same step without any non-finite guard (the
    select copied every parameter and moment before updating them in place)."""
    cfg = tiny(*SMALL, "attention.mode=full", "model.vocab_size=256", "model.d_model=128", "model.d_ff=256")
    opt = optimizer(cfg.train)

    unguarded = lambda cfg, opt: select_step(cfg, opt, guard=False)
    ours = _copy_bytes(compiled(cfg, opt, train.make_train_step, False, monkeypatch))
    bare = _copy_bytes(compiled(cfg, opt, unguarded, False, monkeypatch))
    select = _copy_bytes(compiled(cfg, opt, select_step, False, monkeypatch))
    n_state = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(jax.eval_shape(train.init_state(cfg, opt))))
    assert ours <= bare, (ours, bare)
    if jax.default_backend() == "cpu":  # what the conditional fixed, on the compiler it was measured with
        assert select - ours > n_state // 2, (select, ours, n_state)
