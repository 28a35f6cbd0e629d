"""Checkpoints (Orbax): the training state, the data iterators' positions and a layout record,
saved together, asynchronously and atomically, in `run.dir/checkpoints/<step>/`.

Each step directory holds three items:
  state  parameters, optimizer state, step and RNG key (`ocp.args.StandardSave`),
  data   every process's data-iterator state, one JSON file per process
         (`process_<i>-of-<n>.json`, grain's Orbax handler): each process reads its own slice
         of the data, so each resumes from its own position, and a resume with another number
         of processes is refused,
  meta   the layout: format version, the resolved config, every parameter's shape, dtype and
         logical axes, and the tokenizer — so a checkpoint says what it contains.
Orbax writes a step into a temporary directory and renames it when complete, so a kill
during a save leaves the previous checkpoints as they were.

Checksums: `meta` also holds a fingerprint of every array of the state (`fingerprints`:
64 bits from every element's bits and position, computed on the devices, the same for any
sharding) and of every process's data position. Restoring recomputes them, so a damaged
file is refused (`CheckpointError`, one line naming the step and what is damaged) instead
of loading as wrong or NaN weights; training then falls back to the previous good step
(`Checkpointer.restore_latest`), setting the damaged one aside in `run.dir/set_aside/`.
`python -m segexec_jax.training.checkpoint list RUN_DIR [--verify]` lists a run's checkpoints.

Paths are `etils.epath` paths: a local directory or anything etils and Orbax reach
(`gs://bucket/run`). Parameters can be loaded straight into their shardings on a mesh.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import pathlib
import re
import sys
import warnings
import zlib
from typing import Any

import grain
import grain.checkpoint
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import yaml
from etils import epath
from jax.experimental import multihost_utils

from ..config import Config, ConfigError, config_from_dict
from ..model.transformer import logical_axes, param_shapes

FORMAT = "segexec_jax/1"
log = logging.getLogger(__name__)

# grain's name for one process's iterator state inside the `data` item
_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, incompatible, or could not be written."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint step whose files are missing, unreadable, or do not match its checksums."""

    def __init__(self, root, step: int, reason: str):
        self.root, self.step, self.reason = root, step, reason
        super().__init__(f"checkpoint step {step} in {root} is damaged: {reason}")


# ----------------------------------------------------------------------------- checksums
# A 64-bit fingerprint per array: every element's bits are mixed with its position (a
# murmur-style finaliser, in uint32 arithmetic, which wraps) and summed modulo 2**32, twice
# with different constants. The sum does not depend on the order of addition, so the
# fingerprint is the same for any sharding or device count, and it runs where the array is.
_MIX = ((0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35), (0x7FEB352D, 0x846CA68B, 0x27D4EB2F))


def _as_uint32(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
    if size == 8:  # [..., 2] words
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    raise CheckpointError(f"cannot checksum an array of dtype {x.dtype}")


def _fingerprint(x: jax.Array) -> jax.Array:
    bits = _as_uint32(x)
    index = jnp.zeros(bits.shape, jnp.uint32)  # the flat position, without reshaping (no resharding)
    for axis, n in enumerate(bits.shape):
        index = index * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
    out = []
    for golden, m1, m2 in _MIX:
        h = (bits ^ (index * jnp.uint32(golden))) * jnp.uint32(m1)
        h = (h ^ (h >> 15)) * jnp.uint32(m2)
        out.append(jnp.sum(h ^ (h >> 13), dtype=jnp.uint32))
    return jnp.stack(out)


@jax.jit
def _fingerprint_tree(tree):
    return jax.tree.map(_fingerprint, tree)


def _path_name(path) -> str:
    """"opt_state/1/0/mu/embed": the same for a dict key, an attribute (a NamedTuple's field)
    or an index, so that a state read back as plain dicts and lists keeps its names."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def fingerprints(tree) -> dict[str, str]:
    """{path: 16 hex digits} for every array of `tree` (paths as "params/blocks/wq")."""
    values = jax.device_get(_fingerprint_tree(tree))
    return {_path_name(path): "%08x%08x" % tuple(int(w) for w in v)
            for path, v in jax.tree_util.tree_leaves_with_path(values)}


def _check_fingerprints(root, step: int, tree, saved: dict | None, prefix: str = "") -> None:
    """Raise `DamagedCheckpoint` where `tree`'s arrays differ from the saved fingerprints, or
    one of them has none (`tree` being the part of the state under `prefix`, e.g. "params/"
    when only the parameters were read)."""
    if not saved:  # a checkpoint written before checksums: nothing to compare
        return
    saved = {k: v for k, v in saved.items() if k.startswith(prefix)}
    got = {prefix + k: v for k, v in fingerprints(tree).items()}
    bad = sorted(k for k in got.keys() | saved.keys() if got.get(k) != saved.get(k))
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        what = ("does not match its checksum" if bad[0] in got and bad[0] in saved
                else "has no checksum" if bad[0] in got else "is missing")
        raise DamagedCheckpoint(root, step, f"the state's {bad[0]}{more} {what}")


def _data_checksum(state: Any) -> int:
    # 31 bits: it travels between processes as int32 (JAX without x64)
    return zlib.crc32(json.dumps(state, sort_keys=True, default=str).encode()) & 0x7FFFFFFF


def _all_processes(value: int) -> list[int]:
    """`value` from every process, in process order."""
    if jax.process_count() == 1:
        return [value]
    return [int(v) for v in multihost_utils.process_allgather(np.array([value], np.int64)).reshape(-1)]


def _reason(e: BaseException) -> str:
    """One line of an exception from Orbax or TensorStore (they run to 60 lines)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 240 else text[:237] + "..."


# files without which a step cannot be read: named when missing, rather than the pytree error
# Orbax gives for a missing _METADATA
_REQUIRED = ("state/_METADATA", "meta/metadata")


def as_path(path: str | os.PathLike) -> epath.Path:
    """A run or checkpoint location as an `epath.Path`: a URI (gs://...) as given, a local path
    made absolute (a URI must never pass through `resolve`, which would make it local)."""
    p = epath.Path(path).expanduser()
    return p if p.is_absolute() else p.resolve()


def layout(cfg: Config, tokenizer_name: str) -> dict:
    shapes = param_shapes(cfg)
    axes = logical_axes(cfg)
    flat = {}
    for path, shape in jax.tree_util.tree_leaves_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple)):
        key = "/".join(str(getattr(k, "key", k)) for k in path)
        flat[key] = {"shape": list(shape), "dtype": cfg.model.param_dtype}
    for path, ax in jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple)):
        flat["/".join(str(getattr(k, "key", k)) for k in path)]["logical_axes"] = list(ax)
    return {"format": FORMAT, "config": cfg.to_dict(), "params": flat, "tokenizer": tokenizer_name}


SET_ASIDE = "set_aside"  # in run.dir: damaged steps, and those after a --resume-from step


def _missing(root: epath.Path, step: int) -> str | None:
    for name in _REQUIRED:
        if not (root / str(step) / name).exists():
            return f"{name} is missing"
    return None


class Checkpointer:
    def __init__(self, run_dir: str | os.PathLike, keep: int, asynchronous: bool = True):
        self.directory = as_path(run_dir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=asynchronous)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data: grain.DatasetIterator | None, meta: dict) -> None:
        """Start saving `step` (returns before the write finishes when asynchronous). `data`:
        this process's data iterator, whose position every process writes to its own file."""
        meta = dict(meta, step=int(step), checksums=fingerprints(state))
        if data is not None:
            meta["data_checksums"] = _all_processes(_data_checksum(data.get_state()))
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if data is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data)
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except OSError as e:
            raise self._write_error(step, e) from None

    def wait(self) -> None:
        """Block until pending saves are complete; raise a clear error if one failed."""
        try:
            self.manager.wait_until_finished()
        except OSError as e:
            raise self._write_error(self.manager.latest_step(), e) from None

    def _write_error(self, step, e: OSError) -> CheckpointError:
        reason = "no space left on device" if e.errno == errno.ENOSPC else str(e)
        good = [s for s in self.manager.all_steps() if s != step]
        kept = f"the last good checkpoint (step {max(good)}) is intact" if good else "no earlier checkpoint exists"
        return CheckpointError(f"saving checkpoint step {step} in {self.directory} failed: {reason}; {kept}")

    def restore(self, step: int, abstract_state: Any, data: grain.DatasetIterator | None = None) -> tuple[Any, dict]:
        """(state, meta) of `step`, verified against its checksums (`DamagedCheckpoint` if it
        does not match, or cannot be read); `data`, this process's data iterator, is moved to
        the position this process saved."""
        items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        single = None
        if data is not None:
            single = self._data_files(step)
            if single is None:
                items["data"] = grain.checkpoint.CheckpointRestore(data)
        failure = _missing(self.directory, step)
        out = None
        if failure is None:
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(**items))
                if single is not None:
                    data.set_state(json.loads(single.read_text()))
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                failure = _reason(e)
        # every process learns whether any failed (a damaged file may be one process's own);
        # the checksums below are computed by all of them together
        if any(_all_processes(failure is not None)):
            raise DamagedCheckpoint(self.directory, step, failure or "another process could not read it")
        meta = out["meta"]
        _check_fingerprints(self.directory, step, out["state"], meta.get("checksums"))
        if data is not None and "data_checksums" in meta:
            bad = meta["data_checksums"][jax.process_index()] != _data_checksum(data.get_state())
            bad_in = [i for i, b in enumerate(_all_processes(bad)) if b]  # all processes agree
            if bad_in:
                raise DamagedCheckpoint(self.directory, step, f"the data position of process "
                                        f"{bad_in[0]} does not match its checksum")
        return out["state"], meta

    def restore_latest(self, abstract_state: Any, data: grain.DatasetIterator | None = None,
                       step: int | None = None) -> tuple[int | None, Any]:
        """(step, state) of the latest good checkpoint, or (None, None) when there is none.

        A damaged step is set aside (moved to `run.dir/set_aside/`) with a warning, and the
        one before it is tried. `step`: resume from this step exactly (`--resume-from`); the
        steps after it are set aside, so that training can save them anew, and a damaged
        `step` is refused, naming the previous good one."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                saved = ", ".join(map(str, sorted(steps))) or "none"
                raise CheckpointError(f"--resume-from {step}: {self.directory} has no checkpoint step {step} "
                                      f"(saved steps: {saved})")
            try:
                state, _ = self.restore(step, abstract_state, data)
            except DamagedCheckpoint as e:
                raise CheckpointError(f"{e}; {self._previous_good(step, abstract_state)}") from None
            later = [s for s in steps if s > step]
            if later:
                log.warning("resuming from step %d: setting aside the later steps %s in %s", step,
                            ", ".join(map(str, sorted(later))), self._set_aside(later))
            return step, state
        for i, s in enumerate(steps):
            try:
                state, _ = self.restore(s, abstract_state, data)
                return s, state
            except DamagedCheckpoint as e:
                where = self._set_aside([s])
                then = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "no earlier checkpoint is left"
                log.warning("%s; set aside in %s; %s", e, where, then)
        if steps:
            raise CheckpointError(f"every checkpoint in {self.directory} is damaged (steps "
                                  f"{', '.join(map(str, sorted(steps)))}, now in "
                                  f"{self.directory.parent / SET_ASIDE}); start a new run.dir, or move them back")
        return None, None

    def _previous_good(self, step: int, abstract_state: Any) -> str:
        for s in sorted((s for s in self.manager.all_steps() if s < step), reverse=True):
            try:
                self.restore(s, abstract_state)
                return f"the previous good step is {s}: --resume-from {s}"
            except DamagedCheckpoint:
                continue
        return "no earlier good checkpoint exists"

    def _set_aside(self, steps: list[int]) -> epath.Path:
        """Move `steps` out of the checkpoints (into `run.dir/set_aside/<step>`, never over an
        earlier one): Orbax then neither lists nor deletes them, and training can save those
        steps again. Nothing is deleted."""
        target = self.directory.parent / SET_ASIDE
        if jax.process_index() == 0:
            target.mkdir(parents=True, exist_ok=True)
            for s in steps:
                name, n = str(s), 1
                while (target / name).exists():
                    name, n = f"{s}.{n}", n + 1
                (self.directory / str(s)).rename(target / name)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("segexec_jax set aside checkpoints")
        self.manager.reload()
        return target

    def _data_files(self, step: int) -> epath.Path | None:
        """Check that `step` holds one data position per process of this run. Returns the file
        of a checkpoint written before positions were saved per process (one position, its
        only process's), None for a per-process one."""
        directory = self.directory / str(step) / "data"
        counts = {int(m[2]) for p in (directory.iterdir() if directory.is_dir() else ())
                  if (m := _DATA_FILE.fullmatch(p.name))}
        here = jax.process_count()
        if counts and counts != {here}:
            saved = ", ".join(map(str, sorted(counts)))
            raise CheckpointError(f"checkpoint step {step} in {self.directory} holds the data positions of {saved} "
                                  f"processes, and this run has {here}: each process resumes its own slice of "
                                  f"the data, so resume with {saved} processes (or start a new run.dir)")
        if counts:
            return None
        if (directory / "metadata").is_file():  # JsonSave's file: one position, from process 0
            if here > 1:
                raise CheckpointError(f"checkpoint step {step} in {self.directory} holds one data position "
                                      f"(saved by an older version, by process 0 only), and this run has {here} "
                                      "processes: resume it with one process")
            return directory / "metadata"
        raise CheckpointError(f"checkpoint step {step} in {self.directory} holds no data position")

    def close(self) -> None:
        self.manager.close()


def _find(path: str | os.PathLike) -> tuple[epath.Path, int]:
    """(checkpoints directory, step) for a run directory, a checkpoints directory or a step."""
    path = as_path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if (path / "meta").is_dir() and (path / "state").is_dir() and path.name.isdigit():
        return path.parent, int(path.name)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = _steps(root)
    if not steps:
        raise CheckpointError(f"no checkpoint found in {str(path)!r} (expected a run directory, its "
                              "checkpoints/ directory, or a step directory)")
    return root, steps[-1]


def read_meta(path: str | os.PathLike) -> dict:
    """The layout record of a checkpoint (run directory: its latest step; or a converted one)."""
    from ..interop.hf import is_converted

    if is_converted(path):
        return json.loads((epath.Path(path) / "meta.json").read_text())
    root, step = _find(path)
    try:
        meta = json.loads((root / str(step) / "meta" / "metadata").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint step {step} in {root} is damaged: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{root}/{step} is not a {FORMAT} checkpoint")
    return meta


def read_config(path: str | os.PathLike) -> Config:
    """The config a checkpoint was saved with, without reading its parameters."""
    from ..interop.hf import is_converted

    try:
        if is_converted(path):
            return config_from_dict(yaml.safe_load((epath.Path(path) / "config.yaml").read_text()))
        return config_from_dict(read_meta(path)["config"])
    except (ConfigError, KeyError, OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} holds an invalid config: {e}") from None


def _target_shardings(cfg: Config, shardings) -> Any:
    """A sharding per parameter: the tree given, those of a mesh (`transformer.param_shardings`), or
    the first device."""
    from ..model.transformer import param_shardings

    dtype = jnp.dtype(cfg.model.param_dtype)
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(cfg),
                            is_leaf=lambda x: isinstance(x, tuple))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return abstract, jax.tree.map(lambda _: device, abstract)
    if isinstance(shardings, jax.sharding.Mesh):
        return abstract, param_shardings(cfg, abstract, shardings)
    if jax.tree.structure(shardings) != jax.tree.structure(abstract):
        raise CheckpointError("the shardings given do not match the checkpoint's parameters: "
                              f"{jax.tree.structure(shardings)} against {jax.tree.structure(abstract)}")
    return abstract, shardings


def load_checkpoint(path: str | os.PathLike, shardings=None) -> tuple[Config, dict]:
    """(config, parameters) from a run directory (its latest step), a step directory, or a
    checkpoint converted from Hugging Face (`python -m segexec_jax.convert from-hf`).

    `shardings`: a tree of `jax.sharding.Sharding` like the parameters, or a `Mesh` (then each
    parameter's logical-axis sharding, `transformer.param_shardings`). Every array is read
    straight into its shards: each process reads only the shards its devices hold. Without
    it, the parameters go to the first device."""
    from ..interop.hf import ConvertError, is_converted, read_converted

    cfg = read_config(path)
    abstract, target = _target_shardings(cfg, shardings)
    if is_converted(path):
        try:
            _, _, params = read_converted(path)
        except ConvertError as e:
            raise CheckpointError(str(e)) from None
        # numpy on the host (memory-mapped tensors, stacked over layers); each device gets its
        # own slice, never the whole array on one device first
        place = lambda a, sh: jax.make_array_from_callback(np.shape(a), sh, lambda index: np.asarray(a[index]))
        return cfg, jax.tree.map(place, params, target)
    root, step = _find(path)
    abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, target)
    try:
        return cfg, _read_params(root, step, abstract)
    except DamagedCheckpoint as e:
        earlier = sorted((s for s in _steps(root) if s < step), reverse=True)
        for s in earlier:
            try:
                _read_params(root, s, abstract)
            except (DamagedCheckpoint, CheckpointError):
                continue
            raise CheckpointError(f"{e}; the previous good step is {s}: {root / str(s)}") from None
        raise CheckpointError(f"{e}; no earlier good checkpoint exists") from None


def _read_params(root: epath.Path, step: int, abstract) -> dict:
    """The parameters of one step, verified against its checksums."""
    meta = None
    failure = _missing(root, step)
    if failure is None:
        try:
            meta = json.loads((root / str(step) / "meta" / "metadata").read_text())
            restored = ocp.PyTreeCheckpointer().restore(
                root / str(step) / "state",
                args=ocp.args.PyTreeRestore({"params": abstract}, partial_restore=True,
                                            restore_args=ocp.checkpoint_utils.construct_restore_args({"params": abstract})))
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            failure = _reason(e)
    if any(_all_processes(failure is not None)):
        raise DamagedCheckpoint(root, step, failure or "another process could not read it")
    _check_fingerprints(root, step, restored["params"], meta.get("checksums") if isinstance(meta, dict) else None,
                        "params/")
    return restored["params"]


def _steps(root: epath.Path) -> list[int]:
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()
                  and (p / "meta").is_dir()) if root.is_dir() else []


# --------------------------------------------------------------------------- command line


def _size(path: epath.Path) -> int:
    if "://" in os.fspath(path):
        return sum(p.stat().length for p in path.rglob("*") if p.is_file())
    return sum(f.stat().st_size for f in pathlib.Path(os.fspath(path)).rglob("*") if f.is_file())


def list_checkpoints(run_dir: str | os.PathLike, verify: bool = False) -> list[dict]:
    """Each saved step of a run: step, saved (UTC time), bytes, whether it carries checksums,
    and with `verify` whether its state matches them ("ok" or the damage, one line)."""
    root = as_path(run_dir)
    root = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    if not root.is_dir():
        raise CheckpointError(f"no checkpoints directory in {str(run_dir)!r}")
    rows = []
    for step in _steps(root):
        row = dict(step=step, saved=None, bytes=_size(root / str(step)), checksums=False)
        try:
            info = json.loads((root / str(step) / "_CHECKPOINT_METADATA").read_text())
            ns = info.get("commit_timestamp_nsecs") or info.get("init_timestamp_nsecs")
            row["saved"] = datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        except (OSError, ValueError, TypeError):
            pass
        try:
            row["checksums"] = "checksums" in json.loads((root / str(step) / "meta" / "metadata").read_text())
        except (OSError, ValueError):
            pass
        if verify:
            row["status"] = _verify(root, step)
        rows.append(row)
    return rows


def _verify(root: epath.Path, step: int) -> str:
    """"ok" when every array of the step's state matches its checksum, else the damage."""
    failure = _missing(root, step)
    if failure is None:
        try:
            meta = json.loads((root / str(step) / "meta" / "metadata").read_text())
            with warnings.catch_warnings():  # "sharding info not provided": read to one device, as meant
                warnings.simplefilter("ignore", UserWarning)
                state = ocp.PyTreeCheckpointer().restore(root / str(step) / "state")
            _check_fingerprints(root, step, state, meta.get("checksums"))
        except DamagedCheckpoint as e:
            failure = e.reason
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            failure = _reason(e)
    return "ok" if failure is None else f"damaged: {failure}"


def main(argv: list[str] | None = None) -> int:
    from ..cli import ArgumentParser

    parser = ArgumentParser(prog="python -m segexec_jax.training.checkpoint", description="Inspect a run's checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="list a run's checkpoints (step, time, size, checksums)")
    ls.add_argument("run_dir", help="a run directory (run.dir) or its checkpoints/ directory")
    ls.add_argument("--verify", action="store_true", help="read every step and check it against its checksums")
    args = parser.parse_args(argv)
    try:
        rows = list_checkpoints(args.run_dir, verify=args.verify)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not rows:
        print(f"no checkpoints in {args.run_dir}")
    for r in rows:
        status = f"  {r['status']}" if "status" in r else ""
        print(f"step {r['step']:>8}  {r['saved'] or '?':19}  {r['bytes'] / 2**20:10.1f} MiB  "
              f"{'checksums' if r['checksums'] else 'no checksums'}{status}")
    aside = as_path(args.run_dir) / SET_ASIDE
    if aside.is_dir():
        names = sorted(p.name for p in aside.iterdir())
        if names:
            print(f"set aside in {aside}: {', '.join(names)}")
    return 1 if any(r.get("status", "ok") != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
