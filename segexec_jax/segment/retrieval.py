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
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ..config import Config, RetrievalConfig, register_check, require
from ..model import numerics


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Selection:
    """Selected pool entries for every long layer, row and long slot."""

    index: Int[Array, "Ll B Gl R"]  # pool positions; the last `count` are valid
    count: Int[Array, "B"]  # valid entries per row


# ----------------------------------------------------------------------------- policies


@dataclasses.dataclass(frozen=True)
class Policy:
    """A retrieval policy, in one place: everything the segment operator, decoding, the
    slow reference and the config check need. Register one with `register`; the config
    names it (`segment.retrieval.policy`).

    width(rcfg, C)            static number of slots R' for a pool of C entries (0: none)
    pick(rcfg, scores, cand, X, Gl)  the choice: scores [X B Gl C] (None when not
                              `query_dependent`), cand [B C] bool -> Selection with index
                              [X B Gl R'] (ascending, the valid ones last) and count [B] (the
                              same for every head: it may depend on the candidates alone)
    reference(rcfg, cands, score)  the slow, independent rule for one head: candidate pool
                              indices (ascending) and their scores {index: float} (None when
                              not `query_dependent`) -> the chosen indices, ascending
    check(rcfg, S)            a problem with the settings, (config key, message), or None
    """

    name: str
    width: Callable[[RetrievalConfig, int], int]
    pick: Callable[..., Selection]
    reference: Callable[[RetrievalConfig, list[int], dict[int, float] | None], list[int]]
    query_dependent: bool = True
    check: Callable[[RetrievalConfig, int], tuple[str, str] | None] = lambda rcfg, S: None


POLICIES: dict[str, Policy] = {}


def register(policy: Policy) -> Policy:
    """Make `policy` available to configs by its name (a later one replaces an earlier)."""
    POLICIES[policy.name] = policy
    return policy


def policy_of(rcfg: RetrievalConfig) -> Policy:
    try:
        return POLICIES[rcfg.policy]
    except KeyError:
        raise ValueError(f"unknown retrieval policy {rcfg.policy!r} (known: {', '.join(sorted(POLICIES))})") from None


def width(rcfg: RetrievalConfig, capacity: int) -> int:
    """Static number of retrieved slots R' for a pool of `capacity` entries."""
    return policy_of(rcfg).width(rcfg, capacity)


def retrieves(rcfg: RetrievalConfig) -> bool:
    """Whether the policy ever selects anything (a pool is kept only then)."""
    return width(rcfg, 1 << 30) > 0


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
    return _select(rcfg, "lbgd,lbcgd->lbgc", query, pool_k, candidate)


def select_for_queries(rcfg: RetrievalConfig, pool_k: Float[Array, "B C Gl D"], queries: Float[Array, "Q B Gl D"],
                       candidate: Bool[Array, "B C"]) -> Selection:
    """`select` for Q queries against one layer's pool (the `refresh` chunks of a segment);
    the leading axis of the result's index is the query's."""
    return _select(rcfg, "qbgd,bcgd->qbgc", queries, pool_k, candidate)


def _select(rcfg: RetrievalConfig, scoring: str, query, pool_k, candidate) -> Selection:
    """The policy's pick for X queries [X B Gl D], scored against the pool by `scoring`."""
    policy = policy_of(rcfg)
    X, Gl = query.shape[0], query.shape[2]
    if not policy.query_dependent:
        return policy.pick(rcfg, None, candidate, X, Gl)
    work = jnp.promote_types(pool_k.dtype, jnp.float32)
    return policy.pick(rcfg, numerics.einsum(scoring, query.astype(work), pool_k.astype(work)), candidate, X, Gl)


# The four policies of SPEC §2.


def _pick_topk(rcfg, scores, candidate, X, Gl) -> Selection:
    C = candidate.shape[-1]
    n_cand = candidate.sum(-1).astype(jnp.int32)
    k = width(rcfg, C)
    scores = jnp.where(candidate[None, :, None], scores, -jnp.inf)
    _, index = jax.lax.top_k(scores, k)
    valid = jnp.take_along_axis(jnp.broadcast_to(candidate[None, :, None], scores.shape), index, -1)
    return Selection(_valid_last(index, valid, C), jnp.minimum(n_cand, k))


def _reference_topk(rcfg, cands, score):
    return sorted(sorted(cands, key=lambda a: (-score[a], a))[: rcfg.budget])


def _pick_topk_block(rcfg, scores, candidate, X, Gl) -> Selection:
    B, C = candidate.shape
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


def _reference_topk_block(rcfg, cands, score):
    bs, cand = rcfg.block_size, set(cands)
    blocks = [b for b in range((max(cands) + 1) // bs) if all(a in cand for a in range(b * bs, (b + 1) * bs))]
    best = {b: max(score[a] for a in range(b * bs, (b + 1) * bs)) for b in blocks}
    ranked = sorted(blocks, key=lambda b: (-best[b], b))[: rcfg.budget // bs]
    return [a for b in sorted(ranked) for a in range(b * bs, (b + 1) * bs)]


def _check_topk_block(rcfg, S):
    if S % rcfg.block_size:
        return "segment.retrieval.block_size", f"must divide segment.len ({S}), got {rcfg.block_size}"
    if rcfg.budget % rcfg.block_size:
        return ("segment.retrieval.budget",
                f"must be a multiple of segment.retrieval.block_size ({rcfg.block_size}), got {rcfg.budget}")
    return None


def _pick_all(rcfg, scores, candidate, X, Gl) -> Selection:
    B, C = candidate.shape
    row = _valid_last(jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (B, C)), candidate, C)
    return Selection(jnp.broadcast_to(row[None, :, None], (X, B, Gl, C)), candidate.sum(-1).astype(jnp.int32))


def _pick_none(rcfg, scores, candidate, X, Gl) -> Selection:
    B = candidate.shape[0]
    return Selection(jnp.zeros((X, B, Gl, 0), jnp.int32), jnp.zeros((B,), jnp.int32))


register(Policy("topk", lambda r, C: min(r.budget, C), _pick_topk, _reference_topk))
register(Policy("topk_block", lambda r, C: min(r.budget // r.block_size, C // r.block_size) * r.block_size,
                _pick_topk_block, _reference_topk_block, check=_check_topk_block))
register(Policy("all", lambda r, C: C, _pick_all, lambda r, cands, score: list(cands), query_dependent=False))
register(Policy("none", lambda r, C: 0, _pick_none, lambda r, cands, score: [], query_dependent=False))


def gather(pool: Float[Array, "Ll B C Gl D"], sel: Selection) -> Float[Array, "Ll B R Gl D"]:
    idx = jnp.swapaxes(sel.index, 2, 3)[..., None]  # [Ll B R Gl 1]
    return jnp.take_along_axis(pool, idx, axis=2)


def gather_for_queries(pool: Float[Array, "B C Gl D"], index: Int[Array, "Q B Gl R"]) -> Float[Array, "B Q R Gl D"]:
    """One layer's entries picked by `select_for_queries`."""
    idx = jnp.moveaxis(jnp.swapaxes(index, 2, 3), 0, 1)[..., None]  # [B Q R Gl 1]
    return jnp.take_along_axis(pool[:, None], idx, axis=2)


@register_check
def _check_policy(cfg: Config) -> None:
    r, S = cfg.segment.retrieval, cfg.segment.len
    require(r.policy in POLICIES, "segment.retrieval.policy",
            f"unknown policy {r.policy!r} (registered: {', '.join(sorted(POLICIES))})")
    problem = POLICIES[r.policy].check(r, S)
    if problem:
        require(False, *problem)
    if r.refresh is not None:
        require(POLICIES[r.policy].query_dependent, "segment.retrieval.refresh",
                f"needs a query-dependent policy (e.g. topk or topk_block); policy {r.policy!r} selects "
                "the same entries for every query")
