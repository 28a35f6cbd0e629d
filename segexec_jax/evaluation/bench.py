"""Benchmarks, one configuration per process (so that peak memory belongs to it alone):

  python -m segexec_jax.bench train   ...  training step: time, tokens/s, MFU, input wait
  python -m segexec_jax.bench prefill ...  prompt prefill: time to first token, peak memory
  python -m segexec_jax.bench decode  ...  decoding tokens/s at a given context, largest batch

Each run prints one JSON object (and appends it to --out) with the device's peak memory
(`memory_stats()['peak_bytes_in_use']`), the parameters' bytes and what lies beyond them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..cli import ArgumentParser
from ..config import load_config, preset_names
from ..data.pipeline import dataset, prefetch
from ..data.tokenization import load_tokenizer
from ..model.sharding import check_batch, global_batch, make_mesh
from ..model.transformer import count_params
from ..segment.objective import loss
from ..training.loop import compile_step, init_state, state_shardings
from ..training.optim import optimizer

GIB = 2**30
# HBM bandwidth (bytes/s) by device kind, as the vendors list it: the denominator of a decode
# step's floor (SPEC §8 measured ~4.3e12 on the H200 used for BENCHMARKS.md)
HBM_BYTES_PER_S = {"NVIDIA H200": 4.8e12, "NVIDIA H100": 3.35e12, "NVIDIA A100": 2.0e12,
                   "TPU v5 lite": 8.19e11, "TPU v5p": 2.765e12, "TPU v6 lite": 1.64e12, "TPU v4": 1.2e12}


def hbm_bandwidth(device_kind: str) -> float | None:
    """The table's bandwidth for a device kind (the longest matching name), None if unknown."""
    names = [name for name in HBM_BYTES_PER_S if device_kind.startswith(name)]
    return HBM_BYTES_PER_S[max(names, key=len)] if names else None


def _peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _git_commit() -> str:
    """The checkout's commit; SEGEXEC_COMMIT, when set, names it instead (a copied tree may
    travel without .git, or with stale git metadata)."""
    if os.environ.get("SEGEXEC_COMMIT"):
        return os.environ["SEGEXEC_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _peak_per_device() -> list[int]:
    return [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices()]


def bench_train(args) -> dict:
    """The training step exactly as `train.run` compiles it (sharded over `mesh.*`), on
    random tokens (one document per row: the fused-kernel path) or, with --data, on the
    real input pipeline. tokens/s counts the whole mesh; per_device divides by its size."""
    overrides = [f"train.seq_len={args.seq_len}", f"train.batch_size={args.batch}"] + list(args.overrides)
    if args.mode:
        overrides.append(f"attention.mode={args.mode}")
    cfg = load_config(args.config, overrides)
    B, T = cfg.train.batch_size, cfg.train.seq_len
    mesh = make_mesh(cfg)
    check_batch(cfg, mesh)
    opt = optimizer(cfg.train)
    _, shardings = state_shardings(cfg, opt, mesh)
    state = jax.jit(init_state(cfg, opt), out_shardings=shardings)()
    n_params = count_params(state["params"])
    t0 = time.perf_counter()
    if args.grad_only:  # value_and_grad alone (no accumulation or update), on one device
        grad = lambda state, batch: (state, dict(zip(("loss", "grads"), jax.value_and_grad(loss)(
            state["params"], cfg, batch["tokens"], None, batch.get("doc_ids")))))
        rows = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        example = {"tokens": jax.ShapeDtypeStruct((B, T), jnp.int32)}
        if args.data:
            example["doc_ids"] = example["tokens"]
        compiled = jax.jit(grad, donate_argnums=(0,)).lower(state, example).compile()
    else:
        compiled, rows = compile_step(cfg, opt, mesh, shardings, state, doc_ids=args.data)
    compile_s = time.perf_counter() - t0
    if args.data:  # the real input pipeline: packed documents with ids, prefetched
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        source = iter(prefetch(dataset(cfg, tokenizer, "train")))
        next_batch = lambda i: global_batch(next(source), rows)
    else:  # random tokens, one document per row (no doc ids: the fused-kernel attention path)
        rng = np.random.default_rng(0)
        batches = [{"tokens": jax.device_put(rng.integers(0, cfg.model.vocab_size, (B, T), dtype=np.int32), rows)}
                   for _ in range(2)]
        next_batch = lambda i: batches[i % 2]
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
    devices = mesh.size
    flops = 6 * n_params * tokens
    peaks = _peak_per_device()
    return dict(
        bench="train", config=args.config, mode=cfg.attention.mode, seq_len=T, batch=B,
        grad_accum=cfg.train.grad_accum, grad_horizon=cfg.segment.grad_horizon, segment_len=cfg.segment.len, tail=cfg.segment.tail,
        budget=cfg.segment.retrieval.budget, remat=cfg.model.remat, segment_remat=cfg.segment.remat,
        dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
        backend=cfg.attention.backend, overrides=list(args.overrides), grad_only=args.grad_only,
        mesh=dict(mesh.shape), fsdp_gather=cfg.mesh.fsdp_gather, devices=devices,
        params=n_params, compile_s=round(compile_s, 2), step_s=round(step_s, 4),
        step_s_all=[round(t, 4) for t in times], tokens_per_s=round(tokens / step_s, 1),
        tokens_per_s_per_device=round(tokens / step_s / devices, 1),
        mfu=round(flops / step_s / (args.peak_tflops * 1e12 * devices), 4), loss_first=losses[0],
        loss_last=losses[-1], input=("pipeline" if args.data else "random"),
        input_wait_fraction=round(sum(waits) / sum(times), 4),
        temp_gib=round(mem.temp_size_in_bytes / GIB, 3) if mem else None,
        peak_gib=round(max(peaks) / GIB, 3) if any(peaks) else None,
        peak_gib_per_device=[round(p / GIB, 3) for p in peaks],
        device=str(jax.devices()[0].device_kind), jax=jax.__version__, commit=_git_commit(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        date=time.strftime("%Y-%m-%d"),
    )


def _common(cfg, args) -> dict:
    return dict(config=args.config, mode=cfg.attention.mode, overrides=list(args.overrides),
                dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, backend=cfg.attention.backend,
                segment_len=cfg.segment.len, tail=cfg.segment.tail, budget=cfg.segment.retrieval.budget,
                device=str(jax.devices()[0].device_kind), jax=jax.__version__, commit=_git_commit(),
                xla_flags=os.environ.get("XLA_FLAGS", ""), date=time.strftime("%Y-%m-%d"))


def _inference_setup(args, extra: list[str]):
    from ..model.transformer import init_params

    overrides = list(args.overrides) + extra + ([f"attention.mode={args.mode}"] if args.mode else [])
    cfg = load_config(args.config, overrides)
    params = jax.jit(lambda: init_params(cfg, seed=0))()
    jax.block_until_ready(params)
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    return cfg, params, int(weights)


def bench_prefill(args) -> dict:
    """Time to first token and peak memory of a prefill of --seq-len tokens (random prompt)."""
    from ..inference.generate import _engine

    T, B = args.seq_len, args.batch
    cfg, params, weights = _inference_setup(args, [f"inference.max_len={T}"])
    prefill = _engine(cfg)[0]
    S = cfg.segment.len if cfg.attention.mode == "segmented" else 1
    padded = -(-T // S) * S
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.model.vocab_size, (B, padded), dtype=np.int32))
    lengths = jnp.full((B,), T, jnp.int32)
    t0 = time.perf_counter()
    compiled = prefill.lower(params, tokens, lengths, padded).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(args.warmup + args.repeats):
        t0 = time.perf_counter()
        out = compiled(params, tokens, lengths)
        jax.block_until_ready(out)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        del out
    peak = _peak_bytes()
    mem = compiled.memory_analysis()
    return dict(bench="prefill", seq_len=T, batch=B, **_common(cfg, args), compile_s=round(compile_s, 2),
                ttft_s=round(statistics.median(times), 4), ttft_s_all=[round(t, 4) for t in times],
                weights_gib=round(weights / GIB, 3), peak_gib=round(peak / GIB, 3) if peak else None,
                beyond_weights_gib=round((peak - weights) / GIB, 3) if peak else None,
                temp_gib=round(mem.temp_size_in_bytes / GIB, 3) if mem else None)


def _decode_state(cfg, B: int, context: int, capacity: int, dtype):
    """A cache as it stands after `context` tokens (random contents, exact shapes)."""
    from ..inference.decode import FullCache, empty_cache
    from ..segment.operator import Sinks

    keys = iter(jax.random.split(jax.random.key(1), 64))

    def rand(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return (jax.random.normal(next(keys), x.shape, jnp.float32) * 0.5).astype(x.dtype)

    length = jnp.full((B,), context, jnp.int32)
    if cfg.attention.mode == "full":
        shape = (cfg.model.n_layers, B, capacity, cfg.model.n_kv_heads, cfg.model.dim_head)
        return FullCache(length, rand(jnp.zeros(shape, dtype)), rand(jnp.zeros(shape, dtype))), None
    if cfg.attention.mode == "streaming":
        from ..segment.streaming import empty_cache as stream_cache

        c = stream_cache(cfg, B, dtype)
        W, n = cfg.inference.stream_window, cfg.inference.stream_sinks
        slots = jnp.arange(W)
        pos = context - 1 - ((context - 1 - n - slots) % W)  # the newest position held by each slot
        ring_pos = jnp.broadcast_to(pos, (B, W)).astype(jnp.int32)
        return dataclasses.replace(jax.tree.map(rand, c), length=length, ring_pos=ring_pos), None
    cache, pool = empty_cache(cfg, B, capacity, dtype)
    cache = jax.tree.map(rand, cache)
    R = cache.ret.k.shape[2]
    ret = dataclasses.replace(cache.ret, count=jnp.full((B,), R, jnp.int32), doc=jnp.ones((B,), jnp.int32))
    sinks = Sinks(cache.sinks.k, cache.sinks.v, jnp.ones((B,), jnp.int32), jnp.zeros((B,), jnp.int32))
    return dataclasses.replace(cache, length=length, ret=ret, sinks=sinks), jax.tree.map(rand, pool)


def decode_read_bytes(cfg, params, B: int, length: float) -> dict:
    """What one decode step must read from HBM, in bytes, with every row at `length` tokens
    consumed (before the step): the weights (the input embedding only where tied: untied,
    one row per token is gathered) and every cache entry the new token sees, once:
      full       keys and values of slots 0..length, every layer and KV head;
      streaming  the sinks and the recent window, every layer and KV head;
      segmented  per layer, the segment so far (offsets 0..j, every KV head), the sinks and
                 tail of the local KV heads, the retrieved prefix (R entries) of the long-range
                 heads of long layers (as after prefill: tail, sinks and R all valid).
    `cache_whole` is every byte of the cache buffers (what reading them whole would cost)."""
    from ..segment.operator import has_pool
    from ..segment.roles import role_plan

    m = cfg.model
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    if not m.tie_embeddings and "embed" in params:
        weights -= params["embed"].size * params["embed"].dtype.itemsize
    kv = cfg.inference.kv_dtype or m.dtype
    # one entry of one KV head, keys and values: D values, plus a float32 scale each when 8-bit
    entry = 2 * (m.dim_head * jnp.dtype(kv).itemsize + (4 if kv in ("int8", "float8_e4m3fn") else 0))
    L, G = m.n_layers, m.n_kv_heads
    if cfg.attention.mode == "full":
        entries = L * G * (length + 1)
    elif cfg.attention.mode == "streaming":  # sinks and the recent window
        entries = L * G * min(length + 1, cfg.inference.stream_sinks + cfg.inference.stream_window)
    else:
        plan = role_plan(cfg)
        S, M, n = cfg.segment.len, cfg.segment.tail, cfg.segment.sinks
        long_groups = plan.long_used.sum(1)  # [L]
        local = float((G - long_groups).sum())
        j = length % S
        entries = L * G * (j + 1) + (local * (M + n) if length >= S else 0.0)
        if has_pool(cfg) and length >= S:
            R = cfg.segment.retrieval.budget
            entries += R * float(long_groups[list(plan.long_layers)].sum())
    return dict(weights=int(weights), cache=int(B * entries * entry))


def bench_decode(args) -> dict:
    """Decode tokens/s at --context tokens of context and --batch rows: the median step,
    plus 1/S of a segment fill per token (each row fills once every S tokens) and, with
    `segment.retrieval.refresh`, the chunk selections between fills."""
    from ..inference.decode import cache_bytes, decode_kernel
    from ..inference.generate import _engine, _memory

    B, context, steps = args.batch, args.context, args.steps
    cfg, params, weights = _inference_setup(args, [f"inference.max_len={context + args.warmup + steps + 1}"])
    _, step, fill, refresh, on_host = _engine(cfg)
    S = cfg.segment.len if cfg.attention.mode == "segmented" else 1
    capacity = -(-cfg.inference.max_len // S) * S
    cache, pool = jax.jit(_decode_state, static_argnums=(0, 1, 2, 3, 4))(cfg, B, context, capacity,
                                                                       jnp.dtype(cfg.model.dtype))
    if on_host:
        pool = jax.device_put(pool, _memory("pinned_host"))
    token = jnp.zeros((B,), jnp.int32)
    times = []
    for i in range(args.warmup + steps):
        t0 = time.perf_counter()
        cache, logits = step(params, cache, token)
        token = jnp.argmax(logits, -1).astype(jnp.int32)
        jax.block_until_ready(token)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    every_row = jnp.ones((B,), bool)

    def median_call(between):  # a fill or a refresh for every row: the median of two timed calls
        nonlocal cache, pool
        if between is None:
            return 0.0
        times = []
        for i in range(3):
            t0 = time.perf_counter()
            cache, pool = between(cache, pool, every_row)
            jax.block_until_ready(cache)
            if i:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    fill_s = median_call(fill)  # every row fills once per segment: charged 1/S per token
    # with `refresh`, a new chunk's selection once every `refresh` tokens between fills
    refresh_s, chunk = median_call(refresh), cfg.segment.retrieval.refresh or S
    per_token = step_s + fill_s / S + refresh_s * (S // chunk - 1) / S
    peak = _peak_bytes()
    # the HBM floor of the timed steps (rows at context + warmup .. + steps - 1 tokens: the mean)
    read = decode_read_bytes(cfg, params, B, context + args.warmup + (steps - 1) / 2)
    whole = read["weights"] + cache_bytes(cache)
    bandwidth = hbm_bandwidth(str(jax.devices()[0].device_kind))
    floor = dict(hbm_bytes_per_s=bandwidth, read_bytes=read["weights"] + read["cache"], read_gib=round((read["weights"] + read["cache"]) / GIB, 3),
                 read_cache_gib=round(read["cache"] / GIB, 3), cache_whole_gib=round(cache_bytes(cache) / GIB, 3))
    if bandwidth:
        floor_s = (read["weights"] + read["cache"]) / bandwidth
        floor.update(floor_ms=round(1000 * floor_s, 3), step_over_floor=round(step_s / floor_s, 2),
                     floor_whole_cache_ms=round(1000 * whole / bandwidth, 3),
                     step_over_floor_whole_cache=round(step_s * bandwidth / whole, 2))
    return dict(bench="decode", context=context, batch=B, steps=steps, **_common(cfg, args),
                decode_kernel=decode_kernel(cfg), **floor,
                tokens_per_s=round(B / per_token, 2), step_ms=round(1000 * step_s, 3),
                fill_ms=round(1000 * fill_s, 3), refresh_ms=round(1000 * refresh_s, 3),
                tokens_per_s_steps_only=round(B / step_s, 2),
                pool_on_host=on_host, weights_gib=round(weights / GIB, 3),
                peak_gib=round(peak / GIB, 3) if peak else None,
                beyond_weights_gib=round((peak - weights) / GIB, 3) if peak else None)


def largest_batch(argv: list[str], start: int = 1, limit: int = 4096) -> dict | None:
    """`bench decode` in fresh processes: from batch `start` up by a quarter while it runs, or
    down by a fifth until it runs; the result of the largest batch that ran. A start near the
    answer (from the cache size per row) needs two or three processes."""

    def attempt(batch: int) -> dict | None:
        proc = subprocess.run([sys.executable, "-m", "segexec_jax.bench", "decode", *argv, "--batch", str(batch)],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"batch {batch}: does not run ({proc.stderr.strip().splitlines()[-1:] or ['no output']})",
                  file=sys.stderr, flush=True)
            return None
        print(f"batch {batch}: runs", file=sys.stderr, flush=True)
        return json.loads(lines[-1])

    best = attempt(start)
    if best is None:
        batch = start
        while best is None and batch > 1:
            batch = max(1, min(batch - 1, batch * 4 // 5))
            best = attempt(batch)
        return best
    batch = start
    while batch < limit:
        batch = min(limit, max(batch + 1, batch * 5 // 4))
        result = attempt(batch)
        if result is None:
            break
        best = result
    return best


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m segexec_jax.bench", description=__doc__)  # --help shows defaults
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="training step time, tokens/s, MFU and peak memory")
    presets = f"preset ({', '.join(preset_names())}) or YAML path"
    mode_help = "attention mode (default: the config's attention.mode)"
    tr.add_argument("--config", default="1b", help=presets)
    tr.add_argument("--seq-len", type=int, default=8192)
    tr.add_argument("--batch", type=int, default=1)
    tr.add_argument("--mode", choices=["segmented", "full"], default=None, help=mode_help)
    tr.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    tr.add_argument("--warmup", type=int, default=2)
    tr.add_argument("--grad-only", action="store_true", help="time value_and_grad without the optimizer")
    tr.add_argument("--data", action="store_true",
                    help="feed the real input pipeline (data.* config) and report the time waiting for it")
    tr.add_argument("--peak-tflops", type=float, default=790.0,
                    help="MFU denominator (the bf16 matmul rate measured on the H200)")
    tr.add_argument("--out", default=None, help="append the JSON result to this file")
    tr.add_argument("overrides", nargs="*", help="config overrides key=value")
    pf = sub.add_parser("prefill", help="prefill time (time to first token) and peak memory")
    pf.add_argument("--config", default="llama2_7b", help=presets)
    pf.add_argument("--mode", choices=["segmented", "full", "streaming"], default=None, help=mode_help)
    pf.add_argument("--seq-len", type=int, default=32768)
    pf.add_argument("--batch", type=int, default=1)
    pf.add_argument("--repeats", type=int, default=3)
    pf.add_argument("--warmup", type=int, default=1)
    pf.add_argument("--out", default=None)
    pf.add_argument("overrides", nargs="*")
    dc = sub.add_parser("decode", help="decode tokens/s at a context length")
    dc.add_argument("--config", default="llama2_7b", help=presets)
    dc.add_argument("--mode", choices=["segmented", "full", "streaming"], default=None, help=mode_help)
    dc.add_argument("--context", type=int, default=32768)
    dc.add_argument("--batch", type=int, default=1)
    dc.add_argument("--max-batch", action="store_true", help="find the largest batch that runs (fresh processes)")
    dc.add_argument("--start-batch", type=int, default=1, help="first batch tried by --max-batch")
    dc.add_argument("--steps", type=int, default=32)
    dc.add_argument("--warmup", type=int, default=4)
    dc.add_argument("--out", default=None)
    dc.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.command == "decode" and args.max_batch:
        forward = ["--config", args.config, "--context", str(args.context), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)] + (["--mode", args.mode] if args.mode else []) + list(args.overrides)
        if args.start_batch < 1:
            raise SystemExit(f"--start-batch must be at least 1, got {args.start_batch}")
        result = largest_batch(forward, start=args.start_batch)
        if result is None:
            raise SystemExit("decode does not run even at batch 1")
        result["largest_batch"] = True
    else:
        result = {"train": bench_train, "prefill": bench_prefill, "decode": bench_decode}[args.command](args)
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
