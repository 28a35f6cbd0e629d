"""Head roles: which KV group of which layer is `tail`, `retrieval` or `segment`.

Every (layer, KV group) is `tail` unless the group is a long-range head of that layer;
a long-range head is `retrieval` in a long-range layer and `segment` elsewhere. The plan
is static (numpy), built once from the config, and padded so that every layer has the
same number of long-range slots (`n_long`) for the scan over layers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import numpy as np

from .config import Config, long_heads_by_layer

TAIL, RETRIEVAL, SEGMENT = 0, 1, 2


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

    @property
    def roles(self) -> np.ndarray:
        """[L, G] role of every KV group (TAIL / RETRIEVAL / SEGMENT)."""
        roles = np.full((self.n_layers, self.n_groups), TAIL, np.int32)
        for layer in range(self.n_layers):
            role = RETRIEVAL if self.is_long_layer[layer] else SEGMENT
            for slot in range(self.n_long):
                if self.long_used[layer, slot]:
                    roles[layer, self.long_groups[layer, slot]] = role
        return roles

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
    return RolePlan(L, G, cfg.model.group_size, long_layers, n_long, long_groups, long_used, is_long, slot)


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
    n_tail, n_ret, n_seg = (int((roles == r).sum()) for r in (TAIL, RETRIEVAL, SEGMENT))
    seg_layers = len({int(layer) for layer in np.nonzero(roles == SEGMENT)[0]})
    lines = [f"segment: S {s.len}, M {s.tail}, R {s.retrieval.budget} ({s.retrieval.policy}), sinks {s.sinks}, "
             f"K {s.grad_horizon}, long-range layers {list(s.long_layers)}", heads,
             f"roles of the {L * G} (layer, KV group) pairs: {n_tail} tail, {n_ret} retrieval, {n_seg} segment-only"
             + (f" (in {seg_layers} layers: no tail, nothing before their own segment)" if n_seg else "")]
    return "\n".join(lines)
