"""What a run that stopped on a NaN or Inf says: where it happened, what was kept, and
the fix (a model broken before any update is not a learning-rate problem)."""

from __future__ import annotations

from typing import Any


def config_suspects(config: Any) -> str:
    """The model config fields that commonly make a fresh model produce NaN or Inf."""
    checks = {"norm_eps": lambda v: v <= 0, "rope_theta": lambda v: v <= 0,  # 0: x / 0
              "dtype": lambda v: v == "float16"}
    shown = [f"{k}={getattr(config, k)!r}" for k in checks if hasattr(config, k)]
    bad = [f"{k}={getattr(config, k)!r}" for k, bad in checks.items()
           if hasattr(config, k) and bad(getattr(config, k))]
    return (f"suspicious: {', '.join(bad)}" if bad else
            f"check the overrides ({', '.join(shown)})")


def divergence_message(step: int, bad: dict, optim: Any, last: int | None, ckpt_dir: str,
                       init_info: dict, config: Any) -> str:
    """The error of a run whose `bad` values ({name: value}) became non-finite at `step`;
    `last` is the latest intact checkpoint in `ckpt_dir` (None: none)."""
    what = ", ".join(f"{k} {v}" for k, v in bad.items())
    kept = (f"the last good checkpoint (step {last}) in {ckpt_dir} is intact"
            if last is not None else "no checkpoint had been written yet")
    if step == 1 and set(bad) & {"loss", "grad_norm"}:
        source = init_info.get("source")
        model = (f"the model with its starting weights ({source})" if source and
                 init_info.get("kind") != "preset" else "the model itself")
        return (f"{what} at step 1, before any update: {model} produces non-finite "
                f"values, so the learning rate is not the cause; "
                f"{config_suspects(config)}. Nothing was saved")
    return (f"non-finite values at step {step} ({what}); stopping without saving. {kept}. "
            f"Lower --lr (now {optim.lr:g}), raise --warmup (now {optim.warmup}) or set "
            f"--clip-norm (now {optim.clip_norm:g}), then --resume")
