"""Parallelism of the training step on 8 simulated devices (conftest): micro-batches stay
sharded, and the step equals the one-device step."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_abs_diff, random_tokens, tiny

from segexec_jax import train
from segexec_jax.optim import optimizer
from segexec_jax.sharding import make_mesh, replicated

SMALL = ["train.seq_len=64", "segment.len=32", "segment.tail=8", "segment.retrieval.budget=8",
         "segment.retrieval.query_window=8"]


def test_strided_micro_batches():
    rows = jnp.arange(12)[:, None] * jnp.ones((1, 3), jnp.int32)
    micro = train.strided_micro_batches(rows, 3)
    assert micro.shape == (3, 4, 3)
    assert micro[:, :, 0].tolist() == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]


def compiled_step(cfg):
    mesh, opt = make_mesh(cfg), optimizer(cfg.train)
    abstract, shardings = train.state_shardings(cfg, opt, mesh)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    step = jax.jit(train.make_train_step(cfg, opt), in_shardings=(shardings, {"tokens": rows, "doc_ids": rows}),
                   out_shardings=(shardings, replicated(mesh)))
    state = jax.jit(train.init_state(cfg, opt), out_shardings=shardings)()
    example = {k: jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len), jnp.int32, sharding=rows)
               for k in ("tokens", "doc_ids")}
    with jax.set_mesh(mesh):  # as train.run traces it: activations pinned at the layer boundaries
        return step.lower(state, example).compile(), state, rows


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
