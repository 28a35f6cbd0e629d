"""Benchmarks: `python -m segexec_jax.bench train ...` (one configuration per process).

Each run prints one JSON object (and appends it to --out): compile time, the compiled
memory analysis, the median step time, tokens/s, MFU by 6·N·tokens against --peak-tflops,
and the device's peak memory (`memory_stats()['peak_bytes_in_use']`). Run every
configuration in a fresh process so that peak memory belongs to it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from .config import load_config
from .data import dataset, prefetch
from .model import count_params
from .objective import loss
from .optim import optimizer
from .tokenization import load_tokenizer
from .train import init_state, make_train_step

GIB = 2**30


def _peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _git_commit() -> str:
    """The checkout's commit; SEGEXEC_COMMIT names it where the tree travels without .git."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("SEGEXEC_COMMIT", "unknown")


def bench_train(args) -> dict:
    overrides = [f"train.seq_len={args.seq_len}", f"train.batch_size={args.batch}"] + list(args.overrides)
    if args.mode:
        overrides.append(f"attention.mode={args.mode}")
    cfg = load_config(args.config, overrides)
    B, T = cfg.train.batch_size, cfg.train.seq_len
    opt = optimizer(cfg.train)
    state = jax.jit(init_state(cfg, opt))()
    n_params = count_params(state["params"])
    step = make_train_step(cfg, opt)
    if args.grad_only:
        def step(state, batch):  # noqa: F811  (value_and_grad alone, no accumulation or update)
            value, grads = jax.value_and_grad(loss)(state["params"], cfg, batch["tokens"])
            return state, dict(loss=value, grads=grads)

    jitted = jax.jit(step, donate_argnums=(0,))
    if args.data:  # the real input pipeline: packed documents with ids, prefetched
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        source = iter(prefetch(dataset(cfg, tokenizer, "train")))
        next_batch = lambda i: {k: jnp.asarray(v) for k, v in next(source).items()}
        example = {"tokens": jax.ShapeDtypeStruct((B, T), jnp.int32), "doc_ids": jax.ShapeDtypeStruct((B, T), jnp.int32)}
    else:  # random tokens, one document per row (no doc ids: the fused-kernel attention path)
        rng = np.random.default_rng(0)
        batches = [{"tokens": jnp.asarray(rng.integers(0, cfg.model.vocab_size, (B, T), dtype=np.int32)),
                    "doc_ids": None} for _ in range(2)]
        next_batch = lambda i: batches[i % 2]
        example = batches[0]
    t0 = time.perf_counter()
    compiled = jitted.lower(state, example).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    times, losses, waits = [], [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        batch = next_batch(i)
        t1 = time.perf_counter()
        state, out = compiled(state, batch)
        jax.block_until_ready((state, out))
        losses.append(float(out["loss"]))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            waits.append(t1 - t0)
    if args.data:
        source.close()
    step_s = statistics.median(times)
    tokens = B * T
    flops = 6 * n_params * tokens
    peak = _peak_bytes()
    return dict(
        bench="train", config=args.config, mode=cfg.attention.mode, seq_len=T, batch=B,
        grad_accum=cfg.train.grad_accum, grad_horizon=cfg.segment.grad_horizon, segment_len=cfg.segment.len, tail=cfg.segment.tail,
        budget=cfg.segment.retrieval.budget, remat=cfg.model.remat, dtype=cfg.model.dtype,
        backend=cfg.attention.backend, overrides=list(args.overrides), grad_only=args.grad_only,
        params=n_params, compile_s=round(compile_s, 2), step_s=round(step_s, 4),
        step_s_all=[round(t, 4) for t in times], tokens_per_s=round(tokens / step_s, 1),
        mfu=round(flops / step_s / (args.peak_tflops * 1e12), 4), loss_first=losses[0],
        input=("pipeline" if args.data else "random"),
        input_wait_fraction=round(sum(waits) / sum(times), 4),
        temp_gib=round(mem.temp_size_in_bytes / GIB, 3) if mem else None,
        peak_gib=round(peak / GIB, 3) if peak else None,
        device=str(jax.devices()[0].device_kind), jax=jax.__version__, commit=_git_commit(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        date=time.strftime("%Y-%m-%d"),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m segexec_jax.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="training step time, tokens/s, MFU and peak memory")
    tr.add_argument("--config", default="1b", help="preset name or YAML path (default: 1b)")
    tr.add_argument("--seq-len", type=int, default=8192)
    tr.add_argument("--batch", type=int, default=1)
    tr.add_argument("--mode", choices=["segmented", "full"], default=None)
    tr.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    tr.add_argument("--warmup", type=int, default=2)
    tr.add_argument("--grad-only", action="store_true", help="time value_and_grad without the optimizer")
    tr.add_argument("--data", action="store_true",
                    help="feed the real input pipeline (data.* config) and report the time waiting for it")
    tr.add_argument("--peak-tflops", type=float, default=790.0,
                    help="MFU denominator (default: the bf16 matmul rate measured on the H200)")
    tr.add_argument("--out", default=None, help="append the JSON result to this file")
    tr.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    result = bench_train(args)
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
