"""Device mesh and shardings: mesh axes (data, fsdp, tensor) from the config, and one short
table mapping logical axis names (of parameters and of activations) onto them.

Inside `jax.set_mesh(mesh)`, `constrain` pins an activation's layout by its logical axes:
the model calls it at the layer boundaries, so that every layer's input and output stay
sharded by rows and FSDP gathers the weights, never the tokens. Without a mesh it does
nothing (one device, tests, inference).

The rows of a micro-batch go over `data` × `fsdp` where they divide it, else over `data`
alone: then the `fsdp` devices share each row by its positions (`act_seq`), so a
micro-batch of one row still splits its work over them (sequence parallelism inside a
segment; attention gathers the keys it needs). `tensor` splits heads and the MLP's hidden
units (Megatron style: activations whole at the layer boundaries).

`gather_fsdp` undoes the FSDP split of the parameters once, before the segment loop
(`mesh.fsdp_gather: step`), so that neither the segments nor the layers repeat it;
`mesh.fsdp_gather: layer` leaves the gathers at each use (least memory, most traffic)."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ..config import Config, ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (None: replicated)
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "layers": None,
    "head_dim": None,
    "act_seq": ("fsdp",),  # activations [batch, act_seq, act_embed]: positions over fsdp when
                           # the rows do not use it (a micro-batch smaller than data × fsdp)
    "act_embed": None,
}


def make_mesh(cfg: Config, devices=None) -> jax.sharding.Mesh:
    """mesh.data × mesh.fsdp × mesh.tensor devices (data = -1: all the others). A mesh smaller
    than the machine uses the first devices (handy for tests and single-device runs)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    f, t = cfg.mesh.fsdp, cfg.mesh.tensor
    d = cfg.mesh.data if cfg.mesh.data != -1 else n // (f * t)
    if d < 1 or d * f * t > n or (cfg.mesh.data == -1 and d * f * t != n):
        raise ConfigError(f"config key 'mesh': mesh.data × mesh.fsdp × mesh.tensor = {d} × {f} × {t} "
                          f"does not fit the {n} devices")
    if jax.process_count() > 1 and d * f * t != n:
        raise ConfigError(f"config key 'mesh': a multi-process run must use all {n} devices")
    return jax.make_mesh((d, f, t), MESH_AXES, devices=devices[: d * f * t],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)


def batch_parallelism(mesh: jax.sharding.Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch(cfg: Config, mesh: jax.sharding.Mesh) -> None:
    B, A = cfg.train.batch_size, cfg.train.grad_accum
    if B % A:
        raise ConfigError(f"config key 'train.batch_size': {B} must be divisible by train.grad_accum ({A})")
    if (B // A) % mesh.shape["data"]:
        raise ConfigError(f"config key 'train.batch_size': the micro-batch ({B} / train.grad_accum {A} = "
                          f"{B // A}) must be divisible by mesh.data ({mesh.shape['data']}); "
                          "mesh.fsdp takes any micro-batch (it splits a row's positions when rows run out)")
    p = jax.process_count()
    if p > 1 and ((B // A) % batch_parallelism(mesh) or batch_parallelism(mesh) % p):
        raise ConfigError(f"config key 'train.batch_size': with {p} processes each process feeds its own "
                          f"rows, so the micro-batch ({B // A}) must be divisible by mesh.data × mesh.fsdp "
                          f"({batch_parallelism(mesh)}), itself a multiple of the process count")


def _fit(target: tuple[str, ...] | None, dim: int, mesh, used: set) -> tuple[str, ...] | None:
    """The longest leading part of `target` whose devices divide `dim` (None if no part of
    more than one device does)."""
    for n in range(len(target or ()), 0, -1):
        axes = target[:n]
        size = math.prod(mesh.shape[a] for a in axes)
        if size > 1 and not dim % size and not used & set(axes):
            return axes
    return None


def spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh,
         exclude: tuple[str, ...] = ()) -> PartitionSpec:
    """Map logical axes to mesh axes (leaving out the mesh axes in `exclude`); a dimension
    keeps the longest leading part of its mesh axes that divides it, else stays replicated."""
    parts, used = [], set(exclude)
    for name, dim in zip(axes, shape):
        target = _fit(RULES.get(name), dim, mesh, used)
        if target is None:
            parts.append(None)
            continue
        used |= set(target)
        parts.append(target[0] if len(target) == 1 else target)
    return PartitionSpec(*parts)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """`x` laid out by its logical axes on the mesh set by `jax.set_mesh`; unchanged without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec(axes, x.shape, mesh))


def gather_fsdp(params, axes):
    """`params` whole along the FSDP axis (other shardings kept), as one explicit step: in a
    step traced on the mesh, the loops that use them then find them gathered. Unchanged
    without a mesh or without FSDP."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get("fsdp", 1) == 1:
        return params
    return jax.tree.map(lambda a, p: jax.lax.with_sharding_constraint(p, spec(a, p.shape, mesh, exclude=("fsdp",))),
                        axes, params, is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh: jax.sharding.Mesh, rows: int) -> NamedSharding:
    """Token arrays [B, T] whose micro-batches hold `rows` rows: rows over data × fsdp where
    they divide, else over data alone (positions are split inside the model, not here)."""
    return NamedSharding(mesh, spec(("batch", None), (rows, 1), mesh))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows -> one global array per field, laid out by `sharding`."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
