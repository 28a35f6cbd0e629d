"""Attention masks: who sees whom, for every attention backend.

Visibility is computed from positions, not indices: every query and key carries a document
id and a time. A key is visible to a query iff both belong to the same document and the
key's time is not after the query's. Prefix keys (tail, sinks, retrieved) take time -1, so
every query of their document sees them; an invalid prefix entry takes document -1, which
no query has. This stays right when the query length differs from the key length.

A mask's static `kind` promises a structure that fused kernels can use:
  "causal"         plain causal self-attention of one document (keys = the queries' tokens);
  "prefix_causal"  keys = [prefix, segment] of one document whose valid prefix entries end
                   the prefix (the invalid ones, doc -1, come first);
  "prefix_packed"  keys = [prefix of P >= 0 entries at time -1, the queries' own tokens at
                   times 0..Tq-1] of packed rows, where each document's queries form one run
                   (`document_runs` numbers them so) and a prefix entry belongs to the first
                   query's document or to none (id -1): a document that began in an earlier
                   segment is always the segment's first; the two kinds above are special
                   cases of it;
  "general"        no promise (the chunked `refresh` attention, decoding).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    q_doc: Int[Array, "B Tq"]
    q_time: Int[Array, "B Tq"]
    k_doc: Int[Array, "B Tk"]
    k_time: Int[Array, "B Tk"]
    # Static promise about the structure (see the module docstring): "general", "causal",
    # "prefix_causal" or "prefix_packed". Backends that build the dense mask ignore it.
    kind: str = dataclasses.field(default="general", metadata=dict(static=True))

    def dense(self) -> Bool[Array, "B 1 Tq Tk"]:
        same_doc = self.q_doc[:, :, None] == self.k_doc[:, None, :]
        not_future = self.k_time[:, None, :] <= self.q_time[:, :, None]
        return (same_doc & not_future)[:, None]

    @staticmethod
    def causal(doc: Int[Array, "B T"], plain: bool = False) -> AttentionMask:
        """Causal within documents; `plain` promises a single document per row."""
        time = jnp.broadcast_to(jnp.arange(doc.shape[1], dtype=jnp.int32), doc.shape)
        return AttentionMask(doc, time, doc, time, kind="causal" if plain else "prefix_packed")
