"""Retrieval policies: which pool entries a long-range head sees before a segment.

A policy is a pure function of the pool keys, the retrieval query and the candidates
(entries of the query's document written before the current segment). It returns the
selected pool indices, in original order, with the valid ones last: the number of valid
entries is the same for every layer and head of a row (it depends only on how many
candidates the row has), so validity and positions are per row, and the valid entries
sit right in front of the segment (which fused causal kernels rely on).

The default query (SPEC §2): the mean of the pre-RoPE queries of the last `query_window`
tokens of the previous segment, averaged over the query heads of the group. Scores are
dot products with the pool's pre-RoPE keys. With `refresh: r` the same rule also runs
inside a segment, before every chunk of r tokens, with the window before that chunk.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from . import numerics
from .config import RetrievalConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Selection:
    """Selected pool entries for every long layer, row and long slot."""

    index: Int[Array, "Ll B Gl R"]  # pool positions; the last `count` are valid
    count: Int[Array, "B"]  # valid entries per row


def width(rcfg: RetrievalConfig, capacity: int) -> int:
    """Static number of retrieved slots R' for a pool of `capacity` entries."""
    if rcfg.policy == "none":
        return 0
    if rcfg.policy == "all":
        return capacity
    if rcfg.policy == "topk_block":
        return min(rcfg.budget // rcfg.block_size, capacity // rcfg.block_size) * rcfg.block_size
    return min(rcfg.budget, capacity)


def _valid_last(index: Int[Array, "... K"], valid: Bool[Array, "... K"], capacity: int):
    """Sort indices ascending with the invalid ones moved in front of every valid one."""
    key = jnp.where(valid, index + capacity, index)
    return jnp.sort(key, axis=-1) % capacity


def select(
    rcfg: RetrievalConfig,
    pool_k: Float[Array, "Ll B C Gl D"],
    query: Float[Array, "Ll B Gl D"],
    candidate: Bool[Array, "B C"],
) -> Selection:
    """Pick up to R' entries per (layer, row, slot) among `candidate` pool entries."""
    Ll, B, C, Gl, D = pool_k.shape
    if rcfg.policy == "all":
        n_cand = candidate.sum(-1).astype(jnp.int32)
        row = _valid_last(jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (B, C)), candidate, C)
        return Selection(jnp.broadcast_to(row[None, :, None], (Ll, B, Gl, C)), n_cand)
    work = jnp.promote_types(pool_k.dtype, jnp.float32)
    return _pick(rcfg, numerics.einsum("lbgd,lbcgd->lbgc", query.astype(work), pool_k.astype(work)), candidate)


def select_for_queries(
    rcfg: RetrievalConfig,
    pool_k: Float[Array, "B C Gl D"],
    queries: Float[Array, "Q B Gl D"],
    candidate: Bool[Array, "B C"],
) -> Selection:
    """`select` for Q queries against one layer's pool (the `refresh` chunks of a segment);
    the leading axis of the result's index is the query's."""
    work = jnp.promote_types(pool_k.dtype, jnp.float32)
    return _pick(rcfg, numerics.einsum("qbgd,bcgd->qbgc", queries.astype(work), pool_k.astype(work)), candidate)


def _pick(rcfg: RetrievalConfig, scores: Float[Array, "X B Gl C"], candidate: Bool[Array, "B C"]) -> Selection:
    """The policy's choice from scores of every pool entry (X: layers or queries)."""
    X, B, Gl, C = scores.shape
    n_cand = candidate.sum(-1).astype(jnp.int32)
    if rcfg.policy == "topk":
        k = width(rcfg, C)
        scores = jnp.where(candidate[None, :, None], scores, -jnp.inf)
        _, index = jax.lax.top_k(scores, k)
        valid = jnp.take_along_axis(jnp.broadcast_to(candidate[None, :, None], scores.shape), index, -1)
        return Selection(_valid_last(index, valid, C), jnp.minimum(n_cand, k))
    if rcfg.policy == "topk_block":
        bs = rcfg.block_size
        nb = C // bs
        k = width(rcfg, C) // bs
        # Only whole blocks of candidates compete, so validity stays per row.
        block_ok = candidate[:, : nb * bs].reshape(B, nb, bs).all(-1)
        block_scores = scores[..., : nb * bs].reshape(X, B, Gl, nb, bs).max(-1)
        block_scores = jnp.where(block_ok[None, :, None], block_scores, -jnp.inf)
        _, blocks = jax.lax.top_k(block_scores, k)
        valid = jnp.take_along_axis(jnp.broadcast_to(block_ok[None, :, None], block_scores.shape), blocks, -1)
        blocks = _valid_last(blocks, valid, nb)
        index = (blocks[..., None] * bs + jnp.arange(bs, dtype=jnp.int32)).reshape(X, B, Gl, k * bs)
        n_blocks = jnp.minimum(block_ok.sum(-1).astype(jnp.int32), k)
        return Selection(index.astype(jnp.int32), n_blocks * bs)
    raise ValueError(f"unknown retrieval policy {rcfg.policy!r}")


def gather(pool: Float[Array, "Ll B C Gl D"], sel: Selection) -> Float[Array, "Ll B R Gl D"]:
    idx = jnp.swapaxes(sel.index, 2, 3)[..., None]  # [Ll B R Gl 1]
    return jnp.take_along_axis(pool, idx, axis=2)


def gather_for_queries(pool: Float[Array, "B C Gl D"], index: Int[Array, "Q B Gl R"]) -> Float[Array, "B Q R Gl D"]:
    """One layer's entries picked by `select_for_queries`."""
    idx = jnp.moveaxis(jnp.swapaxes(index, 2, 3), 0, 1)[..., None]  # [B Q R Gl 1]
    return jnp.take_along_axis(pool[:, None], idx, axis=2)
