"""Rotary position embedding applied at attention time.

Keys are stored pre-RoPE (tail, sinks, pool) and rotated with the position they take in
the current window, so a position never exceeds S + max(M, R) in segmented mode.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int


def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """theta ** (-2i / head_dim) for i < head_dim / 2, in float64 (cast at use)."""
    return theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def apply_rope(
    x: Float[Array, "B T N D"], positions: Int[Array, "B T"], inv_freq: np.ndarray
) -> Float[Array, "B T N D"]:
    """Rotate halves (the Llama convention): pairs (i, i + D/2) share one frequency."""
    work = jnp.promote_types(x.dtype, jnp.float32)
    angles = positions.astype(work)[..., None] * jnp.asarray(inv_freq, work)  # [B T D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(work), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
