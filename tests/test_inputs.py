"""Rows outside the packing rule (SPEC §2): left padding, other packers' rows.

A document that begins inside a segment and goes on into the next one is not how our data
pipeline packs rows, but users bring such rows (a left-padded batch, another packer's
output): they are computed exactly by the operator's own rules, positions counted from the
document's own start and sinks taken wherever the document begins.
"""

import jax
import numpy as np
import pytest
from helpers import F64, SHARP, random_tokens, tiny

import segexec_jax as sx
from segexec_jax.segment.reference import reference_forward

forward = jax.jit(sx.forward, static_argnums=1)


def seg(S, M, R, sinks, *extra, policy="topk", window=4, block=4):
    return [f"segment.len={S}", f"segment.tail={M}", f"segment.retrieval.budget={R}",
            f"segment.retrieval.policy={policy}", f"segment.sinks={sinks}",
            f"segment.retrieval.query_window={window}", f"segment.retrieval.block_size={block}", *extra]


CASES = {
    "topk_sinks": seg(8, 3, 5, 2),
    "no_tail": seg(6, 0, 4, 1, window=3),
    "topk_block_M_equals_S": seg(8, 8, 8, 2, policy="topk_block"),
    "refresh_map": seg(8, 3, 4, 2, "segment.retrieval.refresh=2", "segment.long_layers=[0,1]",
                       "segment.long_heads={0: [0, 1], 1: [1]}", window=2),
}


def unpacked_rows(S: int, T: int) -> np.ndarray:
    """Document ids that break the packing rule: documents begin mid-segment and go on."""
    rows = np.ones((5, T), np.int32)
    rows[0, :S - 3] = 0  # left padding: the document begins 3 tokens before a boundary
    rows[1, :S + 3] = 0  # padding across a boundary
    rows[2, :2 * S - 1] = 0  # one token before a boundary: its sinks span two segments
    lengths = [3, S + 1, 2 * S - 2]  # another packer: back to back, no padding
    rows[3] = np.repeat(np.arange(1, 5), lengths + [T - sum(lengths)])
    rows[4, S + 2:] = 0  # a document, then padding on the right (what `pack` writes)
    return rows


@pytest.mark.parametrize("name", list(CASES))
def test_unpacked_documents_match_reference(x64, name):
    cfg = tiny(*F64, *SHARP, "attention.backend=reference", *CASES[name])
    S = cfg.segment.len
    T = 5 * S + 5
    docs = unpacked_rows(S, T)
    params = sx.init_params(cfg, seed=1)
    tokens = random_tokens(len(docs), T, seed=2)
    fast = np.asarray(forward(params, cfg, tokens, doc_ids=docs))
    slow = reference_forward(params, cfg, tokens, doc_ids=docs)
    real = docs > 0  # padding positions compute something, but nothing reads them
    assert np.abs(fast - slow)[real].max() < 1e-9


def test_left_padded_batch_float32():
    """The common case in float32, the default backend: one document per row, padded on the
    left to a common length (generate's consistency bound, 1e-4)."""
    cfg = tiny(*SHARP, *seg(8, 3, 5, 2))
    S, T = 8, 29
    pads = [5, S + 3, 2 * S - 1]
    docs = np.stack([(np.arange(T) >= p).astype(np.int32) for p in pads])
    params = sx.init_params(cfg, seed=1)
    tokens = random_tokens(len(pads), T, seed=2)
    fast = np.asarray(forward(params, cfg, tokens, doc_ids=docs))
    slow = reference_forward(params, cfg, tokens, doc_ids=docs)
    assert np.abs(fast - slow)[docs > 0].max() < 1e-4


def test_unpacked_documents_loss_is_cross_entropy_of_reference(x64):
    """The objective runs the same scan: its value is the reference's cross entropy."""
    cfg = tiny(*F64, *SHARP, "attention.backend=reference", *seg(8, 3, 5, 2))
    T = 29
    docs = unpacked_rows(8, T)
    params = sx.init_params(cfg, seed=0)
    tokens = random_tokens(len(docs), T, seed=3)
    value = jax.jit(sx.loss, static_argnums=1)(params, cfg, tokens, None, docs)
    logp = jax.nn.log_softmax(reference_forward(params, cfg, tokens, doc_ids=docs), -1)
    nll = -np.take_along_axis(np.asarray(logp)[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    w = (docs[:, 1:] == docs[:, :-1]) & (docs[:, :-1] > 0)
    assert abs(float(value) - (nll * w).sum() / w.sum()) < 1e-12
