"""Where a CPU training step's time goes: fmzoo's compiled step (a jax.profiler trace) beside
the same model in PyTorch eager (torch.profiler), grouped into the same categories.

    python bench/profile_train.py                       # gpt-tiny, batch 16 x 128, fp32
    python bench/profile_train.py --json                # one JSON object per row as well

JAX side: the trace's per-op events (one per XLA:CPU thunk: a fusion, a dot, a copy) are
summed per category, found from each op's HLO metadata (op_name holds the Flax module path:
layers_i/attn/query, layers_i/mlp/up, ...) and whether its fused computation holds a dot.
Dot FLOPs come from the HLO shapes, so each dot class gets an achieved GFLOP/s. Because XLA
runs independent ops concurrently on the two cores, per-op times add up to more than the
step; the trace's timeline also gives the time no op was running (dispatch and thread
hand-off between ops) and the time two ops overlapped.
PyTorch side: torch.profiler's self CPU time per aten op, in the same categories.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import jax_lm_step, time_steps, torch_lm_step  # noqa: E402
from device import HOST_MALLOC  # noqa: E402  (fmzoo's malloc tuning: "on" or "off (why)")

CATEGORIES = ("attention projections (q, k, v, out)", "attention core (scores, softmax, PV)",
              "MLP", "embedding, norms, LM head, loss", "optimizer, clipping, norms")


def _category(op_name: str) -> str:
    if "/attn/" in op_name:
        proj = re.search(r"/attn/(query|key|value|out)/|project_kv/(key|value)/", op_name)
        return CATEGORIES[0] if proj else CATEGORIES[1]
    if "/mlp/" in op_name:
        return CATEGORIES[2]
    if "DecoderLM" in op_name or "take_along_axis" in op_name or "log_softmax" in op_name:
        return CATEGORIES[3]
    return CATEGORIES[4]


def _shape(s: str) -> list[int]:
    return [int(x) for x in s.split(",")] if s else []


def hlo_ops(hlo: str) -> dict[str, dict]:
    """Per top-level instruction: its category, whether it is (or fuses) a dot, dot FLOPs."""
    shapes, comps, cur = {}, collections.defaultdict(list), None
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = f32\[([\d,]*)\]", line)
        if m:
            shapes[m.group(1)] = _shape(m.group(2))
        head = re.match(r"%?([\w.\-]+) \(.*\) -> .*\{\s*$", line)
        if head:
            cur = head.group(1)
        elif cur is not None:
            comps[cur].append(line)

    def dot_flops(lines):
        flops = 0
        for ln in lines:
            d = re.search(r"= f32\[([\d,]*)\]\S* dot\(%?([\w.\-]+), %?([\w.\-]+)\)"
                          r".*lhs_contracting_dims=\{([\d,]*)\}", ln)
            if d:
                lhs = shapes.get(d.group(2), [])
                k = np.prod([lhs[i] for i in _shape(d.group(4))]) if lhs else 0
                flops += 2 * int(np.prod(_shape(d.group(1)))) * int(k)
        return flops

    ops = {}
    for line in hlo.splitlines():  # names are unique in a module; only thunks show in traces
        # the result type is one shape, or a tuple of them (the attention kernel's custom calls)
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (?:\([^)]*\)|\S+) ([\w\-]+)\(", line)
        if not m:
            continue
        called = re.search(r"calls=%?([\w.\-]+)", line)
        body = comps.get(called.group(1), []) if called else [line]
        op_name = re.search(r'op_name="([^"]*)"', line)
        flops = dot_flops(body)
        ops[m.group(1)] = {"category": _category(op_name.group(1) if op_name else ""),
                           "dot": flops > 0, "flops": flops}
    return ops


def profile_jax(config, batch_size: int, seq_len: int, steps: int) -> dict:
    import jax
    step, state, batch = jax_lm_step(config, batch_size, seq_len)
    step_s, state = time_steps(step, state, batch, 3, steps)
    ops = hlo_ops(step.lower(state, batch).compile().as_text())
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(steps):
                state, m = step(state, batch)
            jax.block_until_ready(m)
        data = jax.profiler.ProfileData.from_file(
            glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0])
    events = []  # (start, end, thread, name): the XLA ops, from the compute threads
    for plane in data.planes:
        for line in plane.lines:
            if "Eigen" not in line.name:
                continue
            events += [(e.start_ns, e.start_ns + e.duration_ns, line.name, e.name)
                       for e in line.events if e.name in ops]
    events.sort()
    busy, overlap, cur_s, cur_e = 0, 0, events[0][0], events[0][1]
    for s, e, _, _ in events[1:]:
        if s > cur_e:
            busy, cur_s, cur_e = busy + cur_e - cur_s, s, e
        else:
            overlap += max(0, min(e, cur_e) - s)
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = events[-1][1] - events[0][0]
    rows = collections.defaultdict(lambda: {"ms": 0.0, "ops": 0, "flops": 0})
    for s, e, _, name in events:
        op = ops[name]
        r = rows[(op["category"], "dot" if op["dot"] else "other")]
        r["ms"] += (e - s) / 1e6 / steps
        r["ops"] += 1 / steps
        r["flops"] += op["flops"] / steps
    return {"step_ms": step_s * 1e3, "traced_step_ms": span / 1e6 / steps,
            "idle_ms": (span - busy) / 1e6 / steps, "overlap_ms": overlap / 1e6 / steps,
            "ops_per_step": len(events) / steps, "rows": dict(rows)}


def _torch_category(name: str) -> str:
    n = name.lower()
    if "attention" in n:
        return CATEGORIES[1] + " [fused kernel]"
    if n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"):
        return "matmuls (projections, MLP, LM head)"
    if "optimizer" in n or "foreach" in n or n in ("aten::add_", "aten::mul_", "aten::addcmul_",
                                                     "aten::addcdiv_", "aten::sqrt", "aten::lerp_",
                                                     "aten::div_", "aten::norm", "aten::linalg_vector_norm"):
        return CATEGORIES[4]
    return "other (gelu, layer norm, loss, copies, autograd)"


def profile_torch(config, batch_size: int, seq_len: int, steps: int) -> dict:
    import time
    import torch
    from torch.profiler import profile
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    step = torch_lm_step(config, batch_size, seq_len)
    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    step_s = (time.perf_counter() - t) / steps
    with profile() as prof:
        for _ in range(steps):
            step()
    rows = collections.defaultdict(float)
    for ev in prof.key_averages():
        rows[_torch_category(ev.key)] += ev.self_cpu_time_total / 1e3 / steps
    return {"step_ms": step_s * 1e3, "rows": dict(rows)}


def report(j: dict, t: dict | None) -> str:
    lines = [f"fmzoo (XLA:CPU) step {j['step_ms']:.0f} ms ({j['traced_step_ms']:.0f} ms traced); "
             f"{j['ops_per_step']:.0f} ops per step; no op running {j['idle_ms']:.0f} ms per step; "
             f"two ops at once {j['overlap_ms']:.0f} ms per step; host malloc tuning "
             f"{HOST_MALLOC}.", "",
             "| category | kind | ms per step (op time) | ops per step | GFLOP/s |",
             "|---|---|---|---|---|"]
    for (cat, kind), r in sorted(j["rows"].items(), key=lambda kv: -kv[1]["ms"]):
        gf = f"{r['flops'] / r['ms'] / 1e6:.0f}" if r["flops"] and r["ms"] > 0.05 else "-"
        lines.append(f"| {cat} | {kind} | {r['ms']:.1f} | {r['ops']:.0f} | {gf} |")
    if t is not None:
        lines += ["", f"PyTorch eager step {t['step_ms']:.0f} ms; self CPU time per category:", "",
                  "| category | ms per step |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in sorted(t["rows"].items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt-tiny")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-torch", action="store_true", help="profile fmzoo only")
    p.add_argument("--json", action="store_true", help="also print one JSON object per row")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from fmzoo.models import get_config
    config = get_config(args.preset, max_len=args.seq_len)
    j = profile_jax(config, args.batch_size, args.seq_len, args.steps)
    t = None if args.no_torch else profile_torch(config, args.batch_size, args.seq_len, args.steps)
    print(report(j, t))
    if args.json:
        for (cat, kind), r in j["rows"].items():
            print(json.dumps({"bench": "profile_train", "impl": "fmzoo", "preset": args.preset,
                              "category": cat, "kind": kind, **r}))
        print(json.dumps({"bench": "profile_train", "impl": "fmzoo", "preset": args.preset,
                          "host_malloc": HOST_MALLOC,
                          **{k: v for k, v in j.items() if k != "rows"}}))
        if t is not None:
            for cat, ms in t["rows"].items():
                print(json.dumps({"bench": "profile_train", "impl": "torch", "preset": args.preset,
                                  "category": cat, "ms": ms}))
            print(json.dumps({"bench": "profile_train", "impl": "torch", "preset": args.preset,
                              "step_ms": t["step_ms"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
