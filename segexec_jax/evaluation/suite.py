"""Long-context evaluation, offline and deterministic:

  python -m segexec_jax.eval --checkpoint DIR [--tasks ...] [--lengths ...] [--modes ...] [--out DIR]

For every attention mode on the same weights it measures
  - perplexity by position: token loss in log2 position buckets on rows of the validation
    split, at lengths up to many times the training length;
  - synthetic tasks (segexec_jax.data.synthetic, generated from the seed): greedy generation,
    scored by the fraction of gold strings present in the answer, with a depth sweep for
    the needle tasks.
It writes results.json, results.md (tables) and PNG plots into a fresh directory
(CHECKPOINT/eval/<date-time>) or into --out, where it will not replace an earlier run's
files unless --overwrite is given, and prints their paths at the end.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..cli import ArgumentParser
from ..config import Config, ConfigError, config_from_dict
from ..data import pipeline as data
from ..data import synthetic
from ..data.tokenization import TokenizerError, load_tokenizer
from ..inference.generate import generate
from ..training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_config,
    read_meta,
)
from .scoring import string_match_all

MODES = ("segmented", "full", "streaming")
NEEDLE_TASKS = {"passkey", "niah_single", "niah_single_repeat", "niah_multikey", "niah_multikey_needles",
                "niah_multivalue", "niah_multiquery"}


def in_mode(cfg: Config, mode: str, max_len: int) -> Config:
    return config_from_dict(cfg.to_dict(), [f"attention.mode={mode}", f"inference.max_len={max_len}"])


# --------------------------------------------------------------------------- perplexity by position


def validation_rows(cfg: Config, tokenizer, length: int, n: int, seed: int) -> np.ndarray:
    """n rows of `length` tokens: validation documents, shuffled by the seed, joined end to end."""
    docs = data.documents(cfg, "validation")
    order = np.random.default_rng(seed).permutation(len(docs))
    stream: list[int] = []
    need = n * length
    for i in order:
        stream += tokenizer.encode(docs[int(i)] + "\n\n")
        if len(stream) >= need:
            break
    while len(stream) < need:  # a small split: go round again
        stream += stream
    return np.asarray(stream[:need], np.int32).reshape(n, length)


def _token_nll(logits, targets):
    logits = logits.astype(jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def _nll_fn(cfg: Config):
    """Per-token NLL [B, T-1] of one-document rows. Segmented and full mode take the logits
    one segment (or span of S tokens) at a time, never all [B, T, V] at once."""
    from ..model.transformer import bind
    from ..segment.forward import forward, full_hidden
    from ..segment.operator import pad_to_segments, scan_segments

    S = cfg.segment.len

    @jax.jit
    def nll(params, tokens):
        B, T = tokens.shape
        if cfg.attention.mode == "streaming":
            return _token_nll(forward(params, cfg, tokens)[:, :-1], tokens[:, 1:])
        model = bind(cfg, params)
        targets = pad_to_segments(jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1), S)
        emit = lambda x, s: _token_nll(model.logits(x), jax.lax.dynamic_slice_in_dim(targets, s * S, S, axis=1))
        if cfg.attention.mode == "full":
            x = pad_to_segments(full_hidden(model, cfg, tokens, jnp.ones_like(tokens), single_doc=True), S)
            spans = jnp.swapaxes(x.reshape(B, -1, S, x.shape[-1]), 0, 1)
            out = jax.lax.map(lambda a: emit(a[0], a[1]), (spans, jnp.arange(spans.shape[0])))
        else:
            out, _, _ = scan_segments(model, cfg, pad_to_segments(tokens, S), pad_to_segments(jnp.ones_like(tokens), S),
                                      emit, single_doc=True)
        return jnp.swapaxes(out, 0, 1).reshape(B, -1)[:, :T - 1]

    return nll


def buckets(length: int) -> list[tuple[int, int]]:
    """Log2 position buckets [1, 2), [2, 4), ... covering target positions 1..length-1."""
    out, lo = [], 1
    while lo < length:
        out.append((lo, min(2 * lo, length)))
        lo *= 2
    return out


def perplexity_by_position(params, cfg: Config, rows: np.ndarray, batch: int) -> list[dict]:
    nll = _nll_fn(cfg)
    losses = np.concatenate([np.asarray(nll(params, jnp.asarray(rows[i:i + batch])))
                             for i in range(0, len(rows), batch)])  # [n, L-1]: position t+1 predicted
    out = []
    for lo, hi in buckets(rows.shape[1]):
        chunk = losses[:, lo - 1:hi - 1]
        out.append(dict(bucket=[lo, hi], nll=float(chunk.mean()), count=int(chunk.size)))
    return out


# --------------------------------------------------------------------------- synthetic tasks


def chars_per_token(tokenizer, task: str = "niah_single") -> float:
    """Characters per token of `task`'s prompts (each task's text tokenizes differently)."""
    sample = synthetic.generate(task, seed=0, index=0, length=8000).prompt
    return len(sample) / max(len(tokenizer.encode(sample)), 1)


def task_samples(task: str, length: int, samples: int, depths: list[float], seed: int, tokenizer):
    """(depth, index, Sample) for every sample of one task and length (about `length` tokens)."""
    chars = int(length * chars_per_token(tokenizer, task) * 0.95)
    probe = np.mean([len(tokenizer.encode(synthetic.generate(task, seed, 10**9 + length * 10 + k, chars).prompt))
                     for k in range(4)])
    chars = int(chars * 0.95 * length / max(probe, 1))  # the rate drifts with length and vocabulary
    sweep = depths if task in NEEDLE_TASKS else [None]
    out = []
    for d_i, depth in enumerate(sweep):
        for i in range(samples):
            index = length * 1000 + d_i * 100 + i
            kwargs = {} if depth is None else {"depth": depth}
            out.append((depth, i, synthetic.generate(task, seed, index, chars, **kwargs)))
    return out


def run_task(params, cfg: Config, tokenizer, task: str, length: int, samples: int, depths: list[float],
             seed: int, batch: int, progress=None) -> list[dict]:
    items = task_samples(task, length, samples, depths, seed, tokenizer)
    records = []
    for start in range(0, len(items), batch):
        group = items[start:start + batch]
        prompts = [tokenizer.encode(s.prompt) for _, _, s in group]
        answer_tokens = max(len(tokenizer.encode(" " + ", ".join(s.answers) + ".")) for _, _, s in group)
        need = max(len(p) for p in prompts) + answer_tokens + 8
        run_cfg = cfg if need <= cfg.inference.max_len else in_mode(cfg, cfg.attention.mode, -(-need // 4096) * 4096)
        result = generate(params, run_cfg, prompts, max_new_tokens=answer_tokens + 8)
        for b, (depth, i, s) in enumerate(group):
            prediction = tokenizer.decode(result.tokens[b, : result.num_generated[b]])
            records.append(dict(mode=cfg.attention.mode, task=task, length=length, depth=depth, sample=i,
                                prompt_tokens=len(prompts[b]), answers=list(s.answers), prediction=prediction,
                                score=string_match_all(prediction, s.answers)))
        if progress is not None:
            progress.update(len(group))
    return records


# --------------------------------------------------------------------------- report


def summarise(task_records: list[dict]) -> list[dict]:
    groups: dict[tuple, list[float]] = {}
    for r in task_records:
        groups.setdefault((r["mode"], r["task"], r["length"]), []).append(r["score"])
    return [dict(mode=m, task=t, length=n, score=float(np.mean(v)), samples=len(v))
            for (m, t, n), v in sorted(groups.items())]


def markdown(results: dict) -> str:
    modes = results["modes"]
    lines = [f"# Long-context evaluation\n", f"Checkpoint `{results['checkpoint']}`, seed {results['seed']}, "
             f"{results['samples']} samples per task and length.\n"]
    if results["summary"]:
        lines += ["## Synthetic tasks (fraction of gold strings found)\n",
                  "| task | length | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
        table = {(r["task"], r["length"], r["mode"]): r["score"] for r in results["summary"]}
        for task, length in sorted({(r["task"], r["length"]) for r in results["summary"]}):
            cells = [f"{table[(task, length, m)]:.3f}" if (task, length, m) in table else "" for m in modes]
            lines.append(f"| {task} | {length} | " + " | ".join(cells) + " |")
        lines.append("")
    if results["perplexity"]:
        lines += ["## Loss by position (mean token NLL in each position bucket)\n"]
        for length in sorted({r["length"] for r in results["perplexity"]}):
            rows = [r for r in results["perplexity"] if r["length"] == length]
            bks = [tuple(b["bucket"]) for b in rows[0]["buckets"]]
            lines += [f"Length {length}:\n", "| mode | " + " | ".join(f"{lo}-{hi}" for lo, hi in bks) + " |",
                      "|---|" + "---|" * len(bks)]
            for r in rows:
                lines.append(f"| {r['mode']} | " + " | ".join(f"{b['nll']:.3f}" for b in r["buckets"]) + " |")
            lines.append("")
    return "\n".join(lines)


# one look per mode: series that coincide stay visible (hollow markers of different shapes
# and sizes, different line styles)
MODE_STYLE = {"segmented": dict(marker="o", linestyle="-", markersize=7),
              "full": dict(marker="s", linestyle="--", markersize=5),
              "streaming": dict(marker="^", linestyle=":", markersize=4)}


LENGTH_STYLES = ("-", "--", ":", "-.")


def _mode_style(mode: str) -> dict:
    return dict(MODE_STYLE.get(mode, dict(marker="x", linestyle="-.", markersize=5)), markerfacecolor="none")


def _mode_colour(results: dict, mode: str) -> str:
    return f"C{results['modes'].index(mode) % 10}"


def training_length(results: dict) -> int | None:
    return results.get("config", {}).get("train", {}).get("seq_len")


def mark_training_length(ax, length: int | None) -> None:
    """A vertical line at the checkpoint's training length, labelled."""
    if length:
        ax.axvline(length, color="grey", linestyle="-.", linewidth=0.9, label="training length", zorder=0)


def loss_figure(results: dict):
    """Loss by position: one series per (mode, length); the mode as colour and marker, the
    length as line style."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    lengths = sorted({r["length"] for r in results["perplexity"]})
    for r in results["perplexity"]:
        mids = [math.sqrt(b["bucket"][0] * b["bucket"][1]) for b in r["buckets"]]
        style = dict(_mode_style(r["mode"]), linestyle=LENGTH_STYLES[lengths.index(r["length"]) % len(LENGTH_STYLES)])
        ax.plot(mids, [b["nll"] for b in r["buckets"]], color=_mode_colour(results, r["mode"]),
                label=f"{r['mode']} @ {r['length']}", **style)
    mark_training_length(ax, training_length(results))
    ax.set_xscale("log", base=2)
    ax.set(xlabel="position", ylabel="token NLL (nats)", title="Loss by position")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def task_figure(results: dict):
    """Task scores by length, one panel per task, one series per mode."""
    from matplotlib.figure import Figure

    tasks = sorted({r["task"] for r in results["summary"]})
    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for mode in results["modes"]:
            pts = sorted((r["length"], r["score"]) for r in results["summary"] if r["task"] == task and r["mode"] == mode)
            if pts:
                ax.plot(*zip(*pts), color=_mode_colour(results, mode), label=mode, **_mode_style(mode))
        mark_training_length(ax, training_length(results))
        ax.set(title=task, xlabel="length (tokens)", ylabel="score", ylim=(-0.05, 1.05))
        ax.set_xscale("log", base=2)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plots(results: dict, out: Path) -> list[str]:
    """Write the plots (matplotlib figures without pyplot: no global backend state)."""
    from matplotlib.figure import Figure

    written = []
    for name, make, data in (("loss_by_position.png", loss_figure, results["perplexity"]),
                             ("task_scores.png", task_figure, results["summary"])):
        if data:
            make(results).savefig(out / name, dpi=120)
            written.append(name)
    needle = sorted({r["task"] for r in results["tasks"] if r["depth"] is not None})
    for task in needle:
        modes = [m for m in results["modes"] if any(r["task"] == task and r["mode"] == m for r in results["tasks"])]
        fig = Figure(figsize=(4 * len(modes), 3.4), layout="constrained")
        axes = fig.subplots(1, len(modes), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            recs = [r for r in results["tasks"] if r["task"] == task and r["mode"] == mode]
            depths = sorted({r["depth"] for r in recs})
            lengths = sorted({r["length"] for r in recs})
            grid = np.array([[np.mean([r["score"] for r in recs if r["depth"] == d and r["length"] == n])
                              for n in lengths] for d in depths])
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
            ax.set(title=f"{task}: {mode}", xlabel="length (tokens)", ylabel="needle depth")
        fig.colorbar(im, ax=axes[0].tolist())
        name = f"depth_{task}.png"
        fig.savefig(out / name, dpi=120)
        written.append(name)
    return written


# --------------------------------------------------------------------------- driver


def evaluate(checkpoint: str, out: str, tasks: list[str], lengths: list[int], modes: list[str], samples: int,
             depths: list[float], ppl_lengths: list[int], ppl_samples: int, batch: int, seed: int,
             overrides: list[str] = ()) -> dict:
    from tqdm import tqdm

    cfg, params = load_checkpoint(checkpoint)
    if overrides:
        cfg = config_from_dict(cfg.to_dict(), list(overrides))
    tokenizer = load_tokenizer(read_meta(checkpoint).get("tokenizer", "bytes"), search=Path(checkpoint))
    unknown = [t for t in tasks if t not in synthetic.TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown} (known: {', '.join(synthetic.TASKS)})")
    if any(m not in MODES for m in modes):
        raise ValueError(f"modes must be among {', '.join(MODES)}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    longest = max(lengths + ppl_lengths + [1])
    max_len = int(longest * 1.25) + 256
    work = sum(len(modes) * samples * (len(depths) if t in NEEDLE_TASKS else 1) * len(lengths) for t in tasks)
    work += len(modes) * len(ppl_lengths) * ppl_samples
    bar = tqdm(total=work, desc="eval", unit="sample", file=sys.stderr, dynamic_ncols=True)
    results = dict(checkpoint=str(checkpoint), seed=seed, samples=samples, modes=list(modes), lengths=list(lengths),
                   depths=list(depths), perplexity=[], tasks=[], config=cfg.to_dict(),
                   date=time.strftime("%Y-%m-%d"), device=str(jax.devices()[0].device_kind))
    try:
        for mode in modes:
            mcfg = in_mode(cfg, mode, max_len)
            for length in ppl_lengths:
                rows = validation_rows(cfg, tokenizer, length, ppl_samples, seed)
                results["perplexity"].append(dict(mode=mode, length=length,
                                                  buckets=perplexity_by_position(params, mcfg, rows, batch)))
                bar.update(ppl_samples)
            for task in tasks:
                for length in lengths:
                    results["tasks"] += run_task(params, mcfg, tokenizer, task, length, samples, depths, seed, batch, bar)
    finally:
        bar.close()
    results["summary"] = summarise(results["tasks"])
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    (out_dir / "results.md").write_text(markdown(results))
    results["plots"] = plots(results, out_dir)
    return results


def output_files(tasks: list[str]) -> list[str]:
    """The names an evaluation may write into its output directory."""
    return (["results.json", "results.md", "loss_by_position.png", "task_scores.png"]
            + [f"depth_{t}.png" for t in tasks if t in NEEDLE_TASKS])


def fresh_directory(parent: Path) -> Path:
    """parent/<date-time>, numbered when that exists already: an earlier run is never replaced."""
    stamp = time.strftime("%Y-%m-%d-%H%M%S")
    for n in range(1, 1000):
        out = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            out.mkdir(parents=True)
            return out
        except FileExistsError:
            continue
    raise ValueError(f"cannot make a fresh output directory under {str(parent)!r}")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m segexec_jax.eval", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="run directory or checkpoint step directory")
    parser.add_argument("--out", default=None,
                        help="output directory; refused if it holds an earlier run's results unless --overwrite "
                             "(default: a fresh CHECKPOINT/eval/<date-time>)")
    parser.add_argument("--overwrite", action="store_true", help="with --out: replace an earlier run's files there")
    parser.add_argument("--tasks", nargs="*", default=list(synthetic.RULER),
                        help="synthetic tasks to run (any of synthetic.TASKS; the default: RULER's)")
    parser.add_argument("--lengths", nargs="*", type=int, default=None,
                        help="task lengths in tokens (default: 1, 2 and 4 times train.seq_len)")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--samples", type=int, default=4, help="samples per task, length and depth")
    parser.add_argument("--depths", nargs="*", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--ppl-lengths", nargs="*", type=int, default=None,
                        help="lengths for loss by position (default: 1, 4 and 16 times train.seq_len)")
    parser.add_argument("--ppl-samples", type=int, default=4, help="validation rows per length")
    parser.add_argument("--batch", type=int, default=4, help="rows run together")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tasks and of the validation rows")
    parser.add_argument("overrides", nargs="*", help="config overrides for the run, e.g. segment.retrieval.budget=1024")
    args = parser.parse_args(argv)
    if args.overwrite and args.out is None:
        parser.error("--overwrite needs --out (without --out each run writes to a fresh directory)")
    try:
        T = read_config(args.checkpoint).train.seq_len
        if args.out is None:
            out = fresh_directory(Path(args.checkpoint) / "eval")
        else:
            out = Path(args.out)
            earlier = [f for f in output_files(args.tasks) if (out / f).exists()]
            if earlier and not args.overwrite:
                raise ValueError(f"--out {str(out)!r} already holds {', '.join(earlier)} from an earlier run; "
                                 "pass --overwrite to replace them, or choose another --out")
        results = evaluate(args.checkpoint, str(out), args.tasks,
                           args.lengths or [T, 2 * T, 4 * T], args.modes, args.samples, args.depths,
                           args.ppl_lengths if args.ppl_lengths is not None else [T, 4 * T, 16 * T],
                           args.ppl_samples, args.batch, args.seed, args.overrides)
    except (CheckpointError, ConfigError, TokenizerError, data.DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(markdown(results))
    for name in ["results.json", "results.md"] + results["plots"]:
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
