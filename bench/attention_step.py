"""A training step with XLA's attention against fmzoo's fused CPU kernel, and PyTorch eager,
each in a process of its own, taking turns (the cores are shared: rounds alternate so that
drift hits all).

    python bench/attention_step.py            # gpt-tiny, batch 16 x 128, AdamW, fp32
    python bench/attention_step.py --json     # one JSON object per configuration

Why processes: so that neither runtime's thread pool, allocator or caches are the other's
when it is timed (until 2026-11-28 all ran in one process).

The host is shared, and load on it does not slow the two runtimes alike: one busy process
beside the benchmark made PyTorch's step 3-4x slower and fmzoo's 2x (PyTorch's OpenMP
threads wait at each op's barrier for the thread whose core was taken; XLA's pool hands the
work to the thread that runs). So a loaded host flatters fmzoo's ratio. --spinners N starts
N such busy processes during the timed rounds to show it; the ratio worth quoting is the
one from a quiet host (with the medians, each configuration's fastest round is printed).
--cpus 0 pins every worker to one core, with one thread each: then load slows both alike,
and the ratio measures the two implementations' work.

A fifth configuration is the kernel's step with JAX's own backward pass for the dense layers'
dot_general instead of models/linear.py's.

Each worker builds its configuration's step (bench/train.py's jax_lm_step / torch_lm_step)
and warms it up; then, --rounds times, each worker in turn times --steps steps while the
others wait on a pipe with their threads asleep. Reports medians over rounds and each one's
ratio to PyTorch's step.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# name -> (attention_impl, packed, models.linear.ENABLED); None is PyTorch
CONFIGS = {
    "fmzoo xla": ("xla", False, True),
    "fmzoo xla, packed": ("xla", True, True),
    "fmzoo cpu": ("cpu", False, True),
    "fmzoo cpu, packed": ("cpu", True, True),
    "fmzoo cpu, JAX's dot backward": ("cpu", False, False),
    "pytorch": None,
}


def _worker(spec, preset: str, batch_size: int, seq_len: int, cpus, conn) -> None:
    """Builds one configuration's step, warms it up, then times `n` steps per request."""
    if cpus:  # before jax or torch size their thread pools from the affinity
        os.sched_setaffinity(0, cpus)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train import jax_lm_step, time_steps, torch_lm_step

    from fmzoo.models.registry import get_config
    config = get_config(preset)
    if spec is None:
        import torch
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        step = torch_lm_step(config, batch_size, seq_len)

        def timed(n: int) -> float:  # seconds per step
            t = time.perf_counter()
            for _ in range(n):
                step()
            return (time.perf_counter() - t) / n
    else:
        from fmzoo.models import linear
        impl, packed, linear.ENABLED = spec  # read when the step is traced, at its first call
        fn, state, batch = jax_lm_step(config.replace(attention_impl=impl), batch_size,
                                       seq_len, packed)
        box = [state]

        def timed(n: int) -> float:
            dt, box[0] = time_steps(fn, box[0], batch, 0, n)
            return dt
    timed(2)  # compile and warm up
    conn.send("ready")
    while (n := conn.recv()) is not None:
        conn.send(timed(n) * 1e3)


def _spin() -> None:
    while True:
        pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpt-tiny")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--spinners", type=int, default=0,
                   help="busy processes to run beside the timed rounds (load on the host)")
    p.add_argument("--cpus", default="",
                   help="comma-separated CPU ids every worker is pinned to (e.g. 0: one core "
                        "each, where load on the host slows both runtimes alike)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    for flag, value, least in (("--rounds", args.rounds, 1), ("--steps", args.steps, 1),
                               ("--spinners", args.spinners, 0)):
        if value < least:
            p.error(f"{flag} {value}: must be at least {least}")
    from device import HOST_MALLOC  # fmzoo's malloc tuning, "on" or "off (why)"

    from fmzoo.models.registry import get_config
    try:  # an unknown preset is named here, before six workers start
        get_config(args.preset)
    except (KeyError, ValueError) as e:
        p.error(str(e))

    try:
        cpus = sorted({int(c) for c in args.cpus.split(",") if c.strip()})
    except ValueError:
        p.error(f"--cpus {args.cpus!r}: give CPU ids separated by commas, e.g. --cpus 0")
    if not set(cpus) <= os.sched_getaffinity(0):
        p.error(f"--cpus {args.cpus!r}: this process may run on CPUs "
                f"{sorted(os.sched_getaffinity(0))} only")
    ctx = mp.get_context("spawn")  # a fresh interpreter: no thread pool inherited
    workers, spinners = {}, []
    try:
        for name, spec in CONFIGS.items():  # built one at a time: compiles don't overlap
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, daemon=True, args=(
                spec, args.preset, args.batch_size, args.seq_len, cpus, child))
            proc.start()
            child.close()  # the worker's end: a worker that dies then reads as EOF, not a hang
            workers[name] = (proc, parent)
            try:
                parent.recv()
            except EOFError:
                proc.join(timeout=5)
                raise RuntimeError(f"the {name!r} worker died while building its step (exit "
                                   f"code {proc.exitcode}); its error is printed above") from None
        for _ in range(args.spinners):
            spinners.append(ctx.Process(target=_spin, daemon=True))
            spinners[-1].start()
        times = {k: [] for k in workers}
        for _ in range(args.rounds):
            for name, (_, conn) in workers.items():
                time.sleep(0.2)  # let the last worker's threads stop spinning
                conn.send(args.steps)
                times[name].append(conn.recv())
    finally:
        for proc in spinners:
            proc.kill()
        for proc, conn in workers.values():
            try:
                conn.send(None)
            except OSError:  # the worker is gone already
                pass
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    ref, ref_min = statistics.median(times["pytorch"]), min(times["pytorch"])
    if not args.json:
        print(f"fmzoo's host malloc tuning: {HOST_MALLOC} (in every worker, PyTorch's too); "
              f"busy processes beside: {args.spinners}; workers pinned to CPUs: {cpus or 'no'}")
        print("| configuration | median ms | ratio | fastest ms | ratio | rounds (ms) |")
    for name, ts in times.items():
        med, best = statistics.median(ts), min(ts)
        if args.json:
            print(json.dumps({"bench": "attention_step", "config": name, "preset": args.preset,
                              "step_ms": med, "ratio_to_pytorch": med / ref,
                              "fastest_ms": best, "fastest_ratio": best / ref_min,
                              "rounds_ms": [round(x, 1) for x in ts],
                              "spinners": args.spinners, "cpus": cpus,
                              "host_malloc": HOST_MALLOC, "isolation": "process"}))
        else:
            print(f"| {name} | {med:.1f} | {med / ref:.2f}x | {best:.1f} | {best / ref_min:.2f}x "
                  f"| {' '.join(f'{x:.0f}' for x in ts)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
