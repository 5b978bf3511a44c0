"""Decode benchmark: KV-cached generation (fmzoo.infer.generate) against naive recomputation.

    python bench/decode.py                       # CPU: gpt-tiny and gpt2-124m, fp32, batch 1
    python bench/decode.py --device gpu --dtype bfloat16 --presets gpt2-124m llama-3.2-1b --batch 1

Random weights (speed does not depend on them). Per preset it measures
  - prefill: tokens/s reading a 512-token prompt in one parallel pass (time to first token);
  - decode: ms/token of the cached loop at contexts 64, 256 and 1024 (the last --new tokens
    of a context), and the naive peer in the same run: a full forward pass over the whole
    context for every new token (static shape, jitted, warm); both decode greedily and the
    bench reports whether their tokens agree;
  - 512 new tokens after a 16-token prompt: the cached loop measured end to end, and naive
    recomputation as the sum over the 512 steps of the forward time at that step's length,
    interpolated linearly between forward times measured at 16..1024 tokens (an estimate:
    running 512 full forwards of a 124M model on a CPU takes most of an hour). For models
    under 20M parameters the naive loop also runs for real (one buffer per power-of-two
    length bucket).
The same run measures this machine's limits and reports against them:
  - memory bandwidth, STREAM-like: a jitted, donated (in place) `2 * x` over a 256 MiB fp32
    array (the STREAM "scale" kernel: every byte read once and written once, counted as
    2 x 256 MiB per call, best of 5; a plain jitted copy would be elided by jax), and numpy's
    `np.copyto` for reference; decode is (weight bytes + KV-cache bytes of the context) per
    token / time per token / the larger of the two bandwidths;
  - matmul peak: the best of 3 runs of bench/train.py's measured_gemm_flops (a 2048^2 fp32
    matmul in jax); prefill of 512 tokens is (2 N + 4 L d T) x T FLOPs / time to first
    token / that peak (the forward third of train.py's PaLM convention 6 N + 12 L d T, N the
    matmul parameters; causal masking not discounted, as in PaLM).
  Both limits are measured before and after the presets and the larger is used (the cores
  may be shared: the less disturbed measurement is closer to what the machine does).
On a GPU it adds memory-bandwidth utilisation against the datasheet: (weight bytes + KV-cache
bytes of the context) x tokens/s / --peak-bw (default the H100 SXM's 3.35e12 B/s).
The table is printed and appended to bench/RESULTS.md (unless --no-write) with the machine,
jax version and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import cpu_info, flops_per_token, measured_gemm_flops  # noqa: E402
from device import device_mismatch  # noqa: E402

CONTEXTS = (64, 256, 1024)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--presets", nargs="+", default=["gpt-tiny", "gpt2-124m"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new", type=int, default=32, help="tokens decoded per context point")
    p.add_argument("--naive-steps", type=int, default=4,
                   help="naive forwards timed per context point (tokens compared over these)")
    p.add_argument("--long", type=int, default=512, help="new tokens for the speedup row")
    p.add_argument("--peak-bw", type=float, default=3.35e12)
    p.add_argument("--attention-impl", default="auto",
                   choices=["auto", "xla", "cudnn", "cpu", "reference"],
                   help="the models' attention path ('auto': cuDNN for 16-bit on GPU, else "
                        "XLA; 'cpu': fmzoo's fused CPU kernel)")
    p.add_argument("--json", action="store_true",
                   help="also print one JSON object per preset on stdout")
    p.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    p.add_argument("--no-write", action="store_true", help="print only; do not append to "
                   "--results")
    p.add_argument("--stream-mib", type=int, default=256,
                   help="array size of the STREAM-like bandwidth measurement")
    return p.parse_args(argv)


def machine() -> str:
    import jax
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
            name = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                        if line.startswith("Model name"))
        except (OSError, StopIteration):
            name = platform.processor() or "unknown CPU"
        return f"{name}, {os.cpu_count()} cores"
    return f"{dev.device_kind} ({dev.platform})"


def timed(fn, repeats=3):
    """Median wall time of fn() after one warm-up call (compilation excluded)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_limits(stream_mib: int = 256, reps: int = 5) -> dict:
    """Measured bandwidth (B/s: bytes read + written per second, STREAM's count) and fp32
    matmul FLOP/s. `bw` is the larger of jax's and numpy's bandwidth: what the machine
    demonstrably sustains (as bench/train.py takes the larger peak)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    n = stream_mib * 2**20 // 4
    # donated, so the result reuses the input buffer: a fresh 256 MiB output per call would
    # time the kernel's page faults, not the memory
    scale = jax.jit(lambda a: 2.0 * a, donate_argnums=0)
    x = scale(jnp.ones((n,), jnp.float32)).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x = scale(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
    np.copyto(dst, src)
    best_np = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best_np = min(best_np, time.perf_counter() - t0)
    moved = 2 * 4 * n
    out = {"stream_bytes": moved, "bw_jax": moved / best, "bw_numpy": moved / best_np,
           "gemm_flops": max(measured_gemm_flops() for _ in range(3))}
    out["bw"] = max(out["bw_jax"], out["bw_numpy"])
    if jax.default_backend() == "cpu":  # cores x clock x FLOPs/cycle from lscpu, for reference
        out["lscpu_flops"] = cpu_info()["peak"]
    return out


def best_limits(before: dict, after: dict) -> dict:
    """The machine's limits measured before and after the presets: the larger of each (the
    cores are shared, so the less disturbed of the two is closer to what the machine does)."""
    out = {k: max(before[k], after[k]) for k in before}
    out.update({f"{k}_before": before[k] for k in ("bw", "gemm_flops")})
    out.update({f"{k}_after": after[k] for k in ("bw", "gemm_flops")})
    return out


def add_fractions(row: dict, limits: dict) -> dict:
    """Prefill as a fraction of the matmul peak, decode as one of the memory bandwidth."""
    flops = row["prefill_tok_s"] * row["prefill_flops_per_token"]
    row["prefill_peak_frac"] = flops / limits["gemm_flops"]
    if limits.get("lscpu_flops"):
        row["prefill_lscpu_frac"] = flops / limits["lscpu_flops"]
    for c in row["contexts"].values():
        c["bw_measured"] = c["bytes_per_token"] * 1e3 / c["cached_ms"] / limits["bw"]
    return row


def bench_preset(name, args):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fmzoo.infer import generate
    from fmzoo.infer.generate import plan
    from fmzoo.models.cache import cache_bytes
    from fmzoo.models import build, count_params, get_config, init
    from fmzoo.models.attention import choose_impl

    overrides = dict(dtype=args.dtype, param_dtype=args.dtype, attention_impl=args.attention_impl)
    if get_config(name).max_len < max(CONTEXTS):  # the tiny presets' 256 is too short
        overrides["max_len"] = max(CONTEXTS)
    config = get_config(name, **overrides)
    model = build(config)
    params = jax.jit(lambda k: init(config, k))(jax.random.key(0))
    try:  # one GPU run must not be lost to a fused kernel that rejects a shape
        generate(model, params, [[1, 2, 3]], max_new_tokens=2)
    except Exception as e:  # noqa: BLE001
        if config.attention_impl == "xla":
            raise
        print(f"  [{name}] attention_impl={config.attention_impl!r} failed "
              f"({type(e).__name__}: {str(e)[:200]}); falling back to 'xla'", file=sys.stderr)
        config = config.replace(attention_impl="xla")
        model = build(config)
    n_params = count_params(config)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    rng = np.random.default_rng(0)
    B = args.batch
    prompts = lambda n: rng.integers(0, 256, (B, n)).tolist()  # noqa: E731
    log = lambda msg: print(f"  [{name}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))

    def naive_ms(length):
        toks = jnp.asarray(rng.integers(0, 256, (B, length)), jnp.int32)
        return 1e3 * timed(lambda: np.asarray(forward(params, toks)[:, -1].argmax(-1)), 2)

    row = {"preset": name, "params": n_params, "dtype": args.dtype, "batch": B,
           "impl": choose_impl(config.attention_impl, config.compute_dtype, config.dim_per_head)}
    log("prefill")
    p512 = prompts(512)
    stats = []
    for _ in range(3):
        stats.append(generate(model, params, p512, max_new_tokens=1, return_stats=True)[1])
    row["prefill_tok_s"] = 512 * B / statistics.median(s.ttft_s for s in stats[1:])
    # forward FLOPs per token at T = 512: a third of the training convention 6 N + 12 L d T
    row["prefill_flops_per_token"] = flops_per_token(config.replace(max_len=512)) / 3

    row["contexts"] = {}
    for ctx in CONTEXTS:
        log(f"context {ctx}")
        prompt = prompts(ctx - args.new)
        generate(model, params, prompt, max_new_tokens=args.new)  # compile
        runs = [generate(model, params, prompt, max_new_tokens=args.new, return_stats=True)
                for _ in range(3)]
        tokens = runs[0][0]
        cached_ms = 1e3 * statistics.median(s.decode_s for _, s in runs) / (args.new - 1)
        # The naive peer: one full forward over a fixed [B, ctx] buffer per new token.
        buf = np.zeros((B, ctx), np.int32)
        buf[:, :ctx - args.new] = prompt
        steps, naive = min(args.naive_steps, args.new), []
        forward(params, jnp.asarray(buf)).block_until_ready()  # compile
        for t in range(steps):
            t0 = time.perf_counter()
            nxt = np.asarray(forward(params, jnp.asarray(buf))[:, ctx - args.new + t - 1]
                             .argmax(-1))
            naive.append(time.perf_counter() - t0)
            buf[:, ctx - args.new + t] = nxt
        match = all(buf[b, ctx - args.new:ctx - args.new + steps].tolist() == tokens[b][:steps]
                    for b in range(B))
        slots = plan(model, prompt, args.new).slots
        kv_ctx = cache_bytes(model, B, ctx)
        tok_s = B * 1e3 / cached_ms
        row["contexts"][ctx] = dict(
            cached_ms=cached_ms, naive_ms=1e3 * statistics.median(naive),
            match=match, steps=steps, slots=slots,
            bytes_per_token=weight_bytes + kv_ctx,
            bw=(weight_bytes + kv_ctx) * (1e3 / cached_ms) / args.peak_bw)
        log(f"  cached {cached_ms:.2f} ms/token ({tok_s:.0f} tok/s), naive "
            f"{row['contexts'][ctx]['naive_ms']:.1f} ms/token, tokens match: {match}")

    log(f"{args.long} new tokens")
    p16 = prompts(16)
    generate(model, params, p16, max_new_tokens=args.long)
    long_runs = [generate(model, params, p16, max_new_tokens=args.long, return_stats=True)[1]
                 for _ in range(2)]
    row["long_cached_s"] = min(s.ttft_s + s.decode_s for s in long_runs)
    lengths = sorted({16, 64, 128, 256, 512, 1024, *CONTEXTS} & set(range(16, config.max_len + 1)))
    fwd_ms = {n: naive_ms(n) for n in lengths}
    xs = np.arange(16, 16 + args.long)
    row["long_naive_s"] = float(np.interp(xs, lengths, [fwd_ms[n] for n in lengths]).sum()) / 1e3
    row["fwd_ms"] = fwd_ms
    if n_params < 20e6:  # cheap enough to run the naive loop for real
        row["long_naive_measured_s"] = naive_loop_measured(forward, params, p16, args.long)
    return row


def naive_loop_measured(forward, params, prompt, n_new):
    """The naive loop for real: per step a full forward over a power-of-two buffer."""
    import jax.numpy as jnp
    import numpy as np

    from fmzoo.infer.generate import bucket
    B, P = len(prompt), len(prompt[0])
    buf = np.zeros((B, bucket(P + n_new)), np.int32)
    buf[:, :P] = prompt
    for n in sorted({bucket(n) for n in range(P, P + n_new)}):  # compile outside the clock
        forward(params, jnp.asarray(buf[:, :n])).block_until_ready()
    t0 = time.perf_counter()
    for t in range(P, P + n_new):
        n = bucket(t)
        buf[:, t] = np.asarray(forward(params, jnp.asarray(buf[:, :n]))[:, t - 1].argmax(-1))
    return time.perf_counter() - t0


def format_tables(rows, args) -> str:
    gpu = args.device == "gpu"
    columns = ["preset", "params", "dtype, attention", "batch", "prefill tok/s (512)",
               "prefill / matmul peak", "context", "cached ms/token", "naive ms/token",
               "naive / cached", "tokens agree", "MB read/token", "decode / measured bw"]
    columns += ["bandwidth util (datasheet)"] if gpu else []
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        for i, (ctx, c) in enumerate(r["contexts"].items()):
            first = [r["preset"], f"{r['params'] / 1e6:.1f}M", f"{r['dtype']}, {r['impl']}",
                     str(r["batch"]), f"{r['prefill_tok_s']:,.0f}",
                     f"{100 * r['prefill_peak_frac']:.0f}%" + (
                         f" ({100 * r['prefill_lscpu_frac']:.0f}%)"
                         if "prefill_lscpu_frac" in r else "")]
            cells = (first if i == 0 else [""] * len(first)) + [
                str(ctx), f"{c['cached_ms']:.2f}", f"{c['naive_ms']:.1f}",
                f"{c['naive_ms'] / c['cached_ms']:.1f}x",
                f"{'yes' if c['match'] else 'NO'} ({c['steps']})",
                f"{c['bytes_per_token'] / 1e6:.0f}", f"{100 * c['bw_measured']:.0f}%"]
            cells += [f"{100 * c['bw']:.0f}%"] if gpu else []
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"{args.long} new tokens after a 16-token prompt (naive: estimated from "
              "forward times, see the script's docstring):", "",
              "| preset | cached s (measured) | naive s (estimated) | speedup "
              "| naive s (measured, pow2 buffers) |", "|---|---|---|---|---|"]
    for r in rows:
        measured = r.get("long_naive_measured_s")
        lines.append(f"| {r['preset']} | {r['long_cached_s']:.2f} | {r['long_naive_s']:.1f} "
                     f"| {r['long_naive_s'] / r['long_cached_s']:.1f}x "
                     f"| {'-' if measured is None else f'{measured:.1f}'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    if (error := device_mismatch(args.device)):
        print(error, file=sys.stderr)
        return 2
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    def limits_now():
        log("machine limits (STREAM-like bandwidth, matmul peak)")
        lim = machine_limits(args.stream_mib)
        log(f"  bandwidth {lim['bw_jax'] / 1e9:.1f} GB/s (jax), {lim['bw_numpy'] / 1e9:.1f} "
            f"GB/s (numpy copy); matmul {lim['gemm_flops'] / 1e9:.0f} GFLOP/s")
        return lim
    before = limits_now()
    rows = [bench_preset(name, args) for name in args.presets]
    limits = best_limits(before, limits_now())
    rows = [add_fractions(row, limits) for row in rows]
    if args.json:  # numpy scalars as Python numbers
        print(json.dumps({"bench": "machine_limits", "device": machine(), **limits}), flush=True)
        for row in rows:
            print(json.dumps({"bench": "decode", **row},
                             default=lambda x: x.item() if hasattr(x, "item") else str(x)),
                  flush=True)
    table = format_tables(rows, args)
    cmd = " ".join(["python bench/decode.py", *(sys.argv[1:] if argv is None else argv)])
    load = "load average %.1f at the end (shared machine)" % os.getloadavg()[0]
    header = (f"## decode (bench/decode.py) -- {datetime.date.today().isoformat()}\n\n"
              f"Machine: {machine()}; {load}; jax {jax.__version__}; backend "
              f"{jax.default_backend()}; command: `{cmd}`"
              f"\nCached decode: fmzoo.infer.generate (prefill + one jitted while_loop, KV cache "
              f"donated), greedy, ms/token over the last {args.new} tokens of each context "
              f"(presets shorter than {max(CONTEXTS)} tokens run with max_len {max(CONTEXTS)}). "
              f"Naive: full forward over the whole context per token.\n"
              f"\nThis machine's limits, measured in the same run: memory bandwidth "
              f"{limits['bw'] / 1e9:.1f} GB/s (before the presets "
              f"{limits['bw_before'] / 1e9:.1f}, after {limits['bw_after'] / 1e9:.1f}: the "
              f"larger is used), the larger of jax {limits['bw_jax'] / 1e9:.1f} "
              f"GB/s (jitted, donated 2*x over {args.stream_mib} MiB fp32) and numpy "
              f"{limits['bw_numpy'] / 1e9:.1f} GB/s (np.copyto), bytes read + written, best of "
              f"5; matmul peak "
              f"{limits['gemm_flops'] / 1e9:.0f} GFLOP/s (2048^2 fp32 in jax, best of 3; before "
              f"{limits['gemm_flops_before'] / 1e9:.0f}, after "
              f"{limits['gemm_flops_after'] / 1e9:.0f})"
              + (f"; in brackets the fraction of lscpu's cores x clock x FLOPs/cycle, "
                 f"{limits['lscpu_flops'] / 1e9:.0f} GFLOP/s" if limits.get("lscpu_flops")
                 else "")
              + ". 'decode / measured bw' = MB read per token (weights + KV cache of the "
              "context) / time per token / that bandwidth; 'prefill / matmul peak' = "
              "(2 N + 4 L d T) x 512 FLOPs / time to first token / that peak.\n")
    print(header + "\n" + table)
    if args.no_write:
        return 0
    fresh = not os.path.exists(args.results) or os.path.getsize(args.results) == 0
    with open(args.results, "a") as f:
        title = "# fmzoo benchmark results\n" if fresh else ""
        f.write(title + "\n" + header + "\n" + table + "\n")
    print(f"appended to {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
