"""What an 8-bit inference cache costs in accuracy on a real model (issue 14, item 2).

For each mode and `inference.kv_dtype`, greedy generation from the same prompts of held-out
corpus text; the log-probabilities of the generated tokens are compared with those of the
bfloat16 cache at every step up to the first token where the two generations differ (after
that the texts are no longer the same). Printed: the max and mean |Δ log p| over those
steps, how many steps were compared, and the greedy tokens that agree.

  python -m segexec_jax.convert from-gguf --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out ckpt/smol
  python benchmarks/kv_accuracy.py --checkpoint ckpt/smol --length 3072 --prompts 4 --new 32 \
      segment.len=1024 segment.tail=128 segment.retrieval.budget=256 ...

One JSON line per (mode, kv_dtype) goes to --out as well.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from segexec_jax import generate, load_checkpoint
from segexec_jax.config import config_from_dict
from segexec_jax.data.tokenization import load_tokenizer
from segexec_jax.evaluation.suite import validation_rows
from segexec_jax.training.checkpoint import read_meta

KV_DTYPES = ("bfloat16", "int8", "float8_e4m3fn")


def compare(base, other) -> dict:
    """|Δ log p| over the steps before the first differing token, per row."""
    diffs, agree, total = [], 0, 0
    for b in range(base.tokens.shape[0]):
        same = base.tokens[b] == other.tokens[b]
        n = int(np.argmin(same)) if not same.all() else len(same)
        diffs += list(np.abs(base.logprobs[b, :n] - other.logprobs[b, :n]))
        agree += int(same.sum())
        total += len(same)
    return {"steps_compared": len(diffs), "max_abs_dlogp": float(max(diffs, default=0.0)),
            "mean_abs_dlogp": float(np.mean(diffs)) if diffs else 0.0, "tokens_equal": f"{agree}/{total}"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--length", type=int, default=3072, help="prompt tokens")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--new", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--modes", nargs="*", default=["segmented", "full"])
    p.add_argument("--out", default=None, help="append one JSON line per (mode, kv_dtype)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.dtype=bfloat16")
    a = p.parse_args()
    cfg, params = load_checkpoint(a.checkpoint)
    cfg = config_from_dict(cfg.to_dict(), a.overrides)
    tok = load_tokenizer(read_meta(a.checkpoint).get("tokenizer", "bytes"), search=Path(a.checkpoint))
    prompts = validation_rows(cfg, tok, a.length, a.prompts, seed=0)
    for mode in a.modes:
        runs = {}
        for kv in KV_DTYPES:
            run_cfg = config_from_dict(cfg.to_dict(), [f"attention.mode={mode}", f"inference.kv_dtype={kv}"])
            runs[kv] = generate(params, run_cfg, prompts, max_new_tokens=a.new)
        for kv in KV_DTYPES[1:]:
            row = {"mode": mode, "kv_dtype": kv, "against": "bfloat16", "prompt_tokens": a.length,
                   "prompts": a.prompts, "new_tokens": a.new, "compute": cfg.model.dtype, **compare(runs["bfloat16"], runs[kv])}
            print(json.dumps(row), flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
