"""EVAL.md's figures from the evaluation results in benchmarks/eval/:

  python benchmarks/plot_eval.py [--out docs/eval]

For each training mixture: loss by position at the longest evaluated length, one line per
(training mode, evaluation mode) pair; and the markdown table of those losses.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent / "eval"


def load(mixture: str) -> dict[str, dict]:
    return {trained: json.loads((HERE / f"2026-11-29-{mixture}-{trained}.results.json").read_text())
            for trained in ("full", "segmented")}


def curves(results: dict[str, dict], length: int):
    for trained, res in results.items():
        for r in res["perplexity"]:
            if r["length"] == length:
                yield trained, r["mode"], r["buckets"]


def table(results: dict[str, dict], length: int) -> str:
    rows = list(curves(results, length))
    buckets = [b["bucket"] for b in rows[0][2]]
    head = "| trained in | evaluated in | " + " | ".join(f"{lo}–{hi}" for lo, hi in buckets) + " |"
    lines = [head, "|---|---|" + "---|" * len(buckets)]
    for trained, mode, bks in rows:
        lines.append(f"| {trained} | {mode} | " + " | ".join(f"{b['nll']:.3f}" for b in bks) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict], length: int, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    styles = {"full": "-", "segmented": "--"}
    colors = {"segmented": "tab:blue", "full": "tab:red", "streaming": "tab:green"}
    for trained, mode, bks in curves(results, length):
        mids = [math.sqrt(b["bucket"][0] * b["bucket"][1]) for b in bks]
        ax.plot(mids, [b["nll"] for b in bks], styles[trained], color=colors[mode], marker="o", ms=3,
                label=f"trained {trained}, run {mode}")
    ax.axvline(2048, color="grey", lw=0.8, ls=":")
    ax.text(2048, ax.get_ylim()[1], " training length", va="top", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="position (bytes)", ylabel="token NLL (nats)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/eval")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    for mixture, label in (("mixed", "corpus + 28% synthetic"), ("retrieval", "corpus + 40% retrieval tasks")):
        results = load(mixture)
        for length in (2048, 16384):
            print(f"\n{mixture}, length {length}:\n{table(results, length)}")
        plot(results, 16384, f"Loss by position at 16K, {label}", out / f"loss_by_position_{mixture}.png")


if __name__ == "__main__":
    main()
