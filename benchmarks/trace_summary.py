"""Where a step's time goes, from a `jax.profiler.trace` directory: a text table of a few KB.

  python benchmarks/trace_summary.py TRACE_DIR [--hlo STEP.hlo.txt[.gz]] [--top 40]

Reads the XSpace (`*.xplane.pb`) with `jax.profiler.ProfileData`, or else a Chrome/Perfetto
`*.trace.json.gz`. Per device plane (GPU): kernel time by category (matmul, attention,
fusion, copy, collective), the top kernels with their HLO op, and, given the step's
optimized HLO, the time per JAX source op (the `op_name` metadata of each HLO op). Host
planes get a short table. Never fails the caller: any error is printed and it exits 0.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import traceback
from pathlib import Path

CATEGORIES = (  # (category, substrings of a lower-cased kernel or op name), first match wins
    ("attention", ("fmha", "flash", "cudnn", "attention", "sdpa")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "matmul", "cublas", "sm90_", "sm80_", "dot", "wgmma")),
    ("collective", ("nccl", "all-reduce", "all_reduce", "allreduce", "all-gather", "reduce-scatter", "collective")),
    ("copy", ("memcpy", "memset", "copy", "transpose")),
    ("reduce", ("reduce", "scatter", "gather")),
    ("fusion", ("fusion", "triton", "loop_", "input_", "kernel")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def _events_xspace(path: Path):
    """(plane, line, name, duration_ns, stats) for every event of an XSpace file."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(str(path))
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                stats = {}
                try:
                    stats = {str(k): v for k, v in ev.stats}
                except Exception:  # stats are optional
                    pass
                yield plane.name, line.name, ev.name, float(ev.duration_ns), stats


def _events_chrome(path: Path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e.get("pid")] = e.get("args", {}).get("name", str(e.get("pid")))
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e.get("pid"), e.get("tid"))] = e.get("args", {}).get("name", str(e.get("tid")))
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            yield (procs.get(e.get("pid"), str(e.get("pid"))), threads.get((e.get("pid"), e.get("tid")), str(e.get("tid"))),
                   e.get("name", "?"), float(e["dur"]) * 1e3, e.get("args", {}) or {})


def load_events(trace_dir: Path) -> tuple[list, str]:
    xplanes = sorted(trace_dir.rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    errors = []
    if xplanes:
        try:
            return list(_events_xspace(xplanes[-1])), str(xplanes[-1])
        except Exception as e:  # an older jax, another format: try the Chrome trace
            errors.append(f"{xplanes[-1]}: {type(e).__name__}: {e}")
    for pattern in ("*.trace.json.gz", "*.trace.json", "*.json.gz"):
        files = sorted(trace_dir.rglob(pattern), key=lambda p: p.stat().st_mtime)
        if files:
            try:
                return list(_events_chrome(files[-1])), str(files[-1])
            except Exception as e:
                errors.append(f"{files[-1]}: {type(e).__name__}: {e}")
    raise FileNotFoundError(f"no readable trace under {trace_dir} ({'; '.join(errors) or 'no files'})")


def hlo_op_names(hlo_text: str) -> dict:
    """HLO instruction name -> its JAX op_name (source op path), from optimized HLO text."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?op_name=\"([^\"]*)\"", hlo_text, re.M):
        out[m.group(1)] = m.group(2)
    return out


def _short(op_name: str, width: int = 80) -> str:
    parts = [p for p in op_name.split("/") if p and not p.startswith(("jit(", "pjit"))]
    s = "/".join(parts[-4:]) or op_name
    return s if len(s) <= width else "…" + s[-width + 1:]


def _is_device(plane: str) -> bool:
    return ("/device:" in plane and "CPU" not in plane.upper()) or "gpu" in plane.lower()


def summarise(events: list, source: str, hlo: str | None = None, top: int = 40) -> str:
    out = [f"# trace: {source}", f"events: {len(events)}"]
    by_plane = collections.defaultdict(list)
    for ev in events:
        by_plane[ev[0]].append(ev)
    ops = hlo_op_names(hlo) if hlo else {}
    device_planes = [p for p in by_plane if _is_device(p)]
    for plane in device_planes or list(by_plane):
        evs = by_plane[plane]
        lines = collections.Counter()
        for _, line, _, dur, _ in evs:
            lines[line] += dur
        out.append(f"\n## plane {plane}: lines (total event ms): "
                   + ", ".join(f"{name}={ms / 1e6:.2f}" for name, ms in lines.most_common(8)))
        # kernels: events on stream lines; skip the derived module/step lines (they nest the kernels)
        skip = re.compile(r"(xla modules|steps|xla ops|launch|framework|source|tensorflow|python|trace ?me)", re.I)
        kernels = [ev for ev in evs if not skip.search(ev[1])] or evs
        modules = [ev for ev in evs if re.search(r"xla modules", ev[1], re.I)]
        if modules:
            mod = collections.Counter()
            for _, _, name, dur, _ in modules:
                mod[name] += dur
            out.append("modules (ms): " + ", ".join(f"{n}={d / 1e6:.2f}" for n, d in mod.most_common(5)))
        total = sum(ev[3] for ev in kernels) or 1.0
        out.append(f"kernel time {total / 1e6:.2f} ms over {len(kernels)} kernels")
        cats = collections.Counter()
        for _, _, name, dur, _ in kernels:
            cats[category(name)] += dur
        out.append("by category: " + ", ".join(f"{c} {d / 1e6:.2f} ms ({d / total:.0%})" for c, d in cats.most_common()))
        agg = collections.defaultdict(lambda: [0, 0.0, collections.Counter()])
        by_op = collections.defaultdict(lambda: [0, 0.0])
        for _, _, name, dur, stats in kernels:
            hlo_op = str(stats.get("hlo_op", stats.get("long_name", "")) or "")
            a = agg[name]
            a[0] += 1
            a[1] += dur
            if hlo_op:
                a[2][hlo_op] += 1
            if ops:
                key = _short(ops.get(hlo_op, "")) or f"(no op_name) {hlo_op or name[:40]}"
                by_op[key][0] += 1
                by_op[key][1] += dur
        out.append(f"\ntop {top} kernels:   count   total ms    %   category    name  [hlo op]")
        for name, (n, dur, hl) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:top]:
            hl_s = f"  [{hl.most_common(1)[0][0]}]" if hl else ""
            out.append(f"  {n:6d} {dur / 1e6:10.3f} {dur / total:5.1%}  {category(name):10s}  {name[:70]}{hl_s[:60]}")
        if by_op:
            out.append(f"\ntime by JAX op (HLO op_name), top {top}:   count   total ms    %")
            for key, (n, dur) in sorted(by_op.items(), key=lambda kv: -kv[1][1])[:top]:
                out.append(f"  {n:6d} {dur / 1e6:10.3f} {dur / total:5.1%}  {key}")
    if device_planes:
        hosts = [p for p in by_plane if p not in device_planes]
        out.append(f"\n(host planes not shown: {', '.join(hosts[:6])})")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace_dir")
    p.add_argument("--hlo", default=None, help="the step's optimized HLO text (.gz too): time per JAX op")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--out", default=None, help="write the table here too")
    args = p.parse_args(argv)
    try:
        hlo = None
        if args.hlo and Path(args.hlo).exists():
            hlo = (gzip.open(args.hlo, "rt") if args.hlo.endswith(".gz") else open(args.hlo)).read()
        events, source = load_events(Path(args.trace_dir))
        text = summarise(events, source, hlo, args.top)
    except Exception:
        text = f"# trace summary of {args.trace_dir} failed\n{traceback.format_exc()}"
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
