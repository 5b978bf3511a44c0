"""Metrics out: one JSON object per line in DIR/metrics.jsonl, and TensorBoard event files
written by tensorboardX (no TensorFlow). Only process 0 writes."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no nan/inf; keep the line parseable
    return v


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(workdir: str, last_step: int) -> None:
    """Drops lines logged after `last_step` (a resumed run logs those steps again)."""
    path = os.path.join(workdir, METRICS_FILE)
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    kept = [r for r in read_metrics(workdir) if r.get("step", 0) <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)


class MetricsWriter:
    def __init__(self, workdir: str, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, METRICS_FILE)
        self.tb = None
        if self.active and tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, TB_DIR))

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        if not self.active:
            return
        row = {"step": int(step), **{prefix + k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k.replace("eval_", "eval/"), v, step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
