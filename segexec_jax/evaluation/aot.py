"""Compile for a TPU slice without one: `python -m segexec_jax.aot --config NAME --topology v5p:4x4x4
[--mesh DATA,FSDP,TENSOR] [key=value ...]`.

libtpu (`pip install "jax[tpu]"`, in the dev extra) describes the chips of a TPU topology on
any machine (`jax.experimental.topologies`); XLA then compiles against them as it would on the
pod. This compiles the programs a run executes, unchanged:

  train    the training step as `train.py` compiles it (`training.loop.compile_step`: gradient
           accumulation, AdamW, the state and batch shardings), over the mesh (`--mesh`, else
           the config's `mesh.*`), which must use every chip of the slice;
  prefill  a prompt of --context tokens, and
  decode   one decoding step (and, in segmented mode, one segment fill) at that context: the
           inference engine of `inference.generate`, which runs on one chip (it is not sharded).

For each it prints XLA's memory per chip (`compiled.memory_analysis()`: arguments, outputs,
temporaries, generated code; aliased bytes counted once), whether that fits the chip's HBM,
and, for the training step, the bytes its collectives move per step (from the compiled HLO:
loops counted by their trip counts). On the CPU `attention.backend: auto` takes the TPU's
choice (splash), and the Pallas kernels lower through Mosaic for the target chip, as on the pod.
What XLA's analysis does not hold: the runtime's own reservations and fragmentation, so a
program within a few percent of the HBM may still not run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import resource
import sys
import time

import jax
import jax.numpy as jnp

from ..cli import ArgumentParser
from ..config import Config, ConfigError, load_config, preset_names
from ..model.platform import compiling_for

GB = 10**9

# HBM per chip, in GB (10^9 bytes), as Google lists them
HBM_GB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# the topology names libtpu takes: generation:AxB (2D tori: v5e, v6e) or AxBxC (3D: v4, v5p)
TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+)x(\d+)(?:x(\d+))?$")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


class AotError(ValueError):
    """A topology or mesh that this slice cannot have; libtpu missing."""


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # "v5p:4x4x4"
    generation: str  # "v5p"
    chips: int
    devices: tuple  # compile-only devices: one a chip, or one a TensorCore (v4 without megacore)

    @property
    def hbm_bytes(self) -> int:
        """HBM per device (a v4 chip's two cores, as two devices, share its 32 GB)."""
        return HBM_GB[self.generation] * GB * self.chips // len(self.devices)


def parse_topology(name: str) -> tuple[str, int]:
    """'v5e:4x4' -> ('v5e', 16); anything else is one clear error."""
    m = TOPOLOGY.match(name)
    if not m:
        raise AotError(f"topology {name!r}: expected GENERATION:AxB or AxBxC with GENERATION one of "
                       f"{', '.join(HBM_GB)} (e.g. v5e:4x4, v5p:4x4x4, v4:2x2x1, v6e:8x8)")
    generation, dims = m.group(1), [int(d) for d in m.groups()[1:] if d is not None]
    two_d = generation in ("v5e", "v6e")
    if two_d != (len(dims) == 2):
        raise AotError(f"topology {name!r}: {generation} slices are {'2D (AxB)' if two_d else '3D (AxBxC)'}")
    return generation, math.prod(dims)


def tpu_slice(name: str) -> Slice:
    """The compile-only devices of a TPU slice, from libtpu (no TPU needed)."""
    generation, chips = parse_topology(name)
    from jax.experimental import topologies

    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise AotError("compiling for a TPU topology needs libtpu: pip install -e '.[dev]' "
                       "(or pip install 'jax[tpu]'), on Linux") from e
    _prepare_libtpu()
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=name).devices
    except Exception as e:  # libtpu says why in its own words (an unknown shape, say)
        raise AotError(f"topology {name!r}: libtpu does not know it ({str(e).strip().splitlines()[0]})") from e
    if len(devices) % chips:
        raise AotError(f"topology {name!r}: libtpu gives {len(devices)} devices for {chips} chips")
    return Slice(name, generation, chips, tuple(devices))


def _prepare_libtpu() -> None:
    """Before libtpu loads. It takes a lock file (/tmp/libtpu_lockfile) meant for the one
    process that owns a TPU VM's chips; compiling owns no chips, and any other JAX process on
    the machine with libtpu installed may hold it (its backend probe loads libtpu). Off a TPU
    VM libtpu also looks for a pod to join (accelerator type, worker hosts) and logs that it
    found none; compiling needs neither."""
    from jax._src import hardware_utils

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")  # this host's own (absent) chips


def mesh_overrides(mesh: str | None) -> list[str]:
    """--mesh DATA,FSDP,TENSOR (DATA may be -1: the rest) -> mesh.* overrides."""
    if mesh is None:
        return []
    try:
        d, f, t = (int(x) for x in mesh.split(","))
    except ValueError:
        raise AotError(f"--mesh {mesh!r}: expected three integers DATA,FSDP,TENSOR (e.g. 1,16,1 or -1,4,1)") from None
    return [f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}"]


def check_mesh(cfg: Config, chips: int, name: str) -> None:
    """A pod run uses every chip: data × fsdp × tensor must be the slice's device count."""
    d, f, t = cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor
    if min(f, t) < 1 or (d != -1 and d < 1):
        raise AotError(f"mesh {d},{f},{t}: sizes must be positive (data may be -1)")
    if d == -1:
        if chips % (f * t):
            raise AotError(f"mesh -1,{f},{t}: fsdp × tensor = {f * t} does not divide the {chips} chips of {name}")
        d = chips // (f * t)
    if d * f * t != chips:
        raise AotError(f"mesh {d},{f},{t}: data × fsdp × tensor = {d * f * t} chips, but {name} has {chips}")


# --------------------------------------------------------------------------- what a program holds


def memory(compiled, hbm_bytes: int) -> dict:
    """XLA's memory per chip of a compiled program, and whether it fits the HBM."""
    m = compiled.memory_analysis()
    parts = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                 aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes,
                 code=m.generated_code_size_in_bytes)
    # donated arguments reused as outputs (the train state) are counted in both: once here
    total = parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temporaries"] + parts["code"]
    return dict(bytes=parts, total_bytes=total, hbm_bytes=hbm_bytes, fits=total <= hbm_bytes)


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "bf16": 2,
                "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s+\(")  # a computation's first line (unindented)
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_CALLED = re.compile(r"\b(condition|body|to_apply|calls|branch_computations)=(\{[^}]*\}|%[\w.\-]+)")
_BOUND = re.compile(r"constant\((\d+)\)")


def _bytes(shapes: str) -> int:
    return sum(_DTYPE_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in _SHAPE.findall(shapes))


def _computations(hlo: str) -> tuple[dict[str, list[str]], str | None]:
    comps, entry, current = {}, None, None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(2)
            comps[current] = []
            entry = current if m.group(1) else entry
        elif current is not None and line.startswith(" "):
            comps[current].append(line)
    return comps, entry


def _trip_count(condition: list[str]) -> int | None:
    """A scan's loop condition, `i < N` with N a constant: N (the counter starts at 0)."""
    root = next((line for line in condition if "ROOT" in line), "")
    bounds = {int(n) for line in condition for n in _BOUND.findall(line) if "s32[]" in line}
    return bounds.pop() if "direction=LT" in root and len(bounds) == 1 else None


def collectives(hlo: str) -> dict[str, dict]:
    """Per kind of collective: how many run in one call of the compiled program, and the bytes
    of their results per chip (for a reduce-scatter, its input: the larger side), from its HLO
    text. A loop's body counts once per iteration (a scan's `i < N`; a loop whose count cannot
    be read counts once and is reported under `loops_counted_once`); of a conditional's
    branches the costliest counts; an async pair counts once, at its start."""
    comps, entry = _computations(hlo)
    unknown = [0]
    memo: dict[str, dict] = {}

    def add(into: dict, other: dict, times: int = 1) -> None:
        for k, (c, b) in other.items():
            c0, b0 = into.get(k, (0, 0))
            into[k] = (c0 + times * c, b0 + times * b)

    def total(name: str, depth: int = 0) -> dict:
        if name in memo or depth > 64 or name not in comps:
            return memo.get(name, {})
        found: dict = {}
        for line in comps[name]:
            op = _OP.search(line)
            if op:
                result, kind, start = op.groups()
                size = _bytes(result)
                if start:  # (operands, results) tuple, or the result alone: the larger array
                    size = max((_bytes(m.group(0)) for m in _SHAPE.finditer(result)), default=size)
                if kind == "reduce-scatter":
                    size = max(size, _bytes(line[op.end():].split(")")[0]))
                add(found, {kind: (1, size)})
            called = {k: [c.strip().lstrip("%") for c in v.strip("{}").split(",") if c.strip()]
                      for k, v in _CALLED.findall(line)}
            if "body" in called:
                trips = _trip_count(comps.get(called.get("condition", [""])[0], []))
                if trips is None:
                    unknown[0] += 1
                add(found, total(called["body"][0], depth + 1), trips or 1)
            elif "branch_computations" in called:
                branches = [total(c, depth + 1) for c in called["branch_computations"]]
                add(found, max(branches, key=lambda t: sum(b for _, b in t.values()), default={}))
            for c in called.get("calls", []) + called.get("to_apply", []):
                add(found, total(c, depth + 1))
        memo[name] = found
        return found

    out = {k: dict(count=c, bytes=b) for k, (c, b) in total(entry).items()} if entry else {}
    if unknown[0]:
        out["loops_counted_once"] = unknown[0]
    return out


# --------------------------------------------------------------------------- the programs


def _on(device, tree):
    sh = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree)


def _timed(lower_and_compile) -> tuple:
    t0 = time.perf_counter()
    compiled = lower_and_compile()
    return compiled, round(time.perf_counter() - t0, 1)


def compile_train(cfg: Config, tpu: Slice):
    """The training step exactly as `train.run` builds it, for every chip of the slice."""
    from ..model.sharding import check_batch, make_mesh
    from ..training.loop import compile_step, state_shardings
    from ..training.optim import optimizer

    mesh = make_mesh(cfg, devices=tpu.devices)
    check_batch(cfg, mesh)
    opt = optimizer(cfg.train)
    abstract, shardings = state_shardings(cfg, opt, mesh)
    (compiled, _), seconds = _timed(lambda: compile_step(cfg, opt, mesh, shardings, abstract, doc_ids=True))
    return compiled, seconds, dict(mesh.shape)


def compile_inference(cfg: Config, tpu: Slice, context: int, batch: int = 1) -> dict:
    """Prefill of `context` tokens and a decoding step (and a segment fill) at that context,
    on one chip: the engine of `inference.generate` is not sharded."""
    from ..inference.generate import _engine
    from ..model.transformer import init_params
    from .bench import _decode_state

    chip = tpu.devices[0]
    prefill, step, fill, _, on_host = _engine(cfg)
    S = cfg.segment.len if cfg.attention.mode == "segmented" else 1
    padded = -(-context // S) * S
    capacity = -(-cfg.inference.max_len // S) * S
    params = _on(chip, jax.eval_shape(lambda: init_params(cfg, seed=0)))
    tokens = _on(chip, jax.ShapeDtypeStruct((batch, padded), jnp.int32))
    lengths = _on(chip, jax.ShapeDtypeStruct((batch,), jnp.int32))
    token = _on(chip, jax.ShapeDtypeStruct((batch,), jnp.int32))
    cache, pool = jax.eval_shape(lambda: _decode_state(cfg, batch, context, capacity, jnp.dtype(cfg.model.dtype)))
    cache, pool = _on(chip, cache), _on(chip, pool)
    out = {"prefill": _timed(lambda: prefill.lower(params, tokens, lengths, padded).compile()),
           "decode": _timed(lambda: step.lower(params, cache, token).compile())}
    if fill is not None and not on_host:  # a pool in host memory: not modelled here
        out["fill"] = _timed(lambda: fill.lower(cache, pool, _on(chip, jax.ShapeDtypeStruct((batch,), bool))).compile())
    return out


def report(cfg: Config, tpu: Slice, programs=("train", "prefill", "decode"), context: int | None = None) -> dict:
    """Compile the programs for the slice; memory per chip, fit and (train) collectives."""
    result = dict(topology=tpu.name, chips=tpu.chips, devices=len(tpu.devices), device=tpu.devices[0].device_kind,
                  hbm_gb=HBM_GB[tpu.generation], seq_len=cfg.train.seq_len, batch=cfg.train.batch_size,
                  grad_accum=cfg.train.grad_accum, mode=cfg.attention.mode, programs={})
    with compiling_for("tpu"):
        if "train" in programs:
            f, t = cfg.mesh.fsdp, cfg.mesh.tensor
            d = cfg.mesh.data if cfg.mesh.data != -1 else len(tpu.devices) // (f * t)
            result["mesh"] = dict(data=d, fsdp=f, tensor=t)
            try:
                compiled, seconds, mesh = compile_train(cfg, tpu)
            except jax.errors.JaxRuntimeError as e:
                result["programs"]["train"] = too_big(e, tpu.hbm_bytes)
                compiled = None
            if compiled is not None:
                hlo = compiled.as_text()
                result["programs"]["train"] = dict(compile_s=seconds, **memory(compiled, tpu.hbm_bytes),
                                                   collectives=collectives(hlo),
                                                   mosaic_kernels=hlo.count('custom_call_target="tpu_custom_call"'))
        if {"prefill", "decode"} & set(programs):
            context = context or cfg.train.seq_len
            result["context"] = context
            for name, (compiled, seconds) in compile_inference(cfg, tpu, context).items():
                result["programs"][name] = dict(compile_s=seconds, chips=1, **memory(compiled, tpu.hbm_bytes))
    result["peak_host_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 2)
    return result


def too_big(error: Exception, hbm_bytes: int) -> dict:
    """XLA's TPU compiler refuses a program whose buffers exceed the chip's HBM: that is the
    answer (not fitting), with XLA's own words and figures."""
    message = str(error).strip().splitlines()[0]
    if "RESOURCE_EXHAUSTED" not in message:
        raise error
    need = (re.search(r"required for [\w ]+\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", message)
            or re.search(r"Used ([\d.]+)G of ([\d.]+)G hbm", message))
    return dict(fits=False, hbm_bytes=hbm_bytes, error=message,
                needed_gib=float(need.group(1)) if need else None, available_gib=float(need.group(2)) if need else None)


def _gb(n: int) -> str:
    return f"{n / GB:.2f}"


def describe(result: dict) -> str:
    """The report as lines for a person."""
    lines = [f"{result['topology']}: {result['devices']} × {result['device']} ({result['hbm_gb']} GB HBM a chip); "
             f"{result['mode']}, batch {result['batch']} × {result['seq_len']} tokens, "
             f"{result['grad_accum']} micro-batches" + (f"; mesh {result['mesh']}" if "mesh" in result else "")]
    for name, p in result["programs"].items():
        if "error" in p:
            lines.append(f"  {name:8s} DOES NOT FIT: {p['error']}")
            continue
        b = p["bytes"]
        where = "one chip" if p.get("chips") == 1 else "per chip"
        lines.append(f"  {name:8s} {where}: arguments {_gb(b['arguments'])} GB, outputs {_gb(b['outputs'])} "
                     f"(aliased {_gb(b['aliased'])}), temporaries {_gb(b['temporaries'])}, code "
                     f"{_gb(b['code'])}; total {_gb(p['total_bytes'])} GB: "
                     + ("fits" if p["fits"] else "DOES NOT FIT") + f" (compiled in {p['compile_s']} s)")
        for kind, c in p.get("collectives", {}).items():
            if kind == "loops_counted_once":
                lines.append(f"           ({c} loops of unknown trip count counted once: figures are a lower bound)")
            else:
                lines.append(f"           {kind}: {c['count']} a step, {_gb(c['bytes'])} GB a chip")
    lines.append(f"  this machine: {result['peak_host_rss_gb']} GB peak memory")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m segexec_jax.aot", description=__doc__)
    parser.add_argument("--config", default="1b", help=f"preset ({', '.join(preset_names())}) or YAML path")
    parser.add_argument("--topology", required=True, help="TPU slice, e.g. v5e:4x4, v5p:4x4x4, v6e:8x8, v4:2x2x2")
    parser.add_argument("--mesh", default=None,
                        help="DATA,FSDP,TENSOR over the slice's chips (DATA -1: the rest); default: the config's mesh.*")
    parser.add_argument("--programs", default="train,prefill,decode", help="which to compile, comma-separated")
    parser.add_argument("--context", type=int, default=None,
                        help="prefill and decode context in tokens (default: train.seq_len)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--out", default=None, help="append the JSON result to this file")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, or YAML files layered in order")
    args = parser.parse_args(argv)
    # nothing here runs on this machine's own devices: no other backend needs to start
    jax.config.update("jax_platforms", "cpu")
    programs = tuple(p for p in args.programs.split(",") if p)
    unknown = set(programs) - {"train", "prefill", "decode"}
    try:
        if unknown:
            raise AotError(f"--programs: unknown {', '.join(sorted(unknown))} (choose from train, prefill, decode)")
        parse_topology(args.topology)
        # --mesh last: it says the mesh, whatever a layered YAML file says
        cfg = load_config(args.config, list(args.overrides) + mesh_overrides(args.mesh))
        context = args.context or cfg.train.seq_len
        # the decode cache (and the pool) hold the context, no more
        cfg = dataclasses.replace(cfg, inference=dataclasses.replace(cfg.inference, max_len=context))
        tpu = tpu_slice(args.topology)
        check_mesh(cfg, len(tpu.devices), args.topology)
        result = report(cfg, tpu, programs, context)
    except (AotError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result.update(config=args.config, overrides=list(args.overrides), jax=jax.__version__)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    print(json.dumps(result) if args.json else describe(result), flush=True)
    return 0
