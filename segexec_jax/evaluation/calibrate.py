"""Head calibration: which KV groups of which layers retrieve from far back.

  python -m segexec_jax.calibrate --checkpoint CKPT --out heads.yaml [--layers 4] [--heads 1] [key=value ...]

Generated needle data: rows of random tokens in which a span appears twice, the second
copy far after the first. For every layer and KV group the score is the attention mass
that the queries of the second copy put on the first copy (full causal attention, mean
over the group's query heads, the queries and the rows). The layers whose best groups
score highest become long-range layers, each with its best groups as long-range heads;
the result is a config override that train.py, infer.py and eval accept as an argument.

The heads are written as a per-layer map, `segment.long_heads: {10: [0], 14: [0]}`: those
groups are retrieval heads in those layers and every other head keeps its tail. (A plain
list, `long_heads: [0]`, means the same groups in every layer: retrieval in the long-range
layers and segment-only heads, which see nothing before their own segment, in all others.)
`key=value` arguments override the checkpoint's config while scoring, e.g.
`model.dtype=float32` for a checkpoint converted to compute in bfloat16.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from ..cli import ArgumentParser
from ..config import Config, ConfigError, config_from_dict
from ..model.attention import AttentionMask, attend
from ..model.rope import apply_rope, model_frequencies
from ..model.transformer import apply_layer, bind, scan_layers
from ..segment.roles import describe
from ..training.checkpoint import CheckpointError, load_checkpoint


def needle_rows(vocab: int, n: int, length: int, span: int, seed: int):
    """Random rows with a span copied: (tokens [n, length], first starts [n], second starts [n])."""
    if length < 4 * span:
        raise ValueError(f"--length ({length}) must be at least 4 x --span ({span})")
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (n, length), dtype=np.int32)
    first = rng.integers(0, length // 2 - span, n)
    second = rng.integers(length // 2, length - span, n)
    for r in range(n):
        tokens[r, second[r]:second[r] + span] = tokens[r, first[r]:first[r] + span]
    return tokens, first.astype(np.int32), second.astype(np.int32)


def retrieval_scores(params: dict, cfg: Config, tokens, first, second, span: int) -> jax.Array:
    """[layers, KV groups] attention mass from the second copy's queries to the first copy."""
    model = bind(cfg, params)
    B, T = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    mask = AttentionMask.causal(jnp.ones((B, T), jnp.int32))
    inv_freq = model_frequencies(cfg.model)
    G, r, D = cfg.model.n_kv_heads, cfg.model.group_size, cfg.model.dim_head
    q_rows = second[:, None] + jnp.arange(1, span)[None]  # queries inside the second copy
    keys = jnp.arange(T)[None]
    in_first = (keys >= first[:, None]) & (keys < first[:, None] + span)  # [B T]

    def layer_fn(block, x, _):
        def mix(q, k, v):
            q, k = apply_rope(q, pos, inv_freq), apply_rope(k, pos, inv_freq)
            out = attend(q, k, v, mask, "reference")
            qs = jnp.take_along_axis(q, q_rows[..., None, None], axis=1).astype(jnp.float32)  # [B span-1 H D]
            logits = jnp.einsum("bqgrd,bkgd->bgrqk", qs.reshape(B, -1, G, r, D), k.astype(jnp.float32)) / D**0.5
            causal = keys[:, None, None, None, :] <= q_rows[:, None, None, :, None]
            probs = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
            mass = jnp.sum(probs * in_first[:, None, None, None, :], axis=-1)  # [B G r span-1]
            return out, mass.mean(axis=(0, 2, 3))  # [G]

        return apply_layer(block, x, mix)

    _, scores = scan_layers(model, model.embed_tokens(jnp.asarray(tokens)), None, layer_fn)
    return scores


def choose(scores: np.ndarray, n_layers: int, n_heads: int) -> tuple[list[int], dict[int, list[int]]]:
    """The layers whose top `n_heads` groups score highest, and those groups."""
    L, G = scores.shape
    n_heads = min(n_heads, G)
    top = np.argsort(-scores, axis=1)[:, :n_heads]
    layer_score = np.take_along_axis(scores, top, axis=1).sum(1)
    layers = sorted(int(i) for i in np.argsort(-layer_score, kind="stable")[: min(n_layers, L)])
    return layers, {layer: sorted(int(g) for g in top[layer]) for layer in layers}


def calibrate(checkpoint: str, n_layers: int, n_heads: int, samples: int, length: int, span: int, seed: int,
              batch: int, overrides: list[str] = ()) -> dict:
    cfg, params = load_checkpoint(checkpoint)
    if overrides:
        cfg = config_from_dict(cfg.to_dict(), list(overrides))
    tokens, first, second = needle_rows(cfg.model.vocab_size, samples, length, span, seed)
    score_fn = jax.jit(lambda p, t, a, b: retrieval_scores(p, cfg, t, a, b, span))
    parts = [np.asarray(score_fn(params, tokens[i:i + batch], first[i:i + batch], second[i:i + batch]))
             * len(tokens[i:i + batch])
             for i in range(0, samples, batch)]
    scores = np.sum(parts, axis=0) / samples
    layers, heads = choose(scores, n_layers, n_heads)
    chosen = config_from_dict(cfg.to_dict(), [f"segment.long_layers={layers}", f"segment.long_heads={heads}"])
    return dict(segment=dict(long_layers=layers, long_heads=heads), scores=scores, config=chosen)


def heads_yaml(layers: list[int], heads: dict[int, list[int]], scores: np.ndarray, checkpoint: str) -> str:
    """The override file: the scores as comments, then the per-layer map in flow style."""
    lines = ["# long-range layers and heads chosen by segexec_jax.calibrate", f"# checkpoint: {checkpoint}",
             "# segment.long_heads is a per-layer map: these KV groups are retrieval heads in these layers and",
             "# every other head keeps its tail. (A plain list, long_heads: [0], would name the same groups in",
             "# every layer, making them segment-only heads, blind before their own segment, in all the others.)",
             "# retrieval score per layer (rows) and KV group (columns):"]
    lines += ["#   " + " ".join(f"{x:.3f}" for x in row) for row in scores]
    per_layer = ", ".join(f"{layer}: [{', '.join(str(g) for g in heads[layer])}]" for layer in layers)
    lines += ["segment:", f"  long_layers: [{', '.join(str(x) for x in layers)}]", f"  long_heads: {{{per_layer}}}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m segexec_jax.calibrate", description=__doc__)  # --help shows defaults
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True, help="YAML config override to write")
    parser.add_argument("--layers", type=int, default=4, help="long-range layers to choose")
    parser.add_argument("--heads", type=int, default=1, help="long-range KV groups per chosen layer")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--span", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="config overrides while scoring, e.g. model.dtype=float32")
    args = parser.parse_args(argv)
    try:
        result = calibrate(args.checkpoint, args.layers, args.heads, args.samples, args.length, args.span,
                           args.seed, args.batch, args.overrides)
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    scores = result.pop("scores")
    text = heads_yaml(result["segment"]["long_layers"], result["segment"]["long_heads"], scores, args.checkpoint)
    with open(args.out, "w") as f:
        f.write(text)
    print(text, end="")
    print(describe(result["config"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
