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
    """The rows of DIR/metrics.jsonl. A torn last line (a run killed while writing it) is
    dropped; an unreadable line elsewhere is an error naming the line."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    rows = []
    for n, (i, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if n == len(lines) - 1:
                break  # torn by a kill mid-write; the resumed run writes that step again
            raise ValueError(f"{path} line {i} is not a metrics row ({e}); delete that line "
                             "or the file to continue") from None
        rows.append(row)
    return rows


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


def plot_metrics(workdir: str, out_name: str = "loss.png") -> str | None:
    """DIR/loss.png: train loss per step and eval loss at each evaluation, from metrics.jsonl.
    Returns the path, or None when matplotlib cannot be imported or nothing was logged."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only; never opens a window
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(workdir)
    train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
    evals = [(r["step"], r["eval_loss"]) for r in rows
             if isinstance(r.get("eval_loss"), (int, float))]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats / token)")
    ax.set_title(os.path.basename(os.path.normpath(workdir)))
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(workdir, out_name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
