"""Forward passes: full causal attention and the segmented scan, behind one `forward`.

Document ids (int32 [B, T], >= 1 for real tokens, 0 for padding) separate packed
documents: no token ever sees another document, and positions count from each
document's own first token, so a packed document is computed exactly as it would be alone.
Rows that break the packing rule (left padding, another packer's rows) are computed
exactly too, by the same operator (SPEC §2's visible sets), though a document that begins
inside a segment is then not segmented as it would be alone.

Gradients: in segmented mode only the tail chain carries gradient from one segment to the
next (the pool, sinks and retrieved entries are stop-gradient), so any objective written
on these logits has the gradient of `loss` with `segment.grad_horizon: chain`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ..config import Config
from ..model.attention import AttentionMask, attend, resolve_backend
from ..model.rope import apply_rope, model_frequencies
from ..model.transformer import (
    Transformer,
    apply_layer,
    bind,
    remat_policy,
    scan_layers,
)
from .operator import document_runs, document_starts, pad_to_segments, scan_segments


def _concrete(x) -> np.ndarray | None:
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_inputs(cfg: Config, tokens, doc_ids=None, loss_mask=None):
    """Validate shapes, dtypes and (when concrete) values; return int32 tokens and doc ids.

    Any layout of document ids is valid (equal ids in one run are one document)."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be a [batch, length] array, got shape {tokens.shape}")
    if tokens.shape[1] == 0 or tokens.shape[0] == 0:
        raise ValueError(f"tokens must not be empty, got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integers, got {tokens.dtype}")
    values = _concrete(tokens)
    V = cfg.model.vocab_size
    if values is not None and (values.min() < 0 or values.max() >= V):
        raise ValueError(f"token ids must lie in [0, model.vocab_size={V}), got [{values.min()}, {values.max()}]")
    if doc_ids is None:
        doc = jnp.ones(tokens.shape, jnp.int32)
    else:
        doc = jnp.asarray(doc_ids)
        if doc.shape != tokens.shape or not jnp.issubdtype(doc.dtype, jnp.integer):
            raise ValueError(f"doc_ids must be integers shaped like tokens {tokens.shape}, got {doc.dtype}{doc.shape}")
        d = _concrete(doc)
        if d is not None and d.min() < 0:
            raise ValueError("doc_ids must be >= 0 (0 marks padding)")
    if loss_mask is not None:
        loss_mask = jnp.asarray(loss_mask)
        if loss_mask.shape != tokens.shape:
            raise ValueError(f"loss_mask must be shaped like tokens {tokens.shape}, got {loss_mask.shape}")
    return tokens.astype(jnp.int32), doc.astype(jnp.int32), loss_mask


def full_hidden(model: Transformer, cfg: Config, tokens: Int[Array, "B T"], doc: Int[Array, "B T"],
                single_doc: bool, keep_kv: bool = False):
    """Causal attention over everything (within documents); final hidden states, and with
    `keep_kv` every layer's RoPE-rotated keys and values [L B T G D] (a KV cache)."""
    pos = jnp.arange(tokens.shape[1], dtype=jnp.int32) - document_starts(doc)
    mask = AttentionMask.causal(doc, plain=single_doc)
    backend = resolve_backend(cfg.attention.backend, cfg.model.dtype)
    inv_freq = model_frequencies(cfg.model)

    def layer_fn(block, x, _):
        def mix(q, k, v):
            k = apply_rope(k, pos, inv_freq)
            return attend(apply_rope(q, pos, inv_freq), k, v, mask, backend), (k, v) if keep_kv else None

        return apply_layer(block, x, mix)

    x, kv = scan_layers(model, model.embed_tokens(tokens), None, layer_fn, remat_policy(cfg, cfg.model.remat))
    return (x, kv) if keep_kv else x


def forward(params: dict, cfg: Config, tokens, doc_ids=None) -> Float[Array, "B T V"]:
    """Logits for every position (float32; float64 for a float64 model), in `cfg.attention.mode`."""
    tokens, doc, _ = check_inputs(cfg, tokens, doc_ids)
    doc = document_runs(doc)
    model = bind(cfg, params)
    T = tokens.shape[1]
    if cfg.attention.mode == "full":
        return model.logits(full_hidden(model, cfg, tokens, doc, single_doc=doc_ids is None))
    if cfg.attention.mode == "streaming":
        from .streaming import forward_streaming

        if doc_ids is not None:
            raise ValueError("attention.mode=streaming takes one document per row (no doc_ids)")
        return forward_streaming(model, cfg, tokens)
    S = cfg.segment.len
    padded, pdoc = pad_to_segments(tokens, S), pad_to_segments(doc, S)
    logits, _, _ = scan_segments(model, cfg, padded, pdoc, lambda x, s: model.logits(x),
                                 single_doc=doc_ids is None)
    N, B, _, V = logits.shape
    return jnp.swapaxes(logits, 0, 1).reshape(B, N * S, V)[:, :T]
