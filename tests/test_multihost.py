"""Multi-host training on localhost: two CPU processes joined by jax.distributed (gloo), four
simulated devices each, that checkpoint and resume."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import tiny

import segexec_jax as sx
from segexec_jax.training import loop as train

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["train.seq_len=128", "train.batch_size=8", "segment.len=32", "segment.tail=8",
         "segment.retrieval.budget=8", "segment.retrieval.query_window=8", "train.log_every=1",
         "eval.every=1000", "eval.batches=1", "train.warmup_steps=2"]


def free_port() -> int:
    try:
        import portpicker

        return portpicker.pick_unused_port()
    except ImportError:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            return s.getsockname()[1]


def train_on_two_processes(*overrides: str) -> None:
    """`train.py` as processes 0 and 1 of a two-process run; both must finish cleanly."""
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--coordinator", f"localhost:{port}",
                               "--num-processes", "2", "--process-id", str(i), *overrides],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=400)[0] for p in procs]
    finally:  # a hung process must not outlive the test
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n\n".join(o[-3000:] for o in outs)


def logged(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step: dict[int, dict] = {}
    for r in records:
        by_step.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k != "time"})
    return by_step


@pytest.mark.slow
def test_two_process_resume_is_bit_identical(tmp_path):
    """Each process keeps its own data position: a two-process run resumed from its step-2
    checkpoint logs the same losses and ends with the same parameters as the run that went
    straight through (~2 minutes on two cores)."""
    # short documents of many lengths, so that the two processes stand at different positions
    rng = np.random.default_rng(0)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": "".join(rng.choice(list("abcdefgh \n"), n))}) + "\n"
                            for n in rng.integers(20, 400, 300)))
    over = [*SMALL, f"data.files=['{docs}']", "train.steps=4", "checkpoint.every=2", "checkpoint.keep=5"]
    straight = tmp_path / "straight"
    train_on_two_processes(*over, f"run.dir={straight}")
    data_dir = straight / "checkpoints" / "2" / "data"
    files = sorted(p.name for p in data_dir.glob("process_*.json"))
    assert files == ["process_0-of-2.json", "process_1-of-2.json"]
    positions = [json.loads((data_dir / f).read_text()) for f in files]
    assert positions[0] != positions[1]  # so resuming a process at the other's position would show

    # the run directory as an interruption right after step 2 leaves it
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= 2))
    train_on_two_processes(*over, f"run.dir={resumed}")

    a, b = logged(straight), logged(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("loss", "grad_norm", "val_loss"):
            assert a[step].get(key) == b[step].get(key), (step, key, a[step], b[step])
    _, pa = sx.load_checkpoint(straight)
    _, pb = sx.load_checkpoint(resumed)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # one process cannot take over the positions of two
    cfg = tiny(*over, "train.steps=6", f"run.dir={resumed}")
    with pytest.raises(sx.CheckpointError, match=r"data positions of 2 processes.* this run has 1"):
        train.run(cfg)
