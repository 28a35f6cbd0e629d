"""Compiled memory of the segmented prefill, read from XLA without running it:

  JAX_PLATFORMS=cpu python benchmarks/prefill_memory.py --config llama2_7b --seq-len 81920 \
      model.param_dtype=bfloat16 inference.kv_dtype=int8 [key=value ...]

compiles the prefill exactly as `python -m segexec_jax.bench prefill` does (`inference.generate`'s
jitted engine, `inference.max_len` = the padded length) on abstract inputs
(`jax.ShapeDtypeStruct`: nothing is allocated), and prints one JSON line with
`compiled.memory_analysis()`: argument (the weights and tokens), output (the cache, pool and
logits) and temporary bytes, and what the output holds part by part (`cache_bytes`).

These are the compiling platform's figures, not a device's peak: on the CPU attention runs
as XLA's dense einsum, whose [B H S K] scores are a large share of the temporaries that a GPU's
cuDNN kernel never holds, so compare figures of one platform with each other only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import time

import jax
import jax.numpy as jnp

from segexec_jax.config import load_config
from segexec_jax.inference.decode import cache_bytes
from segexec_jax.inference.generate import _engine
from segexec_jax.model.transformer import init_params

MIB = 2**20


def measure(config: str, seq_len: int, overrides: list[str], batch: int = 1, topology: str | None = None) -> dict:
    cfg = load_config(config, [*overrides, "attention.mode=segmented", f"inference.max_len={seq_len}"])
    S = cfg.segment.len
    padded = -(-seq_len // S) * S
    on = lambda tree: tree  # noqa: E731
    target = contextlib.nullcontext()
    if topology is not None:  # the first chip of a TPU slice, as `python -m segexec_jax.aot` compiles for it
        from segexec_jax.evaluation.aot import _on, tpu_slice
        from segexec_jax.model.platform import compiling_for

        chip = tpu_slice(topology).devices[0]
        on, target = (lambda tree: _on(chip, tree)), compiling_for("tpu")
    params = on(jax.eval_shape(lambda: init_params(cfg, seed=0)))
    tokens = on(jax.ShapeDtypeStruct((batch, padded), jnp.int32))
    lengths = on(jax.ShapeDtypeStruct((batch,), jnp.int32))
    prefill = _engine(cfg)[0]
    t0 = time.perf_counter()
    with target:
        compiled = prefill.lower(params, tokens, lengths, padded).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cache, pool, logits = jax.eval_shape(lambda p, t, n: prefill(p, t, n, padded), params, tokens, lengths)
    parts = {name: cache_bytes(getattr(cache, name)) for name in ("tail", "sinks", "seg_k", "seg_v", "seg_q", "ret")}
    parts["pool"], parts["logits"] = cache_bytes(pool), cache_bytes(logits)
    commit = os.environ.get("SEGEXEC_COMMIT")  # a copied tree without .git names its commit here
    if not commit:
        run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        commit = run.stdout.strip() or None
    return dict(config=config, seq_len=seq_len, batch=batch, overrides=overrides, platform=topology or jax.devices()[0].platform,
                jax=jax.__version__, commit=commit, compile_s=round(seconds, 1),
                argument_mib=round(mem.argument_size_in_bytes / MIB, 2),
                output_mib=round(mem.output_size_in_bytes / MIB, 2),
                alias_mib=round(mem.alias_size_in_bytes / MIB, 2),
                temp_mib=round(mem.temp_size_in_bytes / MIB, 2), temp_bytes=int(mem.temp_size_in_bytes),
                output_parts_mib={k: round(v / MIB, 2) for k, v in parts.items()})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="llama2_7b")
    parser.add_argument("--seq-len", type=int, default=81920)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--topology", help="compile for the first chip of this TPU slice (libtpu), e.g. v5p:2x2x1")
    parser.add_argument("--out", help="append the JSON line to this file too")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    line = json.dumps(measure(args.config, args.seq_len, args.overrides, args.batch, args.topology))
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
