"""Slow, obviously-right references for the tests (numpy float64 and plain unrolling).

`reference_forward` recomputes the model layer by layer over the whole row and, for every
query token and KV group, lists the keys it may see by its role's slow rule
(`roles.Role.reference`, SPEC §2's table; with their window positions), then attends over
that list. It shares no code with the fast path but the config's role assignment
(`roles.role_plan`).

`unrolled_loss` builds L_K by brute force: for every segment i it re-runs the tail chain
from the cut b = i-1-K with stop-gradient at C_b, so `jax.grad` of it is the gradient of
L_K by definition. It reuses the segment function Φ (checked separately by
`reference_forward`) and checks the custom-VJP assembly of the objective. With `refresh`,
Φ selects its chunks' entries afresh in every unrolled call, where the objective's
backward replays the forward's selections.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..config import Config
from . import retrieval
from .roles import role_plan

# --------------------------------------------------------------------------- per-token forward


def _rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x, pos, theta):
    """x [..., D] rotated to integer position `pos` (halves convention)."""
    D = x.shape[-1]
    inv = theta ** (-np.arange(0, D, 2, dtype=np.float64) / D)
    ang = pos * inv
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def _doc_start(doc_row, t):
    s = t
    while s > 0 and doc_row[s - 1] == doc_row[t]:
        s -= 1
    return s


def _retrieve(cfg: Config, q_row, k_row, doc_row, seg_start, chunk_start, g):
    """Pool indices for KV group g and the queries from `chunk_start` on, in the segment
    starting at `seg_start`: candidates are the earlier segments' tokens of the document
    before the segment; the query is the window that ends right before `chunk_start`
    (the segment start, or with `refresh` the start of the query's chunk)."""
    r = cfg.segment.retrieval
    S = cfg.segment.len
    prev_doc = doc_row[seg_start - 1]
    cands = [a for a in range(seg_start) if doc_row[a] == prev_doc]
    policy = retrieval.policy_of(r)
    if not cands or not policy.query_dependent:
        return policy.reference(r, cands, None) if cands else []
    w = min(r.query_window, S)
    win_doc = doc_row[chunk_start - 1]
    win = [t for t in range(chunk_start - w, chunk_start) if doc_row[t] == win_doc]
    rsz = cfg.model.group_size
    query = q_row[win][:, g * rsz:(g + 1) * rsz].mean(axis=(0, 1))  # pre-RoPE
    score = {a: float(k_row[a, g] @ query) for a in cands}
    return policy.reference(r, cands, score)


@dataclasses.dataclass(frozen=True)
class PrefixQuery:
    """What a role's slow rule (`roles.Role.reference`) reads for query token t of a
    document that began before its segment: the parts of SPEC §2's prefixes, as lists of
    token indices."""

    cfg: Config
    t: int
    seg_start: int
    doc_start: int
    doc_row: np.ndarray
    retrieved_at: Callable[[int, int], list[int]]  # (segment start, chunk start) -> pool indices

    def sinks(self) -> list[int]:
        """The document's first n tokens, those before the previous segment's last M."""
        s = self.cfg.segment
        return [a for a in range(self.doc_start, self.doc_start + s.sinks) if a < self.seg_start - s.tail]

    def tail(self) -> list[int]:
        """The previous segment's last M tokens of the query's document."""
        M = self.cfg.segment.tail
        return [a for a in range(self.seg_start - M, self.seg_start) if self.doc_row[a] == self.doc_row[self.t]]

    def retrieved(self) -> list[int]:
        """The pool entries retrieved for the query's chunk (with `refresh`) or segment."""
        r = self.cfg.segment.retrieval.refresh or self.cfg.segment.len
        return self.retrieved_at(self.seg_start, self.seg_start + (self.t - self.seg_start) // r * r)


def visible_keys(cfg: Config, layer: int, g: int, t: int, doc_row, retrieved) -> tuple[list, list, int]:
    """(key indices, their positions, query position) for query token t, group g (SPEC §2).

    `retrieved(seg_start, chunk_start)` gives the retrieved entries for this layer and group.
    """
    S = cfg.segment.len
    d0 = _doc_start(doc_row, t)
    if cfg.attention.mode == "full":
        keys = list(range(d0, t + 1))
        return keys, [a - d0 for a in keys], t - d0
    if cfg.attention.mode == "streaming":  # StreamingLLM: positions are cache slots
        n, W = cfg.inference.stream_sinks, cfg.inference.stream_window
        rel = t - d0
        sinks = list(range(min(n, rel + 1)))
        start = max(n, rel - W + 1)
        window = list(range(start, rel + 1))
        positions = list(range(len(sinks))) + [len(sinks) + u - start for u in window]
        return [d0 + u for u in sinks + window], positions, positions[-1]
    seg_start = (t // S) * S
    lo = max(seg_start, d0)
    prefix: list[int] = []
    if d0 < seg_start:  # a document that began in this segment sees only itself, whatever the role
        prefix = role_plan(cfg).role_at(layer, g).reference(PrefixQuery(cfg, t, seg_start, d0, doc_row, retrieved))
    P = len(prefix)
    keys = prefix + list(range(lo, t + 1))
    positions = list(range(P)) + [P + a - lo for a in range(lo, t + 1)]
    return keys, positions, P + t - lo


def reference_forward(params: dict, cfg: Config, tokens, doc_ids=None) -> np.ndarray:
    """Logits [B, T, V] in float64, one query token at a time."""
    m = cfg.model
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    doc = np.ones((B, T), np.int64) if doc_ids is None else np.asarray(doc_ids)
    H, G, D, rsz = m.n_heads, m.n_kv_heads, m.dim_head, m.group_size
    x = p["embed"][tokens]
    for layer in range(m.n_layers):
        blk = jax.tree.map(lambda a: a[layer], p["blocks"])
        h = _rms(x, blk["attn_norm"]["scale"], m.norm_eps)
        q = np.einsum("btd,dhk->bthk", h, blk["wq"])
        k = np.einsum("btd,dgk->btgk", h, blk["wk"])
        v = np.einsum("btd,dgk->btgk", h, blk["wv"])
        o = np.zeros_like(q)
        for b in range(B):
            for g in range(G):
                cache: dict = {}

                def retrieved(seg_start, chunk_start):
                    if chunk_start not in cache:
                        cache[chunk_start] = _retrieve(cfg, q[b], k[b], doc[b], seg_start, chunk_start, g)
                    return cache[chunk_start]

                for t in range(T):
                    keys, kpos, qpos = visible_keys(cfg, layer, g, t, doc[b], retrieved)
                    kr = np.stack([_rope(k[b, a, g], pa, m.rope_theta) for a, pa in zip(keys, kpos)])
                    vv = np.stack([v[b, a, g] for a in keys])
                    for hh in range(g * rsz, (g + 1) * rsz):
                        s = kr @ _rope(q[b, t, hh], qpos, m.rope_theta) / np.sqrt(D)
                        w = np.exp(s - s.max())
                        o[b, t, hh] = (w / w.sum()) @ vv
        x = x + np.einsum("bthk,hkd->btd", o, blk["wo"])
        h = _rms(x, blk["mlp_norm"]["scale"], m.norm_eps)
        gate, up = h @ blk["w_gate"], h @ blk["w_up"]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ blk["w_down"]
    h = _rms(x, p["final_norm"]["scale"], m.norm_eps)
    return h @ (p["embed"].T if m.tie_embeddings else p["unembed"])


# --------------------------------------------------------------------------- brute-force L_K


def unrolled_loss(params: dict, cfg: Config, tokens, loss_mask=None, doc_ids=None):
    """L_K by explicit unrolling with stop-gradient at every loss term's cut."""
    from ..model.transformer import bind
    from . import operator as op
    from .forward import check_inputs
    from .objective import cross_entropy_sum, targets_and_weights

    S, M, K = cfg.segment.len, cfg.segment.tail, cfg.segment.grad_horizon
    tokens, doc, loss_mask = check_inputs(cfg, tokens, doc_ids, loss_mask)
    targets, weights = targets_and_weights(tokens, doc, loss_mask)
    doc = op.document_runs(doc)
    den = weights.sum()
    tokens, doc, targets, weights = (op.pad_to_segments(a, S) for a in (tokens, doc, targets, weights))
    B, T = tokens.shape
    N = T // S
    doc_start = op.document_starts(doc)

    # Stop-gradient pass: the tails C_j, sinks and retrieval selections of every segment.
    frozen = jax.lax.stop_gradient(params)
    single_doc = doc_ids is None
    _, saved, pool = op.scan_segments(bind(cfg, frozen), cfg, tokens, doc, lambda x, s: 0.0, save=True,
                                   single_doc=single_doc)
    at = lambda tree, i: jax.tree.map(lambda a: a[i], tree)

    def phi(p, i, tail_in):
        model = bind(cfg, p)
        geo = op.geometry(S, M, jnp.int32(i), doc, doc_start)
        sv = at(saved, i)
        ret, _ = op.retrieve(cfg, pool, None, sv.selection, geo.start, doc, B)
        x, out = op.segment_forward(model, cfg, tokens[:, i * S:(i + 1) * S], geo, tail_in, sv.sinks, ret,
                                    single_doc, chunks=op.chunk_source(cfg, pool, geo.start, doc))
        l = cross_entropy_sum(model.logits(x), targets[:, i * S:(i + 1) * S], weights[:, i * S:(i + 1) * S])
        return l, out.tail

    total = 0.0
    for i in range(N):
        cut = -1 if K == "chain" else max(i - 1 - K, -1)  # C_{cut} is held fixed (C_{-1}: empty)
        tail = at(saved.tail, cut + 1)  # saved.tail[j] is C_{j-1}, the input of segment j
        for j in range(cut + 1, i):
            tail = phi(params, j, tail)[1]
        total = total + phi(params, i, tail)[0]
    return total / jnp.where(den > 0, den, 1.0)
