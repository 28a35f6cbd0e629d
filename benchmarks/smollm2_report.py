"""The paper's table at small scale (issue 10), from several eval runs:

  python benchmarks/smollm2_report.py --runs DIR [DIR ...] --out docs/evidence [--rows arm/label=Row name ...]

Reads every DIR/<arm>/<label>/results.json written by `python -m segexec_jax.eval` (one eval per
arm and attention-mode label; the directory label names the row, not the records' `mode` field),
and DIR/<arm>/<label>/<part>/results.json (one eval per task, say), merged into their row; the
rows of several DIRs (say, two GPU stints) merge the same way.
A row of the table is one (arm, label); `--rows` picks rows, their order and display names
(default: every run found, sorted, named "arm / label").

Writes into OUT:
  table.md              macro score by length (tasks weighted equally) with 95% intervals, one
                        table per task (rows x lengths, Wilson intervals for binary scores,
                        percentile bootstrap of the mean otherwise), loss by position per length;
  scores_by_length.png  macro score against length (log2 axis), one line per row, error bars;
  task_<task>.png       the same per task;
  loss_by_position.png  token loss against position bucket, one panel per evaluated length;
  summary.json          every number above (means, intervals, n).
The main table is also printed. Missing (row, task, length) cells are left blank.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

Z = 1.959963984540054  # two-sided 95%
DRAWS, SEED = 2000, 0


def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson score interval for k successes out of n."""
    p, z2 = k / n, Z * Z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_macro(groups: list[np.ndarray]) -> tuple[float, float]:
    """Percentile interval of the mean over groups of per-group means, resampling within each group."""
    rng = np.random.default_rng(SEED)
    means = np.mean([g[rng.integers(0, len(g), (DRAWS, len(g)))].mean(axis=1) for g in groups], axis=0)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def cell(groups: list[np.ndarray]) -> dict:
    """Mean (macro over groups), 95% interval and sample count of one table cell."""
    mean = float(np.mean([g.mean() for g in groups]))
    binary = len(groups) == 1 and bool(np.isin(groups[0], (0.0, 1.0)).all())
    lo, hi = wilson(int(groups[0].sum()), len(groups[0])) if binary else bootstrap_macro(groups)
    return dict(mean=mean, lo=lo, hi=hi, n=int(sum(len(g) for g in groups)), tasks=len(groups),
                interval="wilson" if binary else "bootstrap")


def load(runs: list[Path], picks: list[str]) -> list[dict]:
    found: dict[tuple[str, str], list[Path]] = {}
    for d in runs:
        for p in sorted(d.glob("*/*/results.json")) + sorted(d.glob("*/*/*/results.json")):
            arm, label = p.relative_to(d).parts[:2]  # <arm>/<label>[/<part>]/results.json: parts merge
            found.setdefault((arm, label), []).append(p)
    if not found:
        sys.exit(f"error: no results found: expected {' or '.join(map(str, runs))}/<arm>/<label>/results.json")
    wanted = []
    for spec in picks:
        key, _, name = spec.partition("=")
        arm, _, label = key.partition("/")
        wanted.append(((arm, label), name or f"{arm} / {label}"))
    wanted = wanted or [(key, f"{key[0]} / {key[1]}") for key in sorted(found)]
    rows = []
    for key, name in wanted:
        if key not in found:
            print(f"warning: no results for {key[0]}/{key[1]} (have: {', '.join('/'.join(k) for k in found)})",
                  file=sys.stderr)
            continue
        parts = [json.loads(p.read_text()) for p in found[key]]
        results = dict(parts[0], tasks=[t for r in parts for t in r["tasks"]],
                       perplexity=[x for r in parts for x in r["perplexity"]])
        rows.append(dict(arm=key[0], label=key[1], name=name, path=", ".join(map(str, found[key])),
                         checkpoint=results.get("checkpoint"), results=results))
    if not rows:
        sys.exit("error: none of the requested rows has results")
    return rows


def collect(rows: list[dict]) -> dict:
    """All cells: macro[name][length], task[task][name][length], loss[length][name] = buckets."""
    lengths, tasks = set(), set()
    scores = {}  # name -> (task, length) -> scores
    for row in rows:
        groups: dict[tuple, list[float]] = {}
        for r in row["results"].get("tasks", []):
            groups.setdefault((r["task"], int(r["length"])), []).append(float(r["score"]))
        scores[row["name"]] = {k: np.asarray(v) for k, v in groups.items()}
        lengths |= {n for _, n in groups}
        tasks |= {t for t, _ in groups}
    lengths, tasks = sorted(lengths), sorted(tasks)
    macro = {name: {n: cell([s[t, n] for t in tasks if (t, n) in s])
                    for n in lengths if any((t, n) in s for t in tasks)} for name, s in scores.items()}
    per_task = {t: {name: {n: cell([s[t, n]]) for n in lengths if (t, n) in s} for name, s in scores.items()}
                for t in tasks}
    loss: dict[int, dict] = {}
    for row in rows:
        for r in row["results"].get("perplexity", []):
            loss.setdefault(int(r["length"]), {})[row["name"]] = r["buckets"]
    return dict(lengths=lengths, tasks=tasks, macro=macro, per_task=per_task,
                loss={n: loss[n] for n in sorted(loss)})


def fmt(c: dict | None, show_n: bool) -> str:
    if c is None:
        return ""
    return f"{c['mean']:.2f} [{c['lo']:.2f}, {c['hi']:.2f}]" + (f" n={c['n']}" if show_n else "")


def score_table(cells: dict, names: list[str], lengths: list[int], what: str) -> list[str]:
    ns = {c["n"] for by_len in cells.values() for c in by_len.values()}
    lines = [f"| {what} | " + " | ".join(str(n) for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(fmt(cells.get(name, {}).get(n), len(ns) > 1) for n in lengths) + " |")
    if len(ns) == 1:
        lines.append(f"\nn = {ns.pop()} samples per cell.")
    return lines


def markdown(data: dict, names: list[str]) -> tuple[str, str]:
    lengths = data["lengths"]
    main = score_table(data["macro"], names, lengths, "row \\ length")
    lines = ["# Scores by context length", "",
             f"Mean score over all tasks ({', '.join(data['tasks'])}; each task weighted equally), "
             f"95% percentile bootstrap interval ({DRAWS} draws, resampling samples within each task; "
             "Wilson where a cell has a single binary task).", "",
             *main, ""]
    partial = [f"{name} @ {n} ({c['tasks']} of {len(data['tasks'])})" for name in names
               for n, c in data["macro"].get(name, {}).items() if c["tasks"] < len(data["tasks"])]
    if partial:
        lines += ["Cells over fewer tasks: " + "; ".join(partial) + ".", ""]
    for task in data["tasks"]:
        lines += [f"## {task}", "", "95% Wilson interval for binary scores, bootstrap of the mean otherwise.", "",
                  *score_table(data["per_task"][task], names, lengths, "row \\ length"), ""]
    if data["loss"]:
        lines += ["## Loss by position", "", "Mean token loss (nats) in log2 position buckets [lo, hi).", ""]
        for length, by_name in data["loss"].items():
            bks = sorted({tuple(b["bucket"]) for bs in by_name.values() for b in bs})
            lines += [f"### length {length}", "", "| row | " + " | ".join(f"{lo}-{hi}" for lo, hi in bks) + " |",
                      "|---" * (len(bks) + 1) + "|"]
            for name in [n for n in names if n in by_name]:
                nll = {tuple(b["bucket"]): b["nll"] for b in by_name[name]}
                lines.append(f"| {name} | " + " | ".join(f"{nll[b]:.3f}" if b in nll else "" for b in bks) + " |")
            lines.append("")
    return "\n".join(lines), "\n".join(main)


def styles(names: list[str]) -> dict[str, dict]:
    """One colour and marker per row, distinct for up to 20 rows (matplotlib's default cycle repeats after 10)."""
    import matplotlib.pyplot as plt
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors
    markers = "os^Dv<>pXh"
    return {n: dict(color=colours[i % len(colours)], marker=markers[i % len(markers)]) for i, n in enumerate(names)}


def plot_scores(path: Path, cells: dict, names: list[str], title: str) -> None:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    style = styles(names)
    for name in names:
        pts = sorted(cells.get(name, {}).items())
        if not pts:
            continue
        xs, cs = [n for n, _ in pts], [c for _, c in pts]
        ys = np.array([c["mean"] for c in cs])
        err = np.array([[y - c["lo"] for y, c in zip(ys, cs)], [c["hi"] - y for y, c in zip(ys, cs)]])
        ax.errorbar(xs, ys, yerr=np.clip(err, 0, None), capsize=3, label=name, **style[name])
    ax.set_xscale("log", base=2)
    ax.set(title=title, xlabel="context length (tokens)", ylabel="score", ylim=(-0.05, 1.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss(path: Path, loss: dict, names: list[str]) -> None:
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(loss), figsize=(5 * len(loss) + 3, 4), squeeze=False)
    style = styles(names)
    for ax, (length, by_name) in zip(axes[0], loss.items()):
        for name in [n for n in names if n in by_name]:
            bs = by_name[name]
            ax.plot([math.sqrt(b["bucket"][0] * b["bucket"][1]) for b in bs], [b["nll"] for b in bs],
                    label=name, **style[name])
        ax.set_xscale("log", base=2)
        ax.set(title=f"length {length}", xlabel="position", ylabel="loss (nats)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(runs: str | list[str], out: str, picks: list[str] | None = None) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    runs = [runs] if isinstance(runs, str | Path) else list(runs)
    rows = load([Path(r) for r in runs], picks or [])
    names = [r["name"] for r in rows]
    data = collect(rows)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    text, main = markdown(data, names)
    (out_dir / "table.md").write_text(text + "\n")
    plot_scores(out_dir / "scores_by_length.png", data["macro"], names, "mean over tasks")
    for task in data["tasks"]:
        plot_scores(out_dir / f"task_{task}.png", data["per_task"][task], names, task)
    if data["loss"]:
        plot_loss(out_dir / "loss_by_position.png", data["loss"], names)
    summary = dict(runs=[str(r) for r in runs], intervals=f"95%: Wilson (binary), percentile bootstrap {DRAWS} draws seed {SEED}",
                   rows=[{k: r[k] for k in ("arm", "label", "name", "path", "checkpoint")} for r in rows],
                   **{k: data[k] for k in ("lengths", "tasks", "macro", "per_task", "loss")})
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(main)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", required=True, nargs="+", help="directories of <arm>/<label>/results.json")
    p.add_argument("--out", default="docs/evidence")
    p.add_argument("--rows", nargs="*", default=[], metavar="ARM/LABEL=NAME",
                   help="rows in order, with display names (default: all found, sorted)")
    a = p.parse_args(argv)
    report(a.runs, a.out, a.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
