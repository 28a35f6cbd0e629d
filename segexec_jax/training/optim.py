"""The optimizer (optax): AdamW with warmup then cosine / linear / constant, global-norm
clipping, and weight decay on matrices only (not on norm scales)."""

from __future__ import annotations

import jax
import optax

from ..config import TrainConfig


def learning_rate(t: TrainConfig) -> optax.Schedule:
    warmup = optax.linear_schedule(0.0, t.lr, max(t.warmup_steps, 1))
    decay_steps = max(t.steps - t.warmup_steps, 1)
    end = t.lr * t.min_lr_ratio
    if t.schedule == "cosine":
        decay = optax.cosine_decay_schedule(t.lr, decay_steps, alpha=t.min_lr_ratio)
    elif t.schedule == "linear":
        decay = optax.linear_schedule(t.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(t.lr)
    if t.warmup_steps == 0:
        return decay
    return optax.join_schedules([warmup, decay], [t.warmup_steps])


def decay_mask(params) -> dict:
    """True for parameters that take weight decay: everything but RMSNorm scales."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(getattr(k, "key", None) == "scale" for k in path), params)


def optimizer(t: TrainConfig) -> optax.GradientTransformation:
    parts = []
    if t.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(t.grad_clip))
    parts.append(optax.adamw(learning_rate(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)
