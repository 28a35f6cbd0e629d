"""Device mesh and shardings: mesh axes (data, fsdp, tensor) from the config, and one short
table mapping logical axis names (of parameters and of activations) onto them.

Inside `jax.set_mesh(mesh)`, `constrain` pins an activation's layout by its logical axes:
the model calls it at the layer boundaries, so that every layer's input and output stay
sharded by rows and FSDP gathers the weights, never the tokens. Without a mesh it does
nothing (one device, tests, inference)."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from .config import Config, ConfigError

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
    "act_seq": None,    # activations [batch, act_seq, act_embed]: rows sharded, the rest whole
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
    B, A, p = cfg.train.batch_size, cfg.train.grad_accum, batch_parallelism(mesh)
    if B % A:
        raise ConfigError(f"config key 'train.batch_size': {B} must be divisible by train.grad_accum ({A})")
    if (B // A) % p:
        raise ConfigError(f"config key 'train.batch_size': the micro-batch ({B} / train.grad_accum {A} = "
                          f"{B // A}) must be divisible by the data-parallel size {p} (mesh.data × mesh.fsdp)")
    if B % jax.process_count():
        raise ConfigError(f"config key 'train.batch_size': {B} must be divisible by the number of "
                          f"processes ({jax.process_count()})")


def spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh) -> PartitionSpec:
    """Map logical axes to mesh axes; a dimension the mesh axes do not divide stays replicated."""
    parts, used = [], set()
    for name, dim in zip(axes, shape):
        target = RULES.get(name)
        size = math.prod(mesh.shape[a] for a in target) if target else 1
        if not target or size == 1 or dim % size or used & set(target):
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


def param_shardings(cfg: Config, params, mesh: jax.sharding.Mesh):
    from .model import logical_axes  # (the model imports `constrain` from here)

    axes = logical_axes(cfg)
    return jax.tree.map(lambda a, p: NamedSharding(mesh, spec(a, np.shape(p), mesh)), axes, params,
                        is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(RULES["batch"]))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """This process's rows -> one global array per field, sharded over (data, fsdp)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
