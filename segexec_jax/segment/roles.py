"""Head roles (SPEC §2): what the heads of one KV group see before their own segment.

A role is one registered object (`Role`; `register`, `ROLES`), as a retrieval policy is: it
states which prefix its heads see, whether that prefix carries gradient, and its slow
reference rule. The segment operator (training and prefill), decoding and the per-token
reference all read it from here.

Every (layer, KV group) sits in one of three slots, each filled by a role:

  local           groups not in `segment.long_heads`                       default `tail`
  long            long-range groups of the layers in `segment.long_layers`  default `retrieval`
  long_elsewhere  long-range groups of the other layers                     default `segment`

`segment.roles: {slot: role name}` puts another registered role in a slot (read where the
config carries that key: config.py's SegmentConfig does not declare it yet). The slots read
different state, so a role fits a slot only if its prefix is there: local heads read the
carried state (the sinks and the tail, kept for every group), long-range heads of long
layers read the pool (through retrieval), and the other long-range heads read nothing.

The plan (`RolePlan`) is static (numpy), built once from the config, and padded so that
every layer has the same number of long-range slots (`n_long`) for the scan over layers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..config import Config, ConfigError, long_heads_by_layer, register_check

# --------------------------------------------------------------------------- roles

SINKS, TAIL_PART, RETRIEVED = "sinks", "tail", "retrieved"  # the parts a prefix is made of
PREFIXES = ((), (SINKS,), (TAIL_PART,), (SINKS, TAIL_PART), (RETRIEVED,))  # in window order


@dataclasses.dataclass(frozen=True)
class Role:
    """A head role, in one place. Register one with `register`; `segment.roles` names it.

    sees       its prefix, in window order: parts of the carried state, "sinks" (the first
               `segment.sinks` tokens of the document, those before the tail) and "tail" (the
               last M tokens of the previous segment); or "retrieved" (the entries the
               retrieval policy picks from the pool); or () (nothing before its segment)
    grad       the tail in its prefix carries gradient, back to `grad_horizon` segments
               (the sinks and the pool are stop-gradient state); False: a detached prefix
    reference  the slow rule for one query token whose document began in an earlier
               segment (any other sees no prefix): a `reference.PrefixQuery` -> the prefix
               key indices in window order (its own segment, causally, follows)
    """

    name: str
    sees: tuple[str, ...]
    grad: bool
    reference: Callable[[Any], list[int]]

    def __post_init__(self):
        if self.sees not in PREFIXES:
            raise ValueError(f"role {self.name!r}: sees must be one of {PREFIXES}, got {self.sees!r}")
        if self.grad and TAIL_PART not in self.sees:
            raise ValueError(f"role {self.name!r}: only a tail carries gradient (grad=True needs 'tail' in sees)")


ROLES: dict[str, Role] = {}


def register(role: Role) -> Role:
    """Make `role` available to configs by its name (a later one replaces an earlier)."""
    ROLES[role.name] = role
    return role


# The three roles of SPEC §2.
TAIL = register(Role("tail", (SINKS, TAIL_PART), True, lambda q: q.sinks() + q.tail())).name
RETRIEVAL = register(Role("retrieval", (RETRIEVED,), False, lambda q: q.retrieved())).name
SEGMENT = register(Role("segment", (), False, lambda q: [])).name

SLOTS = {"local": TAIL, "long": RETRIEVAL, "long_elsewhere": SEGMENT}  # slot -> default role
_READS = {"local": {SINKS, TAIL_PART}, "long": {RETRIEVED}, "long_elsewhere": set()}  # what each slot can reach


@register_check
def slot_roles(cfg: Config) -> dict[str, Role]:
    """The role of every slot, found by name (`segment.roles`, then the defaults)."""
    given = cfg.segment.roles
    for slot in given:
        if slot not in SLOTS:
            raise ConfigError(f"config key 'segment.roles': unknown slot {slot!r} (slots: {', '.join(SLOTS)})")
    out = {}
    for slot, default in SLOTS.items():
        name, key = given.get(slot, default), f"segment.roles.{slot}"
        if name not in ROLES:
            raise ConfigError(f"config key '{key}': unknown role {name!r} (registered: {', '.join(sorted(ROLES))})")
        missing = set(ROLES[name].sees) - _READS[slot]
        if missing:
            raise ConfigError(f"config key '{key}': role {name!r} sees {', '.join(sorted(missing))}, which "
                              f"{slot} heads do not keep (they reach: {', '.join(sorted(_READS[slot])) or 'nothing'})")
        out[slot] = ROLES[name]
    return out


# --------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True, eq=False)
class RolePlan:
    n_layers: int
    n_groups: int
    group_size: int  # query heads per KV group
    long_layers: tuple[int, ...]  # sorted
    n_long: int  # long-range slots per layer (the most any layer has)
    long_groups: np.ndarray  # [L, n_long] int32: KV group of each slot (0 where unused)
    long_used: np.ndarray  # [L, n_long] bool
    is_long_layer: np.ndarray  # [L] bool
    long_slot: np.ndarray  # [L] int32: index into long_layers (0 for other layers)
    local: Role  # the role of every slot (SLOTS)
    long: Role
    long_elsewhere: Role

    @property
    def roles(self) -> np.ndarray:
        """[L, G] the name of every KV group's role."""
        roles = np.full((self.n_layers, self.n_groups), self.local.name, object)
        for layer in range(self.n_layers):
            role = self.long if self.is_long_layer[layer] else self.long_elsewhere
            for slot in range(self.n_long):
                if self.long_used[layer, slot]:
                    roles[layer, self.long_groups[layer, slot]] = role.name
        return roles

    def role_at(self, layer: int, group: int) -> Role:
        return ROLES[self.roles[layer, group]]

    @property
    def retrieves(self) -> bool:
        """Some role reads the pool (whether the policy selects anything is the policy's say)."""
        return bool(self.long_layers) and self.n_long > 0 and RETRIEVED in self.long.sees

    @property
    def long_query_heads(self) -> np.ndarray:
        """[L, n_long * group_size] query-head indices of the long-range slots."""
        r = self.group_size
        heads = self.long_groups[:, :, None] * r + np.arange(r)[None, None, :]
        return heads.reshape(self.n_layers, -1).astype(np.int32)

    @property
    def uniform(self) -> bool:
        """Every layer has the same long-range groups (a list, not a per-layer map): the
        head split is then static, so slices replace gathers and scatters."""
        return bool(self.long_used.all() and (self.long_groups == self.long_groups[:1]).all())

    def static_split(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(tail groups, long groups, tail query heads, long query heads) of a uniform plan."""
        assert self.uniform
        long_g = self.long_groups[0] if self.n_long else np.zeros(0, np.int32)
        tail_g = np.setdiff1d(np.arange(self.n_groups), long_g).astype(np.int32)
        heads = lambda g: (g[:, None] * self.group_size + np.arange(self.group_size)).reshape(-1)
        return tail_g, long_g.astype(np.int32), heads(tail_g), heads(long_g)


@functools.lru_cache(maxsize=32)
def role_plan(cfg: Config) -> RolePlan:
    L, G = cfg.model.n_layers, cfg.model.n_kv_heads
    per_layer = long_heads_by_layer(cfg)
    n_long = max((len(g) for g in per_layer), default=0)
    long_groups = np.zeros((L, n_long), np.int32)
    long_used = np.zeros((L, n_long), bool)
    for layer, groups in enumerate(per_layer):
        long_groups[layer, : len(groups)] = groups
        long_used[layer, : len(groups)] = True
    long_layers = tuple(sorted(cfg.segment.long_layers))
    is_long = np.zeros(L, bool)
    is_long[list(long_layers)] = True
    slot = np.zeros(L, np.int32)
    for i, layer in enumerate(long_layers):
        slot[layer] = i
    roles = slot_roles(cfg)
    return RolePlan(L, G, cfg.model.group_size, long_layers, n_long, long_groups, long_used, is_long, slot,
                    roles["local"], roles["long"], roles["long_elsewhere"])


def describe(cfg: Config) -> str:
    """The segment settings and the role of every head, in a few lines (printed by convert
    and calibrate, so that a reader sees which heads keep a tail)."""
    s = cfg.segment
    roles = role_plan(cfg).roles
    L, G = roles.shape
    per_layer = {layer: list(groups) for layer, groups in enumerate(long_heads_by_layer(cfg)) if groups}
    if isinstance(s.long_heads, Mapping):
        heads = f"segment.long_heads (per layer): {per_layer if per_layer else '{}'}"
    else:
        heads = f"segment.long_heads (a list, the same groups in every layer): {list(s.long_heads)}"
    names = [name for name in ROLES if (roles == name).any()]
    counts = ", ".join(f"{int((roles == name).sum())} {name}" for name in names)
    blind = [name for name in names if not ROLES[name].sees]  # roles that see nothing before their segment
    blind_layers = len({int(layer) for layer in np.nonzero(np.isin(roles, blind))[0]})
    lines = [f"segment: S {s.len}, M {s.tail}, R {s.retrieval.budget} ({s.retrieval.policy}), sinks {s.sinks}, "
             f"K {s.grad_horizon}, long-range layers {list(s.long_layers)}", heads,
             f"roles of the {L * G} (layer, KV group) pairs: {counts}"
             + (f" ({' and '.join(blind)} heads, in {blind_layers} layers, see nothing before their own segment)"
                if blind else "")]
    return "\n".join(lines)
