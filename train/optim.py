"""The optimiser: AdamW with linear warm-up then cosine decay, and global-norm clipping."""

from __future__ import annotations

import jax
import optax


def lr_schedule(lr: float, total_steps: int, warmup_steps: int = 0,
                final_lr_ratio: float = 0.1) -> optax.Schedule:
    """0 -> lr linearly over `warmup_steps`, then cosine down to lr * final_lr_ratio."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    decay_steps = max(total_steps, warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup_steps, decay_steps=decay_steps,
        end_value=lr * final_lr_ratio)


def decay_mask(params):
    """Weight decay on matrices only: biases, norm scales (1-D) are left alone."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(lr: float = 1e-3, total_steps: int = 1000, *, warmup_steps: int = 0,
                   weight_decay: float = 0.1, b1: float = 0.9, b2: float = 0.95,
                   eps: float = 1e-8, clip_norm: float | None = 1.0,
                   final_lr_ratio: float = 0.1) -> optax.GradientTransformation:
    """optax chain: clip by global norm (if clip_norm), then AdamW on the schedule above."""
    schedule = lr_schedule(lr, total_steps, warmup_steps, final_lr_ratio)
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                        mask=decay_mask)
    if clip_norm is None or clip_norm <= 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
