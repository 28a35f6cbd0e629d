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

Paths are `etils.epath` paths: a local directory or anything etils and Orbax reach
(`gs://bucket/run`). Parameters can be loaded straight into their shardings on a mesh.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from typing import Any

import grain
import grain.checkpoint
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import yaml
from etils import epath

from .config import Config, ConfigError, config_from_dict
from .model import logical_axes, param_shapes

FORMAT = "segexec_jax/1"
log = logging.getLogger(__name__)

# grain's name for one process's iterator state inside the `data` item
_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, incompatible, or could not be written."""


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
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta, step=int(step))))
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
        """(state, meta) of `step`; `data`, this process's data iterator, is moved to the
        position this process saved."""
        items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        single = None
        if data is not None:
            single = self._data_files(step)
            if single is None:
                items["data"] = grain.checkpoint.CheckpointRestore(data)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
            if single is not None:
                data.set_state(json.loads(single.read_text()))
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            raise CheckpointError(f"cannot restore checkpoint step {step} from {self.directory}: {e}") from None
        return out["state"], out["meta"]

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
    steps = sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()
                   and (p / "meta").is_dir()) if root.is_dir() else []
    if not steps:
        raise CheckpointError(f"no checkpoint found in {str(path)!r} (expected a run directory, its "
                              "checkpoints/ directory, or a step directory)")
    return root, steps[-1]


def read_meta(path: str | os.PathLike) -> dict:
    """The layout record of a checkpoint (run directory: its latest step; or a converted one)."""
    from .convert import is_converted

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
    from .convert import is_converted

    try:
        if is_converted(path):
            return config_from_dict(yaml.safe_load((epath.Path(path) / "config.yaml").read_text()))
        return config_from_dict(read_meta(path)["config"])
    except (ConfigError, KeyError, OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} holds an invalid config: {e}") from None


def _target_shardings(cfg: Config, shardings) -> Any:
    """A sharding per parameter: the tree given, those of a mesh (`sharding.param_shardings`), or
    the first device."""
    from .sharding import param_shardings

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
    parameter's logical-axis sharding, `sharding.param_shardings`). Every array is read
    straight into its shards: each process reads only the shards its devices hold. Without
    it, the parameters go to the first device."""
    from .convert import ConvertError, is_converted, read_converted

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
        restored = ocp.PyTreeCheckpointer().restore(
            root / str(step) / "state",
            args=ocp.args.PyTreeRestore({"params": abstract}, partial_restore=True,
                                        restore_args=ocp.checkpoint_utils.construct_restore_args({"params": abstract})))
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        raise CheckpointError(f"cannot load parameters from {root}/{step}: {e}") from None
    return cfg, restored["params"]
