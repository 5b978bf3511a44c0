"""The optimiser: AdamW on a warm-up schedule (cosine or inverse square root), with
global-norm clipping.

Schedules (optax step count c = 0, 1, ...; lr is always the peak):
  cosine  0 -> lr linearly over `warmup` steps, then cosine down to lr * final_lr_ratio at
          `total_steps` (optax.warmup_cosine_decay_schedule).
  rsqrt   the Transformer paper's (Vaswani et al. 2017, eq. 3)
              d_model^-0.5 * min(n^-0.5, n * warmup^-1.5),   n = c + 1,
          rescaled so that its peak (at n = warmup) is lr:
              lr * min(sqrt(warmup / n), n / warmup).
          With the paper's d_model=512, warmup=4000 that peak is 7.0e-4: pass --lr 7e-4 to
          get the paper's schedule exactly. warmup 0 is read as 1 (no ramp).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "rsqrt")


def rsqrt_schedule(lr: float, warmup_steps: int) -> optax.Schedule:
    """lr * min(sqrt(w / n), n / w) with n = count + 1: linear up to lr at n = w, then
    lr * sqrt(w / n) (never decays to 0, as in the paper)."""
    w = float(max(1, warmup_steps))

    def schedule(count):
        n = jnp.asarray(count, jnp.float32) + 1.0
        return lr * jnp.minimum(jnp.sqrt(w / n), n / w)
    return schedule


def lr_schedule(lr: float, total_steps: int, warmup_steps: int = 0,
                final_lr_ratio: float = 0.1, kind: str = "cosine") -> optax.Schedule:
    """The learning rate at each optax step count: `kind` 'cosine' (0 -> lr linearly over
    `warmup_steps`, then cosine down to lr * final_lr_ratio) or 'rsqrt' (see the module)."""
    if kind == "rsqrt":
        return rsqrt_schedule(lr, warmup_steps)
    if kind != "cosine":
        raise ValueError(f"unknown learning-rate schedule {kind!r}; pass one of "
                         f"{', '.join(SCHEDULES)}")
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
                   final_lr_ratio: float = 0.1,
                   schedule: str = "cosine") -> optax.GradientTransformation:
    """optax chain: clip by global norm (if clip_norm), then AdamW on the schedule above."""
    sched = lr_schedule(lr, total_steps, warmup_steps, final_lr_ratio, kind=schedule)
    adamw = optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                        mask=decay_mask)
    if clip_norm is None or clip_norm <= 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
