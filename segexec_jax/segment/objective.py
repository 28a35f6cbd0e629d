"""The training objective L_K and its exact gradient (SPEC §3).

L_K = sum_i l_i(θ; C~_{i-1}, R_{i-1}) / (number of predicted tokens), where the tail chain
C~_j = Φ(x_j, C~_{j-1}, R_{j-1}) is cut (stop-gradient) K segments before each loss term.
Values do not depend on K; gradients do.

The gradient is a `jax.custom_vjp` over the whole objective:
  forward   a scan over segments that sums the losses and keeps only each segment's
            incoming tail, sinks and retrieval selection, plus the final pool once
            (memory O(T), never a copy of the pool per step);
  backward  a reverse scan. At segment i, one `jax.vjp` of Φ_i w.r.t. (θ, C_{i-1}) at the
            saved inputs; its pullback is called with (dl_i, incoming tail cotangent) for
            the θ part, and with (dl_i, 0) — plus (0, stream) for deeper streams when
            K >= 2 — for the C_{i-1} part that flows one segment further back.
`grad_horizon: chain` keeps both parts of a single call; K = 0 skips the C part.

Forward mode (`jax.jvp`, `jax.jacfwd`) gives the derivative that `jax.grad` defines: the
tangent is <grad L_K, v>, computed through the same custom VJP (a `jax.custom_jvp` around
it; reverse mode transposes that dot product, so `jax.grad` costs what it did).

`forward` carries gradient through the tail chain only (the pool, sinks and retrieved
entries are stop-gradient in the scan), so any objective built on its logits has the
gradient of `grad_horizon: chain`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ..config import Config, ConfigError
from ..model.sharding import gather_fsdp
from ..model.transformer import Transformer, bind, compute_params, logical_axes
from .forward import check_inputs, full_hidden
from .operator import (
    Saved,
    chunk_source,
    document_runs,
    document_starts,
    geometry,
    pad_to_segments,
    retrieve,
    scan_segments,
    segment_forward,
)


def targets_and_weights(tokens: Int[Array, "B T"], doc: Int[Array, "B T"], loss_mask=None):
    """Position t predicts token t+1; it counts iff loss_mask[t], both tokens are of the same
    document, and that document is not padding (0)."""
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    same_doc = jnp.concatenate([doc[:, 1:] == doc[:, :-1], jnp.zeros_like(doc[:, :1], bool)], axis=1)
    weights = (same_doc & (doc != 0)).astype(jnp.float32)
    if loss_mask is not None:
        weights = weights * loss_mask.astype(jnp.float32)
    return targets, weights


def token_count(tokens: Int[Array, "B T"], doc_ids=None, loss_mask=None) -> Array:
    """How many predictions `loss` averages over (its denominator)."""
    doc = jnp.ones(tokens.shape, jnp.int32) if doc_ids is None else jnp.asarray(doc_ids)
    return targets_and_weights(tokens, doc, loss_mask)[1].sum()


def token_cross_entropy(logits: Float[Array, "B T V"], targets: Int[Array, "B T"]):
    """(the logits in float32 or wider, their log-sum-exp, each position's loss lse - picked)."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return logits, lse, lse - picked


def cross_entropy_sum(logits: Float[Array, "B T V"], targets: Int[Array, "B T"], weights) -> Array:
    logits, _, per_token = token_cross_entropy(logits, targets)
    return jnp.sum(per_token * weights.astype(logits.dtype))


def chunked_cross_entropy_sum(model: Transformer, x, targets, weights, chunk: int) -> Array:
    """Sum of weighted token losses, `chunk` positions at a time: never [B, T, V] logits at once.

    Differentiated, each chunk's logits are computed once. The derivative of the sum w.r.t.
    the logits is known in the forward pass (w · (softmax - onehot)), so the pass that computes
    a chunk's loss also pulls it back through the final norm and unembedding; what is kept is
    the gradient w.r.t. x (the size of x, which a rematerialising backward keeps anyway) and
    the unembedding's gradient, summed over chunks. The derivative is then this gradient dotted
    with the tangents (forward mode) or scaled by the cotangent (reverse mode): three products
    over the vocabulary instead of a rematerialised chunk's four.
    """
    return _head_loss(model.head(), chunk, model.head_params(), x, targets, weights)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _head_loss(head, chunk: int, head_params: dict, x, targets, weights) -> Array:
    return _head_pass(head, chunk, head_params, x, targets, weights, grads=False)[0]


@_head_loss.defjvp
def _head_loss_jvp(head, chunk: int, primals, tangents):
    head_params, x, targets, weights = primals
    d_head, dx, _, dw = tangents
    total, per_token, g_head, gx = _head_pass(head, chunk, head_params, x, targets, weights, grads=True)
    dot = lambda g, t: jnp.sum(g.astype(total.dtype) * t.astype(total.dtype))
    tangent = dot(gx, dx) + dot(per_token, dw)
    for g, t in zip(jax.tree.leaves(g_head), jax.tree.leaves(d_head)):
        tangent = tangent + dot(g, t)
    return total, tangent


def _head_pass(head, chunk: int, head_params: dict, x, targets, weights, grads: bool):
    """A scan over chunks of positions: the weighted loss sum; with `grads`, also every
    position's loss, and the sum's gradients w.r.t. the head's parameters and x."""
    B, T, d = x.shape
    pad = -T % chunk
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        targets, weights = (jnp.pad(a, ((0, 0), (0, pad))) for a in (targets, weights))
    n = x.shape[1] // chunk
    split = lambda a: jnp.swapaxes(a.reshape((B, n, chunk) + a.shape[2:]), 0, 1)
    join = lambda a: jnp.swapaxes(a, 0, 1).reshape((B, n * chunk) + a.shape[3:])[:, :T]
    acc = jnp.promote_types(x.dtype, jnp.float32)
    wide = lambda a: jnp.zeros(a.shape, jnp.promote_types(a.dtype, jnp.float32))

    def body(carry, inputs):
        total, g_head = carry
        xc, tc, wc = inputs
        if not grads:
            return (total + cross_entropy_sum(head(head_params, xc), tc, wc), g_head), None
        logits, pull = jax.vjp(head, head_params, xc)
        lf, lse, per_token = token_cross_entropy(logits, tc)
        wl = wc.astype(lf.dtype)
        probs = jnp.exp(lf - lse[..., None])
        d_logits = (probs - jax.nn.one_hot(tc, lf.shape[-1], dtype=lf.dtype)) * wl[..., None]
        g_c, gx_c = pull(d_logits.astype(logits.dtype))
        g_head = jax.tree.map(lambda a, b: a + b.astype(a.dtype), g_head, g_c)
        return (total + jnp.sum(per_token * wl).astype(acc), g_head), (gx_c, per_token)

    g0 = jax.tree.map(wide, head_params) if grads else None
    (total, g_head), out = jax.lax.scan(body, (jnp.zeros((), acc), g0), (split(x), split(targets), split(weights)))
    if not grads:
        return (total,)
    gx, per_token = out
    g_head = jax.tree.map(lambda g, p: g.astype(p.dtype), g_head, head_params)
    return total, join(per_token), g_head, join(gx)


def loss(params: dict, cfg: Config, tokens, loss_mask=None, doc_ids=None) -> Array:
    """Token-mean cross entropy of next-token prediction: L_K in segmented mode.

    loss_mask[b, t] weights the prediction made at position t (of token t+1); the last
    position and predictions across a document boundary never count.
    """
    if cfg.attention.mode == "streaming":
        raise ConfigError("config key 'attention.mode': streaming is inference-only; train in "
                          "segmented or full mode (forward and generate accept streaming)")
    tokens, doc, loss_mask = check_inputs(cfg, tokens, doc_ids, loss_mask)
    targets, weights = targets_and_weights(tokens, doc, loss_mask)
    doc = document_runs(doc)
    den = weights.sum()
    den = jnp.where(den > 0, den, 1.0)
    if cfg.attention.mode == "full":
        model = bind(cfg, params)
        x = full_hidden(model, cfg, tokens, doc, single_doc=doc_ids is None)
        return chunked_cross_entropy_sum(model, x, targets, weights, min(cfg.segment.len, tokens.shape[1])) / den
    S = cfg.segment.len
    batch = dict(tokens=pad_to_segments(tokens, S), doc=pad_to_segments(doc, S),
                 targets=pad_to_segments(targets, S), weights=pad_to_segments(weights, S), den=den)
    return segmented_loss(cfg, doc_ids is None, params, batch)


# --------------------------------------------------------------------------- segmented L_K


def _segment_slice(batch: dict, key: str, start, S: int):
    return jax.lax.dynamic_slice_in_dim(batch[key], start, S, axis=1)


def _compute_view(cfg: Config, params: dict) -> dict:
    """The parameters as the segment loop reads them: cast to the compute dtype (exact, the
    model casts at each use anyway) and, with `mesh.fsdp_gather: step`, gathered from their
    FSDP shards once, outside the segment × layer loops (forward and backward alike)."""
    params = compute_params(cfg, params)
    if cfg.mesh.fsdp_gather == "step":
        params = gather_fsdp(params, logical_axes(cfg))
    return params


def _forward(cfg: Config, single_doc: bool, params: dict, batch: dict, save: bool):
    """Losses over the segments; `params` as `_compute_view` gives them."""
    model = bind(cfg, params)
    S = cfg.segment.len

    def emit(x, s):
        start = s * S
        return cross_entropy_sum(model.logits(x), _segment_slice(batch, "targets", start, S),
                                 _segment_slice(batch, "weights", start, S))

    losses, saved, pool = scan_segments(model, cfg, batch["tokens"], batch["doc"], emit, save=save,
                                        single_doc=single_doc)
    return losses.sum() / batch["den"], saved, pool


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def segmented_loss(cfg: Config, single_doc: bool, params: dict, batch: dict) -> Array:
    """L_K: the summed token losses over `batch["den"]`. Its gradient is that of L_K, and
    forward mode gives the same derivative, <grad L_K, v>."""
    return loss_with_vjp(cfg, single_doc, params, batch)


@segmented_loss.defjvp
def _jvp(cfg: Config, single_doc: bool, primals, tangents):
    # grad L_K is not the derivative of L_K's value (the cuts), so forward mode cannot run
    # through the scan: the tangent is the dot product of that gradient with v. Under
    # `jax.grad` the dot product is transposed: the cotangent times the gradient, a product
    # by 1 (L_K is a mean already), so the compiled step does what it did before.
    params, batch = primals
    value, grad = jax.value_and_grad(loss_with_vjp, argnums=2)(cfg, single_doc, params, batch)
    dot = lambda g, t: jnp.sum(g.astype(value.dtype) * t.astype(value.dtype))  # (no dot_general: exact on TPU)
    return value, sum(jax.tree.leaves(jax.tree.map(dot, grad, tangents[0])), jnp.zeros((), value.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def loss_with_vjp(cfg: Config, single_doc: bool, params: dict, batch: dict) -> Array:
    """`segmented_loss` with its reverse-mode rule alone (no forward mode)."""
    return _forward(cfg, single_doc, _compute_view(cfg, params), batch, save=False)[0]


def _fwd(cfg: Config, single_doc: bool, params: dict, batch: dict):
    view = _compute_view(cfg, params)
    value, saved, pool = _forward(cfg, single_doc, view, batch, save=True)
    dtypes = jax.tree.map(lambda p: jnp.zeros((0,), p.dtype), params)  # the gradient's dtypes
    return value, (view, dtypes, batch, saved, pool)


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _bwd(cfg: Config, single_doc: bool, res, g):
    params, dtypes, batch, saved, pool = res  # params: the compute view
    S, M = cfg.segment.len, cfg.segment.tail
    K = cfg.segment.grad_horizon
    n_streams = 1 if K == "chain" else K
    doc = batch["doc"]
    doc_start = document_starts(doc)
    B = doc.shape[0]
    g = g / batch["den"]  # the cotangent of every segment's summed loss

    def segment_loss(p, tail_in, s, sv: Saved):
        """l_s and C_s as functions of (θ, C_{s-1}), everything else held at saved values."""
        model = bind(cfg, p)
        geo = geometry(S, M, s, doc, doc_start)
        ret, _ = retrieve(cfg, pool, None, sv.selection, geo.start, doc, B)
        x, out = segment_forward(model, cfg, _segment_slice(batch, "tokens", geo.start, S), geo,
                                 tail_in, sv.sinks, ret, single_doc, chunks=chunk_source(cfg, pool, geo.start, doc),
                                 chunk_index=sv.chunk_index)
        l = cross_entropy_sum(model.logits(x), _segment_slice(batch, "targets", geo.start, S),
                              _segment_slice(batch, "weights", geo.start, S))
        return l, out.tail

    def body(carry, xs):
        dparams, streams = carry
        s, sv = xs
        (l, tail_out), pullback = jax.vjp(lambda p, c: segment_loss(p, c, s, sv), params, sv.tail)
        zero_tail = jax.tree.map(jnp.zeros_like, tail_out)
        if K == "chain":
            dp, dc = pullback((g, streams[0]))
            streams = (dc,)
        else:
            incoming = functools.reduce(_tree_add, streams) if streams else zero_tail
            dp, _ = pullback((g, incoming))

            def tail_cotangents():
                # Depth 1: l_s reaches C_{s-1}. Depth d+1: l_{s+d} passes through Φ_s.
                deeper = [pullback((jnp.zeros_like(g), c))[1] for c in streams[:-1]]
                return tuple([pullback((g, zero_tail))[1]] + deeper)

            if K > 0:  # segment 0 has no previous segment: skip its activation-only calls
                streams = jax.lax.cond(s > 0, tail_cotangents, lambda: streams)
            else:
                streams = ()
        return (jax.tree.map(lambda a, d: a + d.astype(a.dtype), dparams, dp), streams), None

    # per-segment gradients (in the compute dtype) summed in at least float32
    zero_params = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)
    zero_tail = jax.tree.map(lambda a: jnp.zeros_like(a[0]), saved.tail)
    streams = tuple(zero_tail for _ in range(n_streams))
    N = batch["tokens"].shape[1] // S
    (dparams, _), _ = jax.lax.scan(body, (zero_params, streams), (jnp.arange(N), saved), reverse=True)
    return jax.tree.map(lambda d, t: d.astype(t.dtype), dparams, dtypes), None


loss_with_vjp.defvjp(_fwd, _bwd)


def loss_by_segment(params: dict, cfg: Config, tokens, doc_ids=None, loss_mask=None):
    """Summed token losses and prediction counts per segment index: float32 [N], [N].

    In `full` mode the buckets are the same spans of S tokens, for comparison."""
    tokens, doc, loss_mask = check_inputs(cfg, tokens, doc_ids, loss_mask)
    targets, weights = targets_and_weights(tokens, doc, loss_mask)
    doc = document_runs(doc)
    S = cfg.segment.len
    model = bind(cfg, params)
    targets, weights = pad_to_segments(targets, S), pad_to_segments(weights, S)
    counts = weights.reshape(weights.shape[0], -1, S).sum((0, 2))

    def emit(x, s):
        start = s * S
        return cross_entropy_sum(model.logits(x), jax.lax.dynamic_slice_in_dim(targets, start, S, 1),
                                 jax.lax.dynamic_slice_in_dim(weights, start, S, 1))

    if cfg.attention.mode == "full":
        x = pad_to_segments(full_hidden(model, cfg, tokens, doc, single_doc=doc_ids is None), S)
        sums = jnp.stack([emit(x[:, s * S:(s + 1) * S], s) for s in range(x.shape[1] // S)])
    else:
        sums, _, _ = scan_segments(model, cfg, pad_to_segments(tokens, S), pad_to_segments(doc, S), emit,
                                   single_doc=doc_ids is None)
    return sums, counts
