"""EVAL.md's figures from the evaluation results in benchmarks/eval/:

  python benchmarks/plot_eval.py [--out docs/eval]

For each training mixture: loss by position at the longest evaluated length, one line per
(training mode, evaluation mode) pair (line style: the training mode; colour and marker: the
evaluation mode, so that coinciding lines stay visible), a vertical line at the training
length read from the results' config; and the markdown table of those losses.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from matplotlib.figure import Figure

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


STYLES = {"full": "-", "segmented": "--"}  # the training mode
LOOKS = {"segmented": dict(color="tab:blue", marker="o", ms=6), "full": dict(color="tab:red", marker="s", ms=4),
         "streaming": dict(color="tab:green", marker="^", ms=3)}  # the evaluation mode


def figure(results: dict[str, dict], length: int, title: str) -> Figure:
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for trained, mode, bks in curves(results, length):
        mids = [math.sqrt(b["bucket"][0] * b["bucket"][1]) for b in bks]
        ax.plot(mids, [b["nll"] for b in bks], STYLES[trained], markerfacecolor="none", **LOOKS[mode],
                label=f"trained {trained}, run {mode}")
    for i, seq_len in enumerate(sorted({res["config"]["train"]["seq_len"] for res in results.values()})):
        ax.axvline(seq_len, color="grey", lw=0.8, ls="-.", zorder=0, label="training length" if i == 0 else None)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="position (bytes)", ylabel="token NLL (nats)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/eval")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    for mixture, label in (("mixed", "corpus + 28% synthetic"), ("retrieval", "corpus + 40% retrieval tasks")):
        results = load(mixture)
        for length in (2048, 16384):
            print(f"\n{mixture}, length {length}:\n{table(results, length)}")
        figure(results, 16384, f"Loss by position at 16K, {label}").savefig(out / f"loss_by_position_{mixture}.png",
                                                                            dpi=120)


if __name__ == "__main__":
    main()
