"""Rotary position embedding applied at attention time.

Keys are stored pre-RoPE (tail, sinks, pool) and rotated with the position they take in
the current window, so a position never exceeds S + max(M, R) in segmented mode.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int


def inverse_frequencies(head_dim: int, theta: float, scaling=None) -> np.ndarray:
    """theta ** (-2i / head_dim) for i < head_dim / 2, with a checkpoint's frequency scaling
    ("linear": divided by factor; "llama3": long wavelengths divided by factor, short ones
    kept, a smooth blend between). In float64; cast at use."""
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return np.where(medium, blended, scaled)
    return inv


def model_frequencies(m) -> np.ndarray:
    """The inverse frequencies of a `ModelConfig` (head size, base, scaling)."""
    return inverse_frequencies(m.dim_head, m.rope_theta, m.rope_scaling)


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
