"""Attention kernels side by side: cuDNN's fused kernel vs XLA's on a GPU; fmzoo's fused CPU
kernel (models/kernels/cpu_attention.cc) vs XLA's and the reference on the CPU.

    python bench/attention.py --device gpu                     # bf16, T = 1024 and 4096
    python bench/attention.py --lengths 128 512 --heads 4 --head-dim 32 --tokens 2048  # CPU

Causal self-attention, [B, T, H, D] with H = 12 heads of D = 64 (gpt2-124m's shape) and B
chosen so that B x T = 16K tokens. FLOP convention (FlashAttention's): forward
4 B H T^2 D, halved for a causal mask; backward 2.5x the forward. Times are the median of
--reps calls after one warm-up call, each ending with block_until_ready.
`--json` prints one JSON object per measurement instead of the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from device import device_mismatch  # noqa: E402  (bench/device.py, next to this script)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--tokens", type=int, default=16384, help="B x T per call")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--impls", nargs="+", default=None,
                   help="default: cudnn xla on GPU, cpu xla reference on CPU")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json", action="store_true", help="one JSON object per measurement")
    return p.parse_args(argv)


def timed(fn, *args, reps: int) -> float:
    import jax
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(impl: str, T: int, args) -> dict:
    import jax
    import jax.numpy as jnp
    from fmzoo.models.attention import dot_product_attention
    B, H, D = max(1, args.tokens // T), args.heads, args.head_dim
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (B, T, H, D), args.dtype) for kk in keys)

    def fwd(q, k, v):
        return dot_product_attention(q, k, v, impl=impl, is_causal=True)

    def fwd_bwd(q, k, v):
        loss = lambda q, k, v: fwd(q, k, v).astype(jnp.float32).sum()  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    flops_fwd = 4 * B * H * T * T * D / 2
    row = {"bench": "attention", "impl": impl, "dtype": args.dtype, "T": T, "B": B, "H": H,
           "D": D, "device": jax.devices()[0].device_kind}
    for name, fn, flops in (("fwd", fwd, flops_fwd), ("fwd_bwd", fwd_bwd, 3.5 * flops_fwd)):
        try:
            dt = timed(jax.jit(fn), q, k, v, reps=args.reps)
        except Exception as e:  # e.g. cuDNN not applicable to this shape/dtype
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            continue
        row[f"{name}_ms"] = dt * 1e3
        row[f"{name}_tflops"] = flops / dt / 1e12
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    if (error := device_mismatch(args.device)):
        raise SystemExit(error)
    args.dtype = args.dtype or ("bfloat16" if args.device == "gpu" else "float32")
    impls = args.impls or (["cudnn", "xla"] if args.device == "gpu"
                           else ["cpu", "xla", "reference"])
    rows = [measure(impl, T, args) for T in args.lengths for impl in impls]
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    unit, per_t = ("TFLOP/s", 1) if args.device == "gpu" else ("GFLOP/s", 1000)
    cell = lambda r, k: (f"{r[k + '_ms']:.2f} ms, {r[k + '_tflops'] * per_t:.1f}"  # noqa: E731
                         if k + "_ms" in r else r.get(k + "_error", "-"))
    print(f"Causal self-attention, {args.dtype}, H={args.heads}, D={args.head_dim}, "
          f"B x T = {args.tokens}; jax {jax.__version__} on {rows[0]['device']}\n")
    print(f"| T | B | implementation | forward (ms, {unit}) | forward + backward (ms, {unit}) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['T']} | {r['B']} | {r['impl']} | {cell(r, 'fwd')} | {cell(r, 'fwd_bwd')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
