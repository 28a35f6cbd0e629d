"""Parallelism of the training step on 8 simulated devices (conftest): micro-batches stay
sharded, FSDP takes a micro-batch of one row and gathers the weights outside the loops,
tensor parallelism splits heads, and every layout's step equals the one-device step."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import F64, max_abs_diff, random_tokens, tiny

from segexec_jax.model.sharding import make_mesh
from segexec_jax.model.transformer import param_shapes
from segexec_jax.training import loop as train
from segexec_jax.training.optim import optimizer

SMALL = ["train.seq_len=64", "segment.len=32", "segment.tail=8", "segment.retrieval.budget=8",
         "segment.retrieval.query_window=8"]


def test_strided_micro_batches():
    rows = jnp.arange(12)[:, None] * jnp.ones((1, 3), jnp.int32)
    micro = train.strided_micro_batches(rows, 3)
    assert micro.shape == (3, 4, 3)
    assert micro[:, :, 0].tolist() == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]


def compiled_step(cfg):
    """The step as train.run compiles it, its fresh state and the batch's sharding."""
    mesh, opt = make_mesh(cfg), optimizer(cfg.train)
    _, shardings = train.state_shardings(cfg, opt, mesh)
    state = jax.jit(train.init_state(cfg, opt), out_shardings=shardings)()
    compiled, rows = train.compile_step(cfg, opt, mesh, shardings, state)
    return compiled, state, rows


@pytest.mark.parametrize("mesh", [pytest.param(["mesh.data=8"], marks=pytest.mark.slow), ["mesh.data=2", "mesh.fsdp=4"]])
def test_accumulation_keeps_micro_batches_sharded(mesh, capfd):
    """grad_accum 2 over 8 devices: the compiled step moves no token between devices, XLA
    reports no involuntary rematerialization, and its loss and parameters equal those of one
    un-accumulated step on one device."""
    cfg = tiny(*SMALL, *mesh, "train.batch_size=16", "train.grad_accum=2")
    compiled, state, rows = compiled_step(cfg)
    gathers = [line for line in compiled.as_text().splitlines() if re.search(r"= s32\[[^=]* all-gather(-start)?\(", line)]
    assert not gathers, gathers[:3]
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    tokens = random_tokens(16, 64, seed=3)
    batch = {"tokens": jax.device_put(tokens, rows), "doc_ids": jax.device_put(np.ones_like(tokens), rows)}
    new_state, out = compiled(state, batch)

    one = tiny(*SMALL, "mesh.data=1", "train.batch_size=16", "train.grad_accum=1")
    opt = optimizer(one.train)
    ref_state, ref_out = jax.jit(train.make_train_step(one, opt))(jax.jit(train.init_state(one, opt))(),
                                                                  {"tokens": tokens, "doc_ids": np.ones_like(tokens)})
    assert abs(float(out["loss"]) - float(ref_out["loss"])) < 1e-5
    assert max_abs_diff(new_state["params"], ref_state["params"]) < 1e-5


def _computations(hlo: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head:
            name = head.group(1)
            comps[name] = []
        elif name is not None:
            comps[name].append(line)
    return comps


def gathers_in_loops(hlo: str) -> list[tuple[int, ...]]:
    """Output shapes of the all-gathers that run inside a while loop (a scan), at any depth."""
    comps = _computations(hlo)
    callees = {c: {m.group(1) for l in lines for m in re.finditer(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", l)}
               for c, lines in comps.items()}
    for c, lines in comps.items():
        for l in lines:
            for m in re.finditer(r"branch_computations=\{([^}]*)\}", l):
                callees[c] |= {x.strip().lstrip("%") for x in m.group(1).split(",")}
    todo = [m.group(1) for lines in comps.values() for l in lines for m in re.finditer(r"body=%?([\w.\-]+)", l)]
    inside: set[str] = set()
    while todo:
        c = todo.pop()
        if c not in inside:
            inside.add(c)
            todo += list(callees.get(c, ()))
    shapes = []
    for c in inside:
        for l in comps.get(c, []):
            m = re.search(r"= \(?[a-z0-9]+\[([\d,]*)\][^=]* all-gather(-start)?\(", l)
            if m:
                shapes.append(tuple(int(d) for d in m.group(1).split(",") if d))
    return shapes


def weight_shapes(cfg) -> set[tuple[int, ...]]:
    """Every parameter's shape, whole and per layer."""
    shapes = jax.tree.leaves(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    return {tuple(s) for s in shapes} | {tuple(s[1:]) for s in shapes if len(s) > 1}


def one_device_step(cfg_overrides, tokens):
    one = tiny(*cfg_overrides, "mesh.data=1", f"train.batch_size={tokens.shape[0]}", "train.grad_accum=1")
    opt = optimizer(one.train)
    return jax.jit(train.make_train_step(one, opt))(jax.jit(train.init_state(one, opt))(),
                                                     {"tokens": tokens, "doc_ids": np.ones_like(tokens)})


def test_micro_batch_of_one_on_data_fsdp_and_tensor(capfd):
    """The paper's micro-batch of one row on data 2 × fsdp 2 × tensor 2: rows over data,
    a row's positions over fsdp, heads over tensor. The weights are stored sharded over fsdp
    and tensor, FSDP gathers them once outside every loop (no weight-shaped all-gather runs
    per segment or layer), XLA reports no involuntary rematerialization, and the step equals
    one step of the whole batch on one device."""
    cfg = tiny(*SMALL, "train.seq_len=96", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.batch_size=4",
               "train.grad_accum=2")
    compiled, state, rows = compiled_step(cfg)
    assert rows.spec == jax.sharding.PartitionSpec("data", None)
    wq = state["params"]["blocks"]["wq"].sharding.spec  # [layers, embed, q_heads, head_dim]
    assert tuple(wq) == (None, "fsdp", "tensor", None), wq
    looped = set(gathers_in_loops(compiled.as_text()))
    assert not looped & weight_shapes(cfg), looped & weight_shapes(cfg)
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    tokens = random_tokens(4, 96, seed=5)
    batch = {"tokens": jax.device_put(tokens, rows), "doc_ids": jax.device_put(np.ones_like(tokens), rows)}
    new_state, out = compiled(state, batch)
    ref_state, ref_out = one_device_step([*SMALL, "train.seq_len=96"], tokens)
    assert abs(float(out["loss"]) - float(ref_out["loss"])) < 1e-5
    assert max_abs_diff(new_state["params"], ref_state["params"]) < 1e-5


@pytest.mark.slow
def test_fsdp_gather_per_layer_stays_in_the_loops():
    """`mesh.fsdp_gather=layer` keeps the gathers at each use (what `step` removes), and
    computes the same step."""
    cfg = tiny(*SMALL, "mesh.data=1", "mesh.fsdp=2", "mesh.fsdp_gather=layer", "train.batch_size=1")
    compiled, state, rows = compiled_step(cfg)
    assert set(gathers_in_loops(compiled.as_text())) & weight_shapes(cfg)
    tokens = random_tokens(1, 64, seed=6)
    new_state, out = compiled(state, {"tokens": jax.device_put(tokens, rows),
                                      "doc_ids": jax.device_put(np.ones_like(tokens), rows)})
    ref_state, ref_out = one_device_step(SMALL, tokens)
    assert abs(float(out["loss"]) - float(ref_out["loss"])) < 1e-5
    assert max_abs_diff(new_state["params"], ref_state["params"]) < 1e-5


def test_generate_tensor_parallel(x64):
    """generate on a mesh with tensor 2: the weights, KV caches and pool are split over heads,
    and the tokens and log-probabilities are those of one device (float64: the two programs
    sum in different orders, so in float32 the test would compare their rounding)."""
    import segexec_jax as sx
    from segexec_jax.inference.generate import _engine
    from segexec_jax.model.transformer import param_shardings

    cfg = tiny(*SMALL, *F64, "model.init_std=0.3", "inference.max_len=96", "mesh.data=1", "mesh.tensor=2")
    mesh = make_mesh(cfg)
    params = sx.init_params(cfg, seed=1)
    sharded = jax.device_put(params, param_shardings(cfg, params, mesh))
    assert "tensor" in tuple(sharded["blocks"]["wk"].sharding.spec)
    prompts = [list(range(1, 40)), list(range(50, 61))]  # past a segment boundary; ragged
    one = sx.generate(params, cfg, prompts, max_new_tokens=30)
    split = sx.generate(sharded, cfg, prompts, max_new_tokens=30, mesh=mesh)
    assert split.tokens.tolist() == one.tokens.tolist()
    # float64 programs; generate rounds the logits to float32 before its log-softmax, so the
    # two agree to float32 rounding at the log-probs' scale (8 ulps), not to float64's
    gap = np.nanmax(np.abs(split.logprobs.astype(np.float64) - one.logprobs))
    assert gap <= 8 * np.finfo(np.float32).eps * max(1.0, np.nanmax(np.abs(one.logprobs))), gap
    with jax.set_mesh(mesh):
        cache, pool, _ = _engine(cfg)[0](sharded, jnp.zeros((2, 32), jnp.int32), jnp.array([32, 20]), 96)
    kv = [leaf for leaf in jax.tree.leaves((cache, pool))
          if leaf.ndim >= 4 and leaf.size and leaf.shape[-2] % 2 == 0]  # (one long head stays whole)
    assert kv and all("tensor" in tuple(leaf.sharding.spec) for leaf in kv), \
        [(leaf.shape, leaf.sharding.spec) for leaf in kv]
