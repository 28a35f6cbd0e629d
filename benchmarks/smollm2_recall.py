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

With --scan-heads it asks instead which heads of the whole model could find the needle:
under full attention (the model's own hidden states), for every layer and KV group, the
needle recall of the R pool entries that score highest against (a) the paper's query (the
last `query_window` tokens before the question's segment) and (b) the question's own
queries, with the rank AUC of needle digits against the other pool entries.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from segexec_jax.config import config_from_dict
from segexec_jax.data import synthetic
from segexec_jax.data.tokenization import load_tokenizer
from segexec_jax.evaluation.suite import chars_per_token
from segexec_jax.inference.decode import prefill_segmented
from segexec_jax.model.attention import AttentionMask, attend
from segexec_jax.model.rope import apply_rope, model_frequencies
from segexec_jax.model.transformer import apply_layer, bind, scan_layers
from segexec_jax.segment import retrieval
from segexec_jax.segment.operator import (
    pad_to_segments,
    refresh_chunks,
    retrieval_query,
    scan_segments,
)
from segexec_jax.segment.roles import role_plan
from segexec_jax.training.checkpoint import load_checkpoint, read_meta

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


def scan_heads(params, cfg, tokenizer, tokens: np.ndarray) -> dict:
    """Per layer and KV group, over the rows: recall@R and rank AUC of the needle digits in the
    pool (positions before the question's segment) under the paper's query and the question's."""
    S, R, w = cfg.segment.len, cfg.segment.retrieval.budget, cfg.segment.retrieval.query_window
    G = cfg.model.n_kv_heads
    model, inv_freq = bind(cfg, params), model_frequencies(cfg.model)
    q_len = len(tokenizer.encode(QUESTION))

    @jax.jit
    def one(row, needle):  # row [T]; needle [T] bool, only inside the pool
        T = row.shape[0]
        C = ((T - 1) // S) * S  # pool entries before the question's segment
        pos = jnp.arange(T, dtype=jnp.int32)[None]
        mask = AttentionMask.causal(jnp.ones((1, T), jnp.int32), plain=True)
        t = jnp.arange(T)
        windows = jnp.stack([(t >= C - w) & (t < C), t >= T - q_len]).astype(jnp.float32)  # paper, question

        def layer_fn(block, x, _):
            def mix(q, k, v):
                # the operator's own query rule, over all G groups: [2 (paper, question) G D], pre-RoPE
                query = jnp.concatenate([retrieval_query(q, w[None] > 0, G) for w in windows])
                scores = jnp.einsum("wgd,cgd->wgc", query, k[0, :C].astype(jnp.float32))  # [2 G C]
                hit = needle[:C]
                top = jax.lax.top_k(scores, R)[1]  # [2 G R]
                recall = hit[top].sum(-1) / hit.sum()
                rank = jnp.argsort(jnp.argsort(scores, -1), -1).astype(jnp.float32)  # 0 = lowest score
                n_pos = hit.sum()
                auc = ((rank * hit).sum(-1) - n_pos * (n_pos - 1) / 2) / (n_pos * (C - n_pos))
                qr, kr = apply_rope(q, pos, inv_freq), apply_rope(k, pos, inv_freq)
                return attend(qr, kr, v, mask, "xla"), jnp.stack([recall, auc])  # [2 (what) 2 (rule) G]
            return apply_layer(block, x, mix)

        return scan_layers(model, model.embed_tokens(row[None]), None, layer_fn)[1]  # [L 2 2 G]

    digits = np.vectorize(lambda t: tokenizer.decode([int(t)]).strip().isdigit())(tokens)
    C = ((tokens.shape[1] - 1) // S) * S
    digits[:, C:] = False
    per_row = [np.asarray(one(jnp.asarray(row), jnp.asarray(d))) for row, d in zip(tokens, digits)]
    m = np.mean(per_row, axis=0)  # [L 2 2 G]
    names = [f"{rule}_{what}" for what in ("recall", "auc") for rule in ("paper", "question")]
    return {n: m[:, i // 2, i % 2].round(4).tolist() for i, n in enumerate(names)} | {"chance": R / C}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--lengths", nargs="*", type=int, default=[2048, 4096])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--out", default=None, help="write the JSON results here too")
    ap.add_argument("--scan-heads", action="store_true",
                    help="every layer and KV group under full attention (see above), instead of the retrieval heads")
    ap.add_argument("overrides", nargs="*", help="config overrides (and YAML files such as heads.yaml)")
    args = ap.parse_args(argv)
    cfg, params = load_checkpoint(args.checkpoint)
    cfg = config_from_dict(cfg.to_dict(), ["attention.mode=segmented", *args.overrides])
    tokenizer = load_tokenizer(read_meta(args.checkpoint).get("tokenizer", "bytes"), search=Path(args.checkpoint))
    rows = []
    for length in args.lengths:
        tokens = prompts(tokenizer, length, args.samples, args.seed)
        result = dict(length=length, **(scan_heads if args.scan_heads else measure)(params, cfg, tokenizer, tokens))
        if args.scan_heads:
            best = sorted(((v, l, g) for l, row in enumerate(result["question_recall"]) for g, v in enumerate(row)), reverse=True)[:5]
            print(f"length {length}: chance {result['chance']:.3f}; best heads by the question's recall@R:",
                  ", ".join(f"L{l}g{g} {v:.2f} (paper {result['paper_recall'][l][g]:.2f}, "
                            f"AUC {result['question_auc'][l][g]:.2f})" for v, l, g in best), flush=True)
        else:
            print(json.dumps(result), flush=True)
        rows.append(result)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(config=cfg.segment.__repr__(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
