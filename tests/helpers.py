"""Shared helpers for the tests."""

import jax
import numpy as np

import segexec_jax as sx

# Sharp attention (large init) so that every visible-set difference shows in the logits.
SHARP = ["model.init_std=0.4"]
F64 = ["model.dtype=float64", "model.param_dtype=float64"]


def tiny(*overrides: str) -> sx.Config:
    return sx.load_config("tiny", list(overrides))


def random_tokens(B: int, T: int, seed: int = 0, vocab: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (B, T), dtype=np.int32)


def pack(doc_lengths: list[int], S: int, T: int) -> np.ndarray:
    """Document ids for one row packed by the SPEC §2 rule (0: padding)."""
    row = []
    for i, n in enumerate(doc_lengths, start=1):
        left = -len(row) % S
        if n > left and left:
            row += [0] * left
        row += [i] * n
    assert len(row) <= T, (row, T)
    return np.array(row + [0] * (T - len(row)), np.int32)


def max_abs_diff(a, b) -> float:
    return float(max(np.max(np.abs(np.asarray(x) - np.asarray(y)))
                     for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
