"""Fault injection: a trainer killed (SIGKILL) at random moments, during steps and during
asynchronous saves, ten times over, resumes each time and ends bit for bit where an
uninterrupted run ends. Opt-in (`python -m pytest -m slow tests/test_faults.py`, 7 minutes on
a busy 16-core machine): every restart pays for starting Python and compiling."""

import json
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import tiny

from segexec_jax.training import checkpoint
from segexec_jax.training import loop as train

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["train.seq_len=64", "train.batch_size=2", "segment.len=16", "segment.tail=4",
         "segment.retrieval.budget=4", "segment.retrieval.query_window=4", "mesh.data=1",
         "train.log_every=1", "eval.every=1000", "eval.batches=1", "train.warmup_steps=2",
         "checkpoint.every=1", "checkpoint.keep=3"]
STEPS = 60


def saved_steps(run_dir: Path) -> list[int]:
    d = run_dir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def unfinished_saves(run_dir: Path) -> list[str]:
    """Orbax's temporary step directories: a save the kill interrupted."""
    d = run_dir / "checkpoints"
    return [p.name for p in d.iterdir() if "tmp" in p.name] if d.is_dir() else []


def final_state(run_dir: Path) -> dict:
    step = saved_steps(run_dir)[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return step, ocp.PyTreeCheckpointer().restore(run_dir / "checkpoints" / str(step) / "state")


@pytest.mark.slow
def test_killed_ten_times_at_random_moments_resumes_bit_for_bit(tmp_path):
    over = [*SMALL, f"train.steps={STEPS}"]
    straight = tmp_path / "straight"
    train.run(tiny(*over, f"run.dir={straight}"))

    run_dir = tmp_path / "killed"
    rng = random.Random(12)
    kills, during_save = [], 0
    for _ in range(10):
        before = saved_steps(run_dir)
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *over, f"run.dir={run_dir}"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while saved_steps(run_dir)[-1:] == before[-1:] and time.time() < deadline:  # training has begun
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.0))  # a random moment: inside a step or an async save
        unfinished = unfinished_saves(run_dir)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
        during_save += bool(unfinished or unfinished_saves(run_dir))
        kills.append(saved_steps(run_dir)[-1])
    assert kills == sorted(kills) and kills[-1] < STEPS, kills  # each restart went on from the last save
    assert during_save >= 1, "no kill landed inside a save"

    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *over, f"run.dir={run_dir}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    step_a, a = final_state(straight)
    step_b, b = final_state(run_dir)
    assert step_a == step_b == STEPS
    leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for (path, x), y in zip(leaves_a, leaves_b):  # parameters, AdamW moments, step, RNG key
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    # the data positions came back too: every logged loss equals the uninterrupted run's
    losses = lambda d: {r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                        if "loss" in r}
    assert losses(run_dir) == losses(straight)
    assert all(r["status"] == "ok" for r in checkpoint.list_checkpoints(run_dir, verify=True))
    print(f"killed after saves {kills}; {during_save} of 10 kills inside a save")
