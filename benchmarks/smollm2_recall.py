"""Does a retrieval rule find the needle? Needle recall of the long-range heads, on the CPU.

For passkey prompts on a converted checkpoint (SmolLM2-135M-Instruct in EVIDENCE.md), it
runs the segmented forward once and reads, for the segment that holds the question, which
pool entries each retrieval head selected under
  - the paper's rule: one selection per segment, queried by the end of the previous one;
  - `refresh`: the selection of the chunk that holds the question;
  - an oracle query: the mean of the head's pre-RoPE queries over the question's tokens
    (what a rule that could see the question would ask with).
Recall is the share of the needle's digit tokens (the only digits in a passkey prompt)
among the selected entries, per head. A rule that misses the needle cannot answer; one
that finds it leaves the rest to the model.

  python benchmarks/smollm2_recall.py --checkpoint ckpt/smol --heads heads.yaml \
      --lengths 2048 4096 --samples 8 [key=value ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from segexec_jax import retrieval, synthetic
from segexec_jax.checkpoint import load_checkpoint, read_meta
from segexec_jax.config import config_from_dict
from segexec_jax.decode import prefill_segmented
from segexec_jax.eval import chars_per_token
from segexec_jax.model import bind
from segexec_jax.roles import role_plan
from segexec_jax.segment import pad_to_segments, refresh_chunks, retrieval_query, scan_segments
from segexec_jax.tokenization import load_tokenizer

QUESTION = " What is the pass key? The pass key is"


def prompts(tokenizer, length: int, samples: int, seed: int):
    """Passkey prompts of about `length` tokens, all padded to one length with the filler's
    start (the needle sits at depth 0.5, so every row asks its question at the end)."""
    chars = int(length * chars_per_token(tokenizer, "passkey") * 0.95)
    rows = [tokenizer.encode(synthetic.generate("passkey", seed, 7_000_000 + i, chars, depth=0.5).prompt)
            for i in range(samples)]
    n = min(len(r) for r in rows)
    return np.asarray([r[len(r) - n:] for r in rows], np.int32)  # cut from the front: the end is the question


def recall(selected: np.ndarray, needle: np.ndarray) -> float:
    return float(np.isin(needle, selected).mean()) if len(needle) else float("nan")


def measure(params, cfg, tokenizer, tokens: np.ndarray) -> dict:
    S = cfg.segment.len
    B, T = tokens.shape
    plan = role_plan(cfg)
    digits = np.vectorize(lambda t: tokenizer.decode([int(t)]).strip().isdigit())(tokens)
    q_len = len(tokenizer.encode(QUESTION))
    last = (T - 1) // S  # the segment that holds the question
    padded = pad_to_segments(jnp.asarray(tokens), S)
    saved, _ = jax.jit(lambda p: scan_segments(bind(cfg, p), cfg, padded, jnp.ones_like(padded),
                                                  lambda x, s: 0.0, save=True, single_doc=True)[1:])(params)
    paper = np.asarray(saved.selection.index[last])  # [Ll B Gl R]
    chunk_of_question = (T - q_len - (last * S)) // (S // refresh_chunks(cfg))
    # prefill: the pool and the last segment's long-range queries (pre-RoPE)
    capacity = padded.shape[1]
    cache, pool, _ = jax.jit(lambda p: prefill_segmented(bind(cfg, p), cfg, padded, jnp.full((B,), T), capacity))(params)
    j = T - last * S
    window = (jnp.arange(S)[None] >= j - q_len) & (jnp.arange(S)[None] < j)
    query = jax.vmap(lambda q: retrieval_query(q, jnp.broadcast_to(window, (B, S)), plan.n_long))(cache.seg_q)
    candidate = jnp.arange(pool.k.shape[2])[None] < last * S
    oracle = np.asarray(retrieval.select(cfg.segment.retrieval, pool.k, query, jnp.broadcast_to(candidate, (B, pool.k.shape[2]))).index)
    out = {"paper": [], "oracle": [], "refresh": []}
    for b in range(B):
        needle = np.flatnonzero(digits[b, : last * S])  # needle digits in the pool (earlier segments)
        for li, layer in enumerate(plan.long_layers):
            for g in range(plan.n_long):
                out["paper"].append(recall(paper[li, b, g], needle))
                out["oracle"].append(recall(oracle[li, b, g], needle))
                if saved.chunk_index is not None:  # chunk 0 keeps the paper's selection
                    idx = (np.asarray(saved.chunk_index[last, layer, chunk_of_question - 1, b, g])
                           if chunk_of_question > 0 else paper[li, b, g])
                    out["refresh"].append(recall(idx, needle))
    return {k: float(np.nanmean(v)) for k, v in out.items() if v} | {"needle_in_pool": float(digits[:, : last * S].any(1).mean())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--lengths", nargs="*", type=int, default=[2048, 4096])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--out", default=None, help="write the JSON results here too")
    ap.add_argument("overrides", nargs="*", help="config overrides (and YAML files such as heads.yaml)")
    args = ap.parse_args(argv)
    cfg, params = load_checkpoint(args.checkpoint)
    cfg = config_from_dict(cfg.to_dict(), ["attention.mode=segmented", *args.overrides])
    tokenizer = load_tokenizer(read_meta(args.checkpoint).get("tokenizer", "bytes"), search=Path(args.checkpoint))
    rows = []
    for length in args.lengths:
        result = dict(length=length, **measure(params, cfg, tokenizer, prompts(tokenizer, length, args.samples, args.seed)))
        print(json.dumps(result), flush=True)
        rows.append(result)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(config=cfg.segment.__repr__(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
