"""What the compiled training steps do: ours (`bench train`'s step) against the plain one.

  python benchmarks/step_hlo.py compare [--layers 2] [--seq-len 1024] [--dir D]
      compile both steps here (any platform; on a CPU the HLO is the CPU's) at the 1b
      width with few layers, write their optimized HLO to D, and print what they execute:
      kernels by kind, matmuls (shapes, dtypes, flops), dtype converts, copies and
      transposes, collectives, loops and their trip counts, and `cost_analysis()`.
  python benchmarks/step_hlo.py stats FILE [FILE]   the same tables for HLO dumps (.gz too)
  python benchmarks/step_hlo.py ours --seq-len 8192 --mode full [--profile DIR] [--hlo F]
      our step exactly as `bench train` compiles it: time it, trace one step into DIR.

Counts are executions: an op inside a loop body counts once per trip (XLA's
`known_trip_count`; a loop without one counts once and is flagged).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- HLO text parsing

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\)\s*->\s*.*)?\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b(pred|s4|s8|s16|s32|s64|u4|u8|u16|u32|u64|f16|bf16|f32|f64|f8e4m3fn|f8e5m2|c64|c128)"
                    r"\[([\d,]*)\]")
BYTES = dict(pred=1, s4=1, s8=1, s16=2, s32=4, s64=8, u4=1, u8=1, u16=2, u32=4, u64=8, f16=2, bf16=2, f32=4,
             f64=8, f8e4m3fn=1, f8e5m2=1, c64=8, c128=16)


def _split_type(rest: str) -> tuple[str, str]:
    """'(f32[2], bf16[3]) tuple(...)' -> ('(f32[2], bf16[3])', 'tuple(...)')."""
    if rest.startswith("("):
        depth = 0
        for i, c in enumerate(rest):
            depth += c == "("
            depth -= c == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1:].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def _arrays(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)) for m in _ARRAY.finditer(text)]


def _elements(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _operands(body: str) -> str:
    """The text between the opcode's parentheses."""
    depth = 0
    for i, c in enumerate(body):
        depth += c == "("
        depth -= c == ")"
        if depth == 0 and i:
            return body[1:i]
    return body[1:]


def parse(text: str) -> dict:
    """{computation: [instruction dicts]}, and the entry's name under key None."""
    comps: dict = {}
    current = None
    symbols: dict = {}
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h and not line.startswith(" "):
            current = h.group(2)
            comps[current] = []
            symbols: dict = {}
            if h.group(1):
                comps[None] = current
            continue
        m = _INSTR.match(line)
        if not m or current is None:
            continue
        name, rest = m.groups()
        type_text, body = _split_type(rest)
        op = re.match(r"([\w\-]+)", body)
        if not op:
            continue
        opcode = op.group(1)
        body = body[len(opcode):]
        attrs = {k: v for k, v in re.findall(r"(\w+)=(\{[^}]*\}|[\w.\-%]+)", body[len(_operands(body)) + 2:])}
        called = []
        for braced, single in re.findall(r"\b(?:calls|body|condition|to_apply|branch_computations|"
                                         r"called_computations)=(?:\{([^}]*)\}|%?([\w.\-]+))", body):
            called += [c.strip().lstrip("%") for c in (braced.split(",") if braced else [single]) if c.strip()]
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        loop_body = re.search(r"\bbody=%?([\w.\-]+)", body)
        loop_cond = re.search(r"\bcondition=%?([\w.\-]+)", body)
        op_name = re.search(r'op_name="([^"]*)"', line)
        operand_text = _operands(body)
        ins = _arrays(operand_text)  # shapes printed inline (some XLA versions), else looked up
        if not ins:
            ins = [a for ref in re.findall(r"%?([A-Za-z_][\w.\-]*)", operand_text) for a in symbols.get(ref, [])[:1]]
        out = _arrays(type_text)
        symbols[name] = out
        comps[current].append(dict(
            name=name, opcode=opcode, out=out, ins=ins, attrs=attrs, text=line,
            called=called, loop_body=loop_body.group(1) if loop_body else None,
            loop_cond=loop_cond.group(1) if loop_cond else None, trip=int(trip.group(1)) if trip else None, kind=attrs.get("kind"),
            target=(re.search(r'custom_call_target="([^"]*)"', line) or [None, None])[1],
            op_name=op_name.group(1) if op_name else ""))
    return comps


def _trip_from_condition(cond: list) -> int | None:
    """A scan's trip count from its (unoptimized) condition: `i < N` with one constant N."""
    values = [int(m.group(1)) for ins in cond if ins["opcode"] == "constant"
              for m in [re.search(r"constant\((\d+)\)", ins["text"])] if m]
    return values[0] if len(values) == 1 and values[0] > 0 else None


def multiplicities(comps: dict) -> tuple[dict, dict, list]:
    """How many times each computation runs per step; which are fused (inside a kernel);
    the loops without a known trip count."""
    times: dict = collections.defaultdict(int)
    fused: set = set()
    unknown: list = []

    def visit(comp: str, n: int, inside_fusion: bool):
        times[comp] += n
        if inside_fusion:
            fused.add(comp)
        for ins in comps.get(comp, []):
            for c in ins["called"]:
                if c not in comps:
                    continue
                if ins["opcode"] == "while":
                    trip = ins["trip"] or _trip_from_condition(comps.get(ins["loop_cond"], []))
                    if trip is None:
                        unknown.append(ins["name"])
                        trip = 1
                    visit(c, n * (trip if ins["loop_body"] == c else trip + 1), inside_fusion)
                else:
                    visit(c, n, inside_fusion or ins["opcode"] == "fusion"
                          or ins["opcode"] in ("reduce", "map", "scatter", "sort", "reduce-window",
                                               "select-and-scatter", "all-reduce", "reduce-scatter"))

    visit(comps[None], 1, False)
    return times, fused, unknown


def _dot_flops(ins) -> int:
    if len(ins["ins"]) < 1 or not ins["out"]:
        return 0
    lhs = ins["ins"][0][1]
    dims = ins["attrs"].get("lhs_contracting_dims", "{}").strip("{}")
    k = _elements(lhs[int(d)] for d in dims.split(",") if d.strip()) if dims else 1
    return 2 * _elements(ins["out"][0][1]) * k


def stats(text: str) -> dict:
    """What one step executes, from its optimized HLO text."""
    comps = parse(text)
    times, fused, unknown = multiplicities(comps)
    kernels = collections.Counter()  # ops outside fusions: each one a launch (roughly)
    dots, converts, moves, collectives, loops = [], [], [], [], []
    for comp, instrs in comps.items():
        if comp is None:
            continue
        n = times.get(comp, 0)
        if not n:
            continue
        inside = comp in fused
        for ins in instrs:
            op = ins["opcode"]
            if not inside and op not in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
                label = f"fusion:{ins['kind']}" if op == "fusion" else (
                    f"custom-call:{ins['target']}" if op == "custom-call" else op)
                kernels[label] += n
            if op in ("dot", "convolution") or (op == "custom-call" and ins["target"] and (
                    "gemm" in ins["target"].lower() or "matmul" in ins["target"].lower())):
                in_dt = "x".join(sorted({d for d, _ in ins["ins"][:2]}))
                out = ins["out"][0] if ins["out"] else ("?", ())
                dots.append(dict(n=n, flops=_dot_flops(ins) if op == "dot" else 0, ins=in_dt,
                                 out=f"{out[0]}{list(out[1])}", shapes=[f"{d}{list(s)}" for d, s in ins["ins"][:2]],
                                 fused=inside, op_name=ins["op_name"]))
            elif op == "convert" and ins["ins"] and ins["out"]:
                (src, shape), dst = ins["ins"][0], ins["out"][0][0]
                converts.append(dict(n=n, direction=f"{src}->{dst}", elements=_elements(shape), shape=list(shape),
                                     fused=inside, op_name=ins["op_name"]))
            elif op in ("copy", "transpose") and ins["out"]:
                dt, shape = ins["out"][0]
                moves.append(dict(n=n, op=op, bytes=_elements(shape) * BYTES.get(dt, 4), shape=f"{dt}{list(shape)}",
                                  fused=inside, op_name=ins["op_name"]))
            elif op.startswith(("all-", "reduce-scatter", "collective")):
                collectives.append(dict(n=n, op=op, out=[f"{d}{list(s)}" for d, s in ins["out"]]))
            if op == "while":
                loops.append(dict(name=ins["name"], times=n,
                                  trip=ins["trip"] or _trip_from_condition(comps.get(ins["loop_cond"], []))))
    return dict(kernels=kernels, dots=dots, converts=converts, moves=moves, collectives=collectives, loops=loops,
                unknown_trip=unknown)


def _short(op_name: str, width: int = 90) -> str:
    parts = [p for p in op_name.split("/") if p and not p.startswith(("jit(", "pjit"))]
    s = "/".join(parts[-4:])
    return s if len(s) <= width else "…" + s[-width + 1:]


def report(name: str, st: dict, cost: dict | None = None) -> str:
    out = [f"## {name}"]
    if cost:
        out.append("cost_analysis: " + ", ".join(f"{k}={v:.4g}" for k, v in cost.items()))
    out.append("loops (trip count x times entered): " + ", ".join(f"{lp['trip']}x{lp['times']}" for lp in st["loops"])
               + (f"  (unknown trip counts, counted once: {st['unknown_trip']})" if st["unknown_trip"] else ""))
    out.append("kernels (ops outside fusions, executions per step): "
               + ", ".join(f"{k}={v}" for k, v in st["kernels"].most_common()))
    flops = collections.Counter()
    count = collections.Counter()
    for d in st["dots"]:
        flops[d["ins"] + "->" + d["out"].split("[")[0]] += d["n"] * d["flops"]
        count[d["ins"] + "->" + d["out"].split("[")[0]] += d["n"]
    total = sum(flops.values()) or 1
    out.append(f"matmuls: {sum(count.values())} executions, {sum(flops.values()) / 1e9:.2f} GFLOP "
               + "; by dtype: " + ", ".join(f"{k}: {count[k]}x {flops[k] / 1e9:.2f} GFLOP ({flops[k] / total:.0%})"
                                           for k in flops))
    groups = collections.defaultdict(lambda: [0, 0])
    for d in st["dots"]:
        key = (d["ins"], tuple(d["shapes"]), d["out"], d["fused"])
        groups[key][0] += d["n"]
        groups[key][1] += d["n"] * d["flops"]
    out.append("  top matmuls (executions, GFLOP, operand shapes -> output):")
    for (ins, shapes, o, fz), (n, f) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:14]:
        out.append(f"    {n:4d}x {f / 1e9:8.2f}  {' , '.join(shapes)} -> {o}{'  (fused)' if fz else ''}")
    conv = collections.defaultdict(lambda: [0, 0])
    for c in st["converts"]:
        conv[c["direction"]][0] += c["n"]
        conv[c["direction"]][1] += c["n"] * c["elements"]
    out.append("converts (executions, Melements): " + ", ".join(f"{k}: {n}x {e / 1e6:.1f}M"
                                                               for k, (n, e) in sorted(conv.items())))
    big = sorted(st["converts"], key=lambda c: -c["n"] * c["elements"])[:10]
    for c in big:
        out.append(f"    {c['n']:4d}x {c['direction']:10s} {c['shape']}  {_short(c['op_name'])}")
    mv = collections.defaultdict(lambda: [0, 0])
    for m in st["moves"]:
        mv[(m["op"], m["fused"])][0] += m["n"]
        mv[(m["op"], m["fused"])][1] += m["n"] * m["bytes"]
    out.append("copies/transposes (executions, MB written): " + ", ".join(
        f"{op}{' in fusions' if fz else ''}: {n}x {b / 1e6:.1f} MB" for (op, fz), (n, b) in sorted(mv.items())))
    for m in sorted([m for m in st["moves"] if not m["fused"]], key=lambda m: -m["n"] * m["bytes"])[:8]:
        out.append(f"    {m['n']:4d}x {m['op']:9s} {m['shape']}  {_short(m['op_name'])}")
    out.append(f"collectives: {len(st['collectives'])}" + (f" {st['collectives'][:6]}" if st["collectives"] else ""))
    return "\n".join(out)


def read_text(path: str) -> str:
    return (gzip.open(path, "rt") if str(path).endswith(".gz") else open(path)).read()


# --------------------------------------------------------------------------- the two steps


def ours_compiled(seq_len: int, batch: int, mode: str, overrides: list[str], lowered: bool = False):
    """Our step exactly as `bench train` compiles it (random tokens: no doc ids); returns
    (compiled, state, batch, cfg), and with `lowered` also its unoptimized HLO text (traced
    again as `compile_step` traces it)."""
    import jax
    import numpy as np

    from segexec_jax.config import load_config
    from segexec_jax.model.sharding import check_batch, make_mesh
    from segexec_jax.training.loop import compile_step, init_state, state_shardings
    from segexec_jax.training.optim import optimizer

    cfg = load_config("1b", [f"train.seq_len={seq_len}", f"train.batch_size={batch}", f"attention.mode={mode}",
                             *overrides])
    mesh = make_mesh(cfg)
    check_batch(cfg, mesh)
    opt = optimizer(cfg.train)
    _, shardings = state_shardings(cfg, opt, mesh)
    state = jax.jit(init_state(cfg, opt), out_shardings=shardings)()
    compiled, rows = compile_step(cfg, opt, mesh, shardings, state, doc_ids=False)
    tokens = jax.device_put(np.random.default_rng(0).integers(0, cfg.model.vocab_size, (batch, seq_len),
                                                              dtype=np.int32), rows)
    if not lowered:
        return compiled, state, {"tokens": tokens}, cfg
    from segexec_jax.model.sharding import replicated
    from segexec_jax.training.loop import make_train_step

    step_fn = jax.jit(make_train_step(cfg, opt), in_shardings=(shardings, {"tokens": rows}),
                      out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))
    with jax.set_mesh(mesh):
        text = step_fn.lower(state, {"tokens": tokens}).as_text(dialect="hlo")
    return compiled, state, {"tokens": tokens}, cfg, text


def plain_compiled(seq_len: int, batch: int, layers: int | None, remat: str):
    import importlib.util

    import jax
    import numpy as np

    spec = importlib.util.spec_from_file_location("plain_step", ROOT / "benchmarks" / "plain_step.py")
    plain = importlib.util.module_from_spec(spec)
    sys.modules["plain_step"] = plain
    spec.loader.exec_module(plain)
    from dataclasses import replace

    s = plain.Shape.from_yaml()
    if layers:
        s = replace(s, n_layers=layers)
    opt = plain.optimizer(s)
    attention = "cudnn" if jax.default_backend() == "gpu" else "xla"
    state = jax.jit(lambda: (lambda p: (p, opt.init(p)))(plain.init_params(s)))()
    tokens = jax.device_put(np.random.default_rng(0).integers(0, s.vocab, (batch, seq_len), dtype=np.int32))
    lowered = plain.make_step(s, opt, remat, attention).lower(state, tokens)
    return lowered.compile(), state, tokens, lowered.as_text(dialect="hlo")


def platform() -> str:
    import jax

    return jax.default_backend()


def _cost(compiled) -> dict:
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    keys = ("flops", "transcendentals", "bytes accessed")
    return {k: float(c[k]) for k in keys if c and k in c}


def compare(args) -> None:
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    overrides = [f"model.n_layers={args.layers}", f"segment.long_layers=[{args.layers - 1}]"] + args.overrides
    texts = []
    for mode in args.modes:
        t0 = time.perf_counter()
        compiled, *_, program = ours_compiled(args.seq_len, args.batch, mode, overrides, lowered=True)
        texts.append((f"ours {mode}", compiled.as_text(), _cost(compiled), time.perf_counter() - t0, program))
    for remat in args.plain_remat:
        t0 = time.perf_counter()
        compiled, *_, program = plain_compiled(args.seq_len, args.batch, args.layers, remat)
        texts.append((f"plain remat={remat}", compiled.as_text(), _cost(compiled), time.perf_counter() - t0, program))
    where = f"layers {args.layers}, seq {args.seq_len}, batch {args.batch}"
    print("# The programs as JAX emits them (unoptimized HLO: platform-independent dtypes and ops)\n")
    for name, _, _, _, program in texts:
        (out / (name.replace(" ", "_").replace("=", "-") + ".program.hlo.txt")).write_text(program)
        print(report(f"{name} program ({where})", stats(program)), "\n", flush=True)
    print(f"# Optimized for {platform()} (fusions, copies, what XLA kept)\n")
    for name, text, cost, took, _ in texts:
        (out / (name.replace(" ", "_").replace("=", "-") + ".hlo.txt")).write_text(text)
        print(report(f"{name} optimized ({where}; compiled in {took:.0f} s)", stats(text), cost), "\n", flush=True)


def ours(args) -> None:
    """Time our step (as bench train) and trace one more step; write its HLO."""
    import jax

    t0 = time.perf_counter()
    compiled, state, batch, cfg = ours_compiled(args.seq_len, args.batch, args.mode, args.overrides)
    compile_s = time.perf_counter() - t0
    if args.hlo:
        with (gzip.open if args.hlo.endswith(".gz") else open)(args.hlo, "wt") as f:
            f.write(compiled.as_text())
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if args.profile:
        with jax.profiler.trace(args.profile):
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
    print(json.dumps(dict(bench="ours_profiled", mode=args.mode, seq_len=args.seq_len, batch=args.batch,
                          compile_s=round(compile_s, 2), step_s_all=[round(t, 4) for t in times],
                          overrides=args.overrides, device=str(jax.devices()[0].device_kind))), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="compile ours and plain here; tables of what they execute")
    c.add_argument("--layers", type=int, default=2)
    c.add_argument("--seq-len", type=int, default=1024)
    c.add_argument("--batch", type=int, default=1)
    c.add_argument("--modes", nargs="+", default=["full"], choices=["full", "segmented"])
    c.add_argument("--plain-remat", nargs="+", default=["layer"], choices=["layer", "none"])
    c.add_argument("--dir", default="/tmp/step_hlo")
    c.add_argument("overrides", nargs="*", help="config overrides for ours, key=value")
    s = sub.add_parser("stats", help="the tables for HLO text dumps")
    s.add_argument("files", nargs="+")
    o = sub.add_parser("ours", help="our step as bench train compiles it: time, trace, HLO")
    o.add_argument("--seq-len", type=int, default=8192)
    o.add_argument("--batch", type=int, default=1)
    o.add_argument("--mode", choices=["full", "segmented"], default="full")
    o.add_argument("--steps", type=int, default=3)
    o.add_argument("--warmup", type=int, default=2)
    o.add_argument("--profile", default=None)
    o.add_argument("--hlo", default=None)
    o.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.command == "compare":
        compare(args)
    elif args.command == "stats":
        for f in args.files:
            print(report(f, stats(read_text(f))), "\n")
    else:
        ours(args)


if __name__ == "__main__":
    main(sys.argv[1:])
