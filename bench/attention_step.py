"""A training step with XLA's attention against fmzoo's fused CPU kernel, and PyTorch eager,
interleaved in one process (the cores are shared: rounds alternate so that drift hits all).

    python bench/attention_step.py            # gpt-tiny, batch 16 x 128, AdamW, fp32
    python bench/attention_step.py --json     # one JSON object per configuration

A fifth configuration is the kernel's step with JAX's own backward pass for the dense layers'
dot_general instead of models/linear.py's (the change of 2026-11-28, A/B'd in place).

Each configuration's step (bench/train.py's jax_lm_step / torch_lm_step) is built and warmed
up once; then --rounds rounds time --steps steps of each. Reports medians over rounds and
each one's ratio to PyTorch's step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import jax_lm_step, torch_lm_step  # noqa: E402  (bench/train.py)
from device import HOST_MALLOC  # noqa: E402  (fmzoo's malloc tuning: "on" or "off (why)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpt-tiny")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    import jax

    from fmzoo.models.registry import get_config
    config = get_config(args.preset)
    runs = {}
    for impl in ("xla", "cpu"):
        for packed in (False, True):
            step, state, batch = jax_lm_step(config.replace(attention_impl=impl),
                                             args.batch_size, args.seq_len, packed)
            runs[f"fmzoo {impl}{', packed' if packed else ''}"] = [step, state, batch]
    for r in runs.values():  # compile and warm up
        for _ in range(2):
            r[1], m = r[0](r[1], r[2])
        jax.block_until_ready(m)
    # the kernel step again with JAX's own dot_general backward (models/linear.py); the
    # switch is read while the step is traced, i.e. at its first call
    from fmzoo.models import linear
    linear.ENABLED = False
    try:
        r = list(jax_lm_step(config.replace(attention_impl="cpu"), args.batch_size,
                             args.seq_len, False))
        for _ in range(2):
            r[1], m = r[0](r[1], r[2])
        jax.block_until_ready(m)
    finally:
        linear.ENABLED = True
    runs["fmzoo cpu, JAX's dot backward"] = r
    torch_step = torch_lm_step(config, args.batch_size, args.seq_len)
    torch_step()
    times = {k: [] for k in [*runs, "pytorch"]}
    for _ in range(args.rounds):
        for name, r in runs.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                r[1], m = r[0](r[1], r[2])
            jax.block_until_ready(m)
            times[name].append((time.perf_counter() - t) / args.steps * 1e3)
        t = time.perf_counter()
        for _ in range(args.steps):
            torch_step()
        times["pytorch"].append((time.perf_counter() - t) / args.steps * 1e3)
    ref = statistics.median(times["pytorch"])
    if not args.json:
        print(f"fmzoo's host malloc tuning: {HOST_MALLOC}")
    for name, ts in times.items():
        med = statistics.median(ts)
        if args.json:
            print(json.dumps({"bench": "attention_step", "config": name, "preset": args.preset,
                              "step_ms": med, "ratio_to_pytorch": med / ref,
                              "rounds_ms": [round(x, 1) for x in ts],
                              "host_malloc": HOST_MALLOC}))
        else:
            print(f"| {name} | {med:.1f} | {med / ref:.2f}x | {' '.join(f'{x:.0f}' for x in ts)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
