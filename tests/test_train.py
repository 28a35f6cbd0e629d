"""Training end to end: run directory, resume bit for bit, signals, faults, sharding, multi-host."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_abs_diff, tiny

import segexec_jax as sx
from segexec_jax.data import pipeline as data
from segexec_jax.data.tokenization import ByteTokenizer
from segexec_jax.training import loop as train
from segexec_jax.training.checkpoint import Checkpointer, as_path
from segexec_jax.training.metrics import MetricsWriter
from segexec_jax.training.optim import decay_mask, learning_rate, optimizer

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["train.seq_len=128", "train.batch_size=4", "segment.len=32", "segment.tail=8",
         "segment.retrieval.budget=8", "segment.retrieval.query_window=8", "train.log_every=1",
         "eval.every=1000", "eval.batches=1", "mesh.data=1", "train.warmup_steps=2"]


def small(tmp_path, *overrides, name="run"):
    return tiny(*SMALL, f"run.dir={tmp_path / name}", *overrides)


def _as_from_a_terminal():
    # a child inherits an ignored SIGINT, and the trainer keeps an ignored SIGINT ignored (as
    # `python train.py &` from a shell wants): a test worker whose SIGINT some library set to
    # SIG_IGN made the Ctrl-C test's trainer train on after its SIGINT
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*args, env=None, **kwargs):
    """`python train.py ARGS` started as from a terminal (SIGINT not ignored), output piped."""
    env = dict(os.environ if env is None else env, PYTHONFAULTHANDLER="1")  # SIGABRT prints every thread's stack
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_as_from_a_terminal, **kwargs)


def finish(proc, timeout: float) -> str:
    """The trainer's output once it exits; if it has not within `timeout` s, fail with the
    stack of each of its threads (faulthandler, on SIGABRT) to show where it waits."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        out = proc.communicate(timeout=60)[0]
        pytest.fail(f"the trainer did not exit within {timeout} s; its threads:\n{out[-12000:]}")


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def steps_saved(run_dir) -> list[int]:
    d = Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def test_cli_writes_the_run_directory(tmp_path):
    run_dir = tmp_path / "cli"
    proc = cli(*SMALL, "train.steps=6", "eval.every=3", "checkpoint.every=3", f"run.dir={run_dir}")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert sx.load_config(run_dir / "config.yaml").train.steps == 6
    records = read_metrics(run_dir)
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4, 5, 6] and all(np.isfinite(r["loss"]) for r in losses)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and len(evals[0]["val_loss_by_segment"]) == 4
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert steps_saved(run_dir) == [3, 6]
    cfg, params = sx.load_checkpoint(run_dir)
    assert cfg.train.steps == 6 and params["embed"].shape == (256, 64)


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    over = ["train.steps=40", "checkpoint.every=5", "checkpoint.keep=20"]
    reference = train.run(small(tmp_path, *over, name="straight"))
    assert reference["step"] == 40
    killed_dir = tmp_path / "killed"
    proc = cli(*SMALL, *over, f"run.dir={killed_dir}")
    deadline = time.time() + 300
    while not [s for s in steps_saved(killed_dir) if s >= 15] and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = steps_saved(killed_dir)
    assert 15 <= max(saved) < 40, saved
    resumed = train.run(small(tmp_path, *over, name="killed"))
    assert resumed["start_step"] == max(saved) and resumed["step"] == 40
    _, a = sx.load_checkpoint(tmp_path / "straight")
    _, b = sx.load_checkpoint(killed_dir)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # the data position came back too: the logged losses after the resume point match
    straight = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight") if "loss" in r}
    again = {r["step"]: r["loss"] for r in read_metrics(killed_dir) if "loss" in r}
    assert all(again[s] == straight[s] for s in range(max(saved) + 1, 41))


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "term"
    proc = cli(*SMALL, "train.steps=100000", "checkpoint.every=10", f"run.dir={run_dir}")
    deadline = time.time() + 300
    while not steps_saved(run_dir) and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM" in out
    last = max(steps_saved(run_dir))
    logged = max(r["step"] for r in read_metrics(run_dir) if "loss" in r)
    assert last == logged >= 10  # the checkpoint is of the step it stopped at


def test_interrupted_save_leaves_last_good_checkpoint(tmp_path):
    cfg = small(tmp_path, "train.steps=4", "checkpoint.every=2")
    train.run(cfg)
    ckpts = Path(cfg.run.dir) / "checkpoints"
    partial = ckpts / "6.orbax-checkpoint-tmp-1234"  # what a kill in the middle of a save leaves
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 100)
    _, params = sx.load_checkpoint(cfg.run.dir)
    assert Checkpointer(cfg.run.dir, keep=3).latest_step() == 4
    summary = train.run(cfg.replace(train=cfg.train.__class__(**{**cfg.train.__dict__, "steps": 6})))
    assert summary["start_step"] == 4 and summary["step"] == 6


def test_full_disk_during_save_is_a_clear_error(tmp_path, monkeypatch):
    cfg = small(tmp_path, "train.steps=6", "checkpoint.every=2")
    real_save = Checkpointer.save
    calls = {"n": 0}

    def failing_save(self, step, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise self._write_error(step, OSError(errno.ENOSPC, "No space left on device"))
        return real_save(self, step, *args)

    monkeypatch.setattr(Checkpointer, "save", failing_save)
    with pytest.raises(sx.CheckpointError, match=r"step 4 .* no space left on device; the last good checkpoint \(step 2\) is intact"):
        train.run(cfg)
    cfg2, params = sx.load_checkpoint(cfg.run.dir)
    assert steps_saved(cfg.run.dir) == [2] and cfg2 == cfg


def test_nonfinite_losses_skip_updates_then_stop_with_a_checkpoint(tmp_path, monkeypatch):
    nan_loss = lambda *a, **k: sx.loss(*a, **k) * jnp.nan
    monkeypatch.setattr(train, "loss", nan_loss)
    cfg = small(tmp_path, "train.steps=50", "train.max_nonfinite=3", "checkpoint.every=100")
    with pytest.raises(train.TrainingStopped, match="3 non-finite losses in a row"):
        train.run(cfg)
    assert steps_saved(cfg.run.dir) == [3]
    _, params = sx.load_checkpoint(cfg.run.dir)  # no update was applied
    initial = jax.jit(train.init_state(cfg, optimizer(cfg.train)))()["params"]
    assert max_abs_diff(params, initial) == 0
    assert all(not r["finite"] for r in read_metrics(cfg.run.dir) if "loss" in r)


def _state_and_batch(cfg, B):
    opt = optimizer(cfg.train)
    state = train.init_state(cfg, opt)()
    batch = next(iter(data.dataset(cfg, ByteTokenizer(), "train", batch_size=B)))
    return opt, state, {k: jnp.asarray(v) for k, v in batch.items()}


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    cfg1 = small(tmp_path, "train.grad_accum=1")
    cfg2 = small(tmp_path, "train.grad_accum=2")
    opt, state, batch = _state_and_batch(cfg1, 4)
    s1, m1 = jax.jit(train.make_train_step(cfg1, opt))(state, batch)
    s2, m2 = jax.jit(train.make_train_step(cfg2, opt))(state, batch)
    assert abs(float(m1["loss"] - m2["loss"])) < 1e-6
    assert max_abs_diff(s1["params"], s2["params"]) < 1e-6
    assert int(s1["step"]) == 1 and bool(m1["finite"])


def test_a_nonfinite_step_keeps_the_state(tmp_path):
    cfg = small(tmp_path)
    opt, state, batch = _state_and_batch(cfg, 4)
    state["params"]["final_norm"]["scale"] = state["params"]["final_norm"]["scale"].at[0].set(jnp.inf)
    new, m = jax.jit(train.make_train_step(cfg, opt))(state, batch)
    assert not bool(m["finite"]) and int(new["step"]) == 1
    for a, b in zip(jax.tree.leaves((new["params"], new["opt_state"])),
                    jax.tree.leaves((state["params"], state["opt_state"]))):
        assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)


def test_sharded_training_matches_one_device(tmp_path, monkeypatch):
    """Eight simulated devices as data 2 × fsdp 2 × tensor 2, against one device: 3 steps. The
    losses and the parameters after the last update agree, and the trained state was really
    split over the mesh (what the trainer hands to its checkpoint, the state it trained)."""
    one = train.run(small(tmp_path, "train.steps=3", "checkpoint.every=100", name="one"))
    saved = []
    save = Checkpointer.save

    def keep(self, step, state, *rest, **kwargs):  # the state the trainer trained, as it saves it
        saved.append((step, state))
        return save(self, step, state, *rest, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", keep)
    many = train.run(small(tmp_path, "train.steps=3", "checkpoint.every=100", "mesh.data=2",
                           "mesh.fsdp=2", "mesh.tensor=2", name="many"))
    a = [r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r]
    b = [r["loss"] for r in read_metrics(tmp_path / "many") if "loss" in r]
    assert len(a) == len(b) == 3 and one["step"] == many["step"] == 3
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    (step, state), = saved
    assert step == 3
    wq = state["params"]["blocks"]["wq"]  # [layers, embed, q_heads, head_dim]
    assert dict(wq.sharding.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert wq.sharding.spec[1:3] == ("fsdp", "tensor")
    L, d, H, D = wq.shape
    assert {s.data.shape for s in wq.addressable_shards} == {(L, d // 2, H // 2, D)}
    mu = next(x for x in jax.tree.leaves(state["opt_state"]) if x.shape == wq.shape)  # Adam's moments too
    assert mu.sharding.spec == wq.sharding.spec
    _, params_one = sx.load_checkpoint(tmp_path / "one")
    assert jax.tree.structure(params_one) == jax.tree.structure(state["params"])
    assert max_abs_diff(params_one, state["params"]) < 1e-5


def test_two_processes_on_localhost(tmp_path):
    """jax.distributed across 2 CPU processes (4 devices each): the first step's loss equals
    the loss of the same global batch computed here, and both processes finish. A rerun on the
    same run.dir, stopped after its step-2 checkpoint, resumes there (every process its own
    shards and data position) and ends on the uninterrupted run's parameters, bit for bit."""
    run_dir = tmp_path / "mh"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    over = [o for o in SMALL if not o.startswith("mesh.")] + ["train.batch_size=8", "train.steps=3",
                                                             "checkpoint.every=2", f"run.dir={run_dir}"]

    def two_processes() -> str:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        procs = [cli("--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i), *over,
                     env=env) for i in range(2)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        return outs[0]

    two_processes()
    cfg = tiny(*SMALL, "train.batch_size=8")
    rows = [next(iter(data.dataset(cfg, ByteTokenizer(), "train", process_index=i, process_count=2)))
            for i in range(2)]
    batch = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    params = jax.jit(train.init_state(cfg, optimizer(cfg.train)))()["params"]
    expected = sx.loss(params, cfg, batch["tokens"], None, batch["doc_ids"])
    first = [r for r in read_metrics(run_dir) if r.get("step") == 1 and "loss" in r][0]
    assert abs(first["loss"] - float(expected)) < 1e-5

    assert steps_saved(run_dir) == [2, 3]
    straight = [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]
    _, uninterrupted = sx.load_checkpoint(run_dir / "checkpoints" / "3")
    uninterrupted = jax.tree.map(np.asarray, uninterrupted)
    shutil.rmtree(run_dir / "checkpoints" / "3")  # as if stopped right after saving step 2
    out = two_processes()
    assert f"resuming from step 2 in {run_dir}" in out, out
    assert steps_saved(run_dir) == [2, 3]
    assert [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r] == straight
    _, resumed = sx.load_checkpoint(run_dir)
    assert jax.tree.structure(resumed) == jax.tree.structure(uninterrupted)
    for x, y in zip(jax.tree.leaves(uninterrupted), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(x, np.asarray(y))


def test_bad_setups_are_clear_errors(tmp_path):
    with pytest.raises(sx.ConfigError, match=r"'train.batch_size'.*must be divisible by mesh.data \(8\)"):
        train.run(small(tmp_path, "mesh.data=8", "train.batch_size=4"))
    with pytest.raises(sx.ConfigError, match="'data.tokenizer': tokenizer 'nope.json' not found"):
        train.run(small(tmp_path, "data.tokenizer=nope.json"))
    with pytest.raises(data.DataError, match="matches no file"):
        train.run(small(tmp_path, f"data.files=['{tmp_path}/none/*.txt']"))
    with pytest.raises(sx.ConfigError, match="'mesh'.*does not fit the 8 devices"):
        train.run(small(tmp_path, "mesh.data=16"))
    train.run(small(tmp_path, "train.steps=2", name="x"))
    with pytest.raises(sx.CheckpointError, match="differs in model.d_model"):
        train.run(small(tmp_path, "train.steps=2", "model.d_model=32", name="x"))


def test_schedule_and_weight_decay_mask():
    t = tiny("train.lr=1.0", "train.warmup_steps=10", "train.steps=110", "train.min_lr_ratio=0.1").train
    lr = learning_rate(t)
    assert float(lr(0)) == 0.0 and abs(float(lr(10)) - 1.0) < 1e-6
    assert abs(float(lr(60)) - 0.55) < 1e-3 and abs(float(lr(110)) - 0.1) < 1e-6
    params = sx.init_params(tiny(), seed=0)
    mask = decay_mask(params)
    assert mask["blocks"]["wq"] and mask["embed"] and not mask["final_norm"]["scale"]
    assert not mask["blocks"]["attn_norm"]["scale"]


def test_one_text_file_without_validation_trains(tmp_path):
    """A single file with data.val_fraction=0: training runs, and evaluates nothing."""
    book = tmp_path / "book.txt"
    book.write_text("A long book about nothing in particular. " * 200)
    cfg = small(tmp_path, f"data.files=['{book}']", "data.val_fraction=0", "train.steps=2", "eval.every=1")
    summary = train.run(cfg)
    assert summary["step"] == 2
    rows = read_metrics(cfg.run.dir)
    assert rows and not any("val_loss" in r for r in rows)


def _wait_for_rows(proc, run_dir, n=1, timeout=300):
    """Wait until the trainer `proc` has logged `n` rows (it is then training, holding its lock)."""
    deadline = time.time() + timeout
    path = Path(run_dir) / "metrics.jsonl"
    while not (path.is_file() and len(path.read_text().splitlines()) >= n) and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    assert proc.poll() is None


def test_ctrl_c_saves_exits_130_and_the_rerun_resumes(tmp_path):
    """SIGINT: a checkpoint of the step it stopped at, status 130, one line and no traceback.
    The rerun says where it resumes (INFO lines reach stderr despite Orbax's logging setup)."""
    run_dir = tmp_path / "int"
    never = ["checkpoint.every=100000"]  # only the interrupt saves (and 30 minutes never pass)
    proc = cli(*SMALL, "train.steps=100000", *never, f"run.dir={run_dir}")
    _wait_for_rows(proc, run_dir, n=3)
    proc.send_signal(signal.SIGINT)
    out = finish(proc, 120)
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert "INFO compiled train step" in out, out
    (line,) = [x for x in out.splitlines() if "SIGINT" in x]
    last = max(r["step"] for r in read_metrics(run_dir) if "loss" in r)
    assert steps_saved(run_dir) == [last] and f"saved checkpoint at step {last} " in line, out
    with open(run_dir / "metrics.jsonl", "a") as f:  # as if killed after logging past its checkpoint
        f.write(json.dumps({"step": last + 1, "loss": 1.0}) + '\n{"step": ')
    proc = cli(*SMALL, f"train.steps={last + 2}", *never, f"run.dir={run_dir}")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert f"resuming from step {last} in {run_dir}" in out, out
    logged = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, last + 3)) and logged[last]["loss"] != 1.0
    assert steps_saved(run_dir) == [last, last + 2]  # the end of the run saves


def test_one_trainer_per_run_dir(tmp_path, capsys):
    """A second trainer on a busy run.dir: one error line, status 1, the first goes on. A lock
    left by a SIGKILLed trainer does not block the rerun."""
    run_dir = tmp_path / "busy"
    over = [*SMALL, "checkpoint.every=100000", f"run.dir={run_dir}"]
    proc = cli(*over, "train.steps=100000")
    _wait_for_rows(proc, run_dir)
    assert train.main([*over, "train.steps=3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: run.dir {run_dir} is in use by another trainer "
                                                   f"(pid {proc.pid} on "), err
    rows = len(read_metrics(run_dir))
    _wait_for_rows(proc, run_dir, n=rows + 2)  # the first one is still training
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run_dir / train.LOCK_FILE).exists()
    with train.run_dir_lock(as_path(run_dir), main_process=True):
        with pytest.raises(train.RunDirBusy, match=f"pid {os.getpid()} on "):  # the lock works, and is ours now
            with train.run_dir_lock(as_path(run_dir), main_process=True):
                pass


def test_checkpoints_on_a_time_cadence(tmp_path):
    """(The end-of-run save: test_ctrl_c_saves_exits_130_and_the_rerun_resumes.)"""
    cfg = small(tmp_path, "train.steps=3", "checkpoint.every=100", "checkpoint.keep=10",
                "checkpoint.every_minutes=1e-9", "data.val_fraction=0")  # due after every step
    train.run(cfg)
    assert steps_saved(cfg.run.dir) == [1, 2, 3]
    assert sx.load_config("tiny").checkpoint.every_minutes == 30
    with pytest.raises(sx.ConfigError, match="'checkpoint.every_minutes': must be >= 0"):
        small(tmp_path, "checkpoint.every_minutes=-1")


def test_metrics_keep_through_a_step(tmp_path):
    """What a resume from step 3 does to metrics.jsonl: rows of later steps and a torn line go."""
    w = MetricsWriter(tmp_path)
    for step in (1, 2, 3, 3, 4, 5):
        w.write(step, {"loss": float(step)})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # killed in the middle of a line
    w = MetricsWriter(tmp_path, keep_through=3)
    w.write(4, {"loss": 40.0})
    w.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (3, 3.0),
                                                                       (4, 40.0)]
    MetricsWriter(tmp_path, keep_through=0).close()  # a fresh start (no checkpoint): nothing is kept
    assert read_metrics(tmp_path) == []
