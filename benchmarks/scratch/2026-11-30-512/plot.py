"""EVAL.md's figures and tables for the from-scratch pair at 512 tokens (2026-11-30):

  python benchmarks/scratch/2026-11-30-512/plot.py

Reads eval_full.results.json and eval_segmented.results.json next to this file (the full and
the segmented K=1 twin, step 2600, each evaluated in every mode) and writes, next to them,
  - scores.png: passkey and single-needle score against prompt length, one panel per
    (trained model, task), one line per evaluation mode, 95% Wilson intervals (n = 20);
  - loss_by_position.png: loss by position at 4,096 tokens, one panel per trained model;
and prints the markdown tables EVAL.md holds (scores with intervals, and passkey by depth for
the full-trained model run segmented).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

HERE = Path(__file__).resolve().parent
MODES = ("full", "segmented", "streaming")
STYLE = {"full": ("C0", "o", "-"), "segmented": ("C3", "s", "--"), "streaming": ("C2", "^", ":")}
TRAINED = {"full": "eval_full", "segmented": "eval_segmented"}
TASKS = ("passkey", "niah_single")


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def load() -> dict[str, dict]:
    return {t: json.loads((HERE / f"{stem}.results.json").read_text()) for t, stem in TRAINED.items()}


def summary(res: dict) -> dict[tuple[str, str, int], tuple[int, int]]:
    """(mode, task, length) -> (successes, samples); every score is 0 or 1."""
    return {(s["mode"], s["task"], s["length"]): (round(s["score"] * s["samples"]), s["samples"])
            for s in res["summary"]}


def score_table(results: dict[str, dict]) -> str:
    lengths = results["full"]["lengths"]
    lines = ["| trained in | task | evaluated in | " + " | ".join(str(n) for n in lengths) + " |",
             "|---|---|---|" + "---|" * len(lengths)]
    for trained, res in results.items():
        s = summary(res)
        for task in TASKS:
            for mode in MODES:
                cells = []
                for n in lengths:
                    k, m = s[(mode, task, n)]
                    lo, hi = wilson(k, m)
                    cells.append(f"{k / m:.2f} ({lo:.2f}–{hi:.2f})")
                lines.append(f"| {trained} | {task} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def depth_table(res: dict, mode: str, task: str) -> str:
    hits = defaultdict(lambda: [0, 0])
    for r in res["tasks"]:
        if r["mode"] == mode and r["task"] == task:
            h = hits[(r["depth"], r["length"])]
            h[0] += int(r["score"] == 1.0)
            h[1] += 1
    lengths, depths = res["lengths"], res["depths"]
    lines = ["| depth | " + " | ".join(str(n) for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for d in depths:
        lines.append(f"| {d:g} | " + " | ".join(f"{hits[(d, n)][0]}/{hits[(d, n)][1]}" for n in lengths) + " |")
    return "\n".join(lines)


def plot_scores(results: dict[str, dict], path: Path) -> None:
    fig = Figure(figsize=(8, 5.6))
    axes = fig.subplots(2, 2, sharex=True, sharey=True)
    for i, (trained, res) in enumerate(results.items()):
        s = summary(res)
        lengths = res["lengths"]
        for j, task in enumerate(TASKS):
            ax = axes[i][j]
            for k, mode in enumerate(MODES):
                colour, marker, line = STYLE[mode]
                xs = [n * (1 + 0.04 * (k - 1)) for n in lengths]  # side by side, so the bars stay visible
                ps, lo, hi = [], [], []
                for n in lengths:
                    succ, m = s[(mode, task, n)]
                    a, b = wilson(succ, m)
                    ps.append(succ / m)
                    lo.append(succ / m - a)
                    hi.append(b - succ / m)
                ax.errorbar(xs, ps, yerr=[lo, hi], color=colour, marker=marker, linestyle=line, capsize=2,
                            label=f"evaluated {mode}")
            ax.axvline(res["config"]["train"]["seq_len"], color="grey", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(f"trained {trained}: {task}", fontsize=10)
            if i == 1:
                ax.set_xlabel("prompt length (tokens)")
            if j == 0:
                ax.set_ylabel("score (n = 20, 95% Wilson)")
    axes[0][1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_loss(results: dict[str, dict], path: Path, length: int = 4096) -> None:
    fig = Figure(figsize=(8, 3.4))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (trained, res) in zip(axes, results.items()):
        for r in res["perplexity"]:
            if r["length"] != length:
                continue
            colour, marker, line = STYLE[r["mode"]]
            xs = [math.sqrt(b["bucket"][0] * b["bucket"][1]) for b in r["buckets"]]
            ax.plot(xs, [b["nll"] for b in r["buckets"]], color=colour, marker=marker, linestyle=line,
                    label=f"evaluated {r['mode']}")
        ax.axvline(res["config"]["train"]["seq_len"], color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"trained {trained}, rows of {length} tokens", fontsize=10)
        ax.set_xlabel("position (log2 buckets)")
    axes[0].set_ylabel("mean token NLL (nats)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    results = load()
    plot_scores(results, HERE / "scores.png")
    plot_loss(results, HERE / "loss_by_position.png")
    print(score_table(results))
    print()
    print("full-trained model, evaluated segmented, passkey (exact key found / samples):")
    print(depth_table(results["full"], "segmented", "passkey"))
    print()
    print("segmented-trained model, evaluated segmented, passkey:")
    print(depth_table(results["segmented"], "segmented", "passkey"))


if __name__ == "__main__":
    main()
