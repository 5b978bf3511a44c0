"""Training throughput: fmzoo (JAX) vs the same GPT in PyTorch eager, and RNN vs transformer
seq2seq step time as the sequence grows. Prints tables; appends them to bench/RESULTS.md.

    python bench/train.py                      # CPU: gpt-tiny, JAX and PyTorch side by side
    python bench/train.py --device gpu --preset gpt2-124m --dtype bfloat16 --seq-len 1024 \\
        --attention cudnn                      # H100: largest batch that fits, MFU

MFU convention (PaLM, appendix B): training FLOPs per token = 6 N + 12 L d T, with N the
parameters that take part in matmuls (all but the learned position table; a tied token
embedding counts once, as the output layer), L layers, d model width, T sequence length.
Peaks: CPU = the larger of (a) cores x clock x fp32 FLOPs/cycle/core from lscpu (AVX-512:
2 FMA pipes x 16 lanes x 2 = 64; AVX2: 32) -- lscpu of a VM often shows only the base clock --
and (b) the measured rate of a 2048^2 fp32 matmul in JAX on the same cores, i.e. what the
machine demonstrably sustains. H100 SXM = 989 TFLOP/s dense bf16.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from device import device_mismatch  # noqa: E402  (bench/device.py, next to this script)

H100_BF16_PEAK = 989e12
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def cpu_info() -> dict:
    """Model name, cores, clock and fp32 FLOPs/cycle/core from lscpu (Linux)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = ""
    field = lambda k: (re.search(rf"^{k}:\s*(.+)$", text, re.M) or [None, ""])[1].strip()  # noqa: E731
    flags = field("Flags").split()
    mhz = field("CPU max MHz") or ""
    ghz = float(mhz) / 1e3 if mhz else float(field("BogoMIPS") or 0) / 2e3  # BogoMIPS = 2 x TSC
    per_cycle = 64 if "avx512f" in flags else 32 if "fma" in flags else 16
    cores = len(os.sched_getaffinity(0))
    return {"model": field("Model name") or platform.processor(), "cores": cores, "ghz": ghz,
            "flops_per_cycle": per_cycle, "peak": cores * ghz * 1e9 * per_cycle}


def flops_per_token(config) -> float:
    from fmzoo.models import count_params
    n = count_params(config) - (config.max_len * config.d_model if config.flavor == "gpt2" else 0)
    return 6 * n + 12 * config.n_layers * config.d_model * config.max_len


def measured_gemm_flops(n: int = 2048, reps: int = 5) -> float:
    import jax
    import jax.numpy as jnp
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    out.block_until_ready()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def time_steps(step, state, batch, warmup: int, steps: int) -> tuple[float, object]:
    """(mean seconds per step after `warmup` untimed steps, the final state)."""
    import jax
    for _ in range(warmup):
        state, _ = step(state, batch)
    jax.block_until_ready(state)
    t = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, batch)
    jax.block_until_ready((state, m))
    return (time.perf_counter() - t) / steps, state


def jax_lm_step(config, batch_size: int, seq_len: int, packed: bool = False):
    """(step, state, batch): fmzoo's compiled AdamW step on one device and a random batch.
    packed=True adds segment ids + positions (a packed batch, whose mask is materialised);
    packed=False feeds plain causal rows, as the PyTorch peer does."""
    import jax
    from fmzoo.models.registry import build
    from fmzoo.train import make_loss, make_mesh, make_optimizer, make_train_step, put_batch
    from fmzoo.train.state import sharded_init
    mesh = make_mesh("data=1", jax.devices()[:1])
    tx = make_optimizer(1e-4, 1000)
    state, shardings = sharded_init(config, tx, mesh)
    step = make_train_step(make_loss(build(config), config), tx, mesh, shardings)
    rs = np.random.RandomState(0)
    toks = rs.randint(0, min(config.vocab_size, 256), (batch_size, seq_len + 1)).astype(np.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
             "loss_mask": np.ones((batch_size, seq_len), np.float32)}
    if packed:
        batch.update(positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                               (batch_size, seq_len)),
                     segment_ids=np.ones((batch_size, seq_len), np.int32))
    return step, state, put_batch(batch, mesh)


def jax_lm_step_time(config, batch_size: int, seq_len: int, warmup=2, steps=10,
                     packed: bool = False) -> float:
    """Seconds per AdamW step (see jax_lm_step)."""
    step, state, batch = jax_lm_step(config, batch_size, seq_len, packed)
    return time_steps(step, state, batch, warmup, steps)[0]


def torch_lm_step(config, batch_size: int, seq_len: int):
    """One AdamW step of the same GPT-2 block stack in PyTorch eager, fp32 (a callable)."""
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F
    torch.manual_seed(0)
    c = config

    class Block(tnn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = tnn.LayerNorm(c.d_model), tnn.LayerNorm(c.d_model)
            self.qkv, self.proj = tnn.Linear(c.d_model, 3 * c.d_model), tnn.Linear(c.d_model, c.d_model)
            self.up, self.down = tnn.Linear(c.d_model, c.d_ff), tnn.Linear(c.d_ff, c.d_model)

        def forward(self, x):
            B, T, E = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, c.n_heads, E // c.n_heads).unbind(2)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2), is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(B, T, E))
            return x + self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh"))

    class GPT(tnn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = tnn.Embedding(c.vocab_size, c.d_model), tnn.Embedding(c.max_len, c.d_model)
            self.blocks = tnn.ModuleList(Block() for _ in range(c.n_layers))
            self.ln = tnn.LayerNorm(c.d_model)

        def forward(self, idx):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for b in self.blocks:
                x = b(x)
            return self.ln(x) @ self.wte.weight.T

    model = GPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    toks = torch.randint(0, 256, (batch_size, seq_len + 1))

    def step():
        logits = model(toks[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, c.vocab_size), toks[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step


def torch_lm_step_time(config, batch_size: int, seq_len: int, warmup=2, steps=10) -> float:
    step = torch_lm_step(config, batch_size, seq_len)
    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def seq2seq_step_time(preset: str, length: int, batch_size: int, steps: int = 5) -> float:
    import jax
    from fmzoo.models import get_config
    from fmzoo.models.registry import build
    from fmzoo.train import make_loss, make_mesh, make_optimizer, make_train_step, put_batch
    from fmzoo.train.state import sharded_init
    config = get_config(preset, max_len=max(256, length + 1))
    mesh = make_mesh("data=1", jax.devices()[:1])
    tx = make_optimizer(1e-4, 1000)
    state, shardings = sharded_init(config, tx, mesh)
    step = make_train_step(make_loss(build(config), config), tx, mesh, shardings)
    toks = np.random.RandomState(0).randint(0, 256, (batch_size, length + 1)).astype(np.int32)
    ones = np.ones((batch_size, length), bool)
    batch = put_batch({"src": toks[:, 1:], "src_mask": ones, "tgt_in": toks[:, :-1],
                       "tgt_out": toks[:, 1:], "tgt_mask": ones}, mesh)
    return time_steps(step, state, batch, 1, steps)[0]


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def run_cpu(args) -> str:
    import torch
    from fmzoo.models import get_config
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    info = cpu_info()
    gemm = max(measured_gemm_flops() for _ in range(3))
    peak = max(info["peak"], gemm)
    config = get_config(args.preset, max_len=args.seq_len)
    fpt = flops_per_token(config)
    B, T = args.batch_size, args.seq_len
    rows = []
    for name, fn in (("fmzoo (JAX, jit)", jax_lm_step_time), ("PyTorch eager", torch_lm_step_time)):
        dt = fn(config, B, T, steps=args.steps)
        tps = B * T / dt
        rows.append([name, f"{dt * 1e3:.0f}", f"{tps:,.0f}", f"{tps * fpt / 1e9:.0f}",
                     f"{100 * tps * fpt / peak:.1f}%"])
        print(rows[-1], flush=True)
    lm = table(["implementation", "step ms", "tokens/s", "model GFLOP/s", "MFU"], rows)
    s_rows = []
    for length in args.seq2seq_lengths:
        r = seq2seq_step_time("rnn-seq2seq-attn", length, args.seq2seq_batch)
        t = seq2seq_step_time("transformer-seq2seq", length, args.seq2seq_batch)
        s_rows.append([length, f"{r * 1e3:.1f}", f"{t * 1e3:.1f}", f"{r / t:.2f}"])
        print(s_rows[-1], flush=True)
    s2s = table(["seq len (src = tgt)", "RNN+attention step ms", "transformer step ms",
                 "RNN / transformer"], s_rows)
    return (f"CPU: {info['model']}, {info['cores']} cores visible. Peak assumed: "
            f"{peak / 1e9:.0f} GFLOP/s fp32, the larger of the lscpu estimate {info['cores']} "
            f"cores x {info['ghz']:.2f} GHz x {info['flops_per_cycle']} FLOPs/cycle = "
            f"{info['peak'] / 1e9:.0f} and the best measured 2048^2 fp32 matmul in JAX = "
            f"{gemm / 1e9:.0f}. PyTorch {torch.__version__} with {threads} threads. Other jobs "
            "may share the cores: compare the two rows, not runs on different days. Both sides read "
            "the same plain causal rows (no packing, no segment mask).\n\n"
            f"**{args.preset}** ({fpt / 1e6:.2f} MFLOP/token), batch {B} x {T} tokens, AdamW, "
            f"fp32, {args.steps} timed steps after 2 warm-up:\n\n{lm}\n\n"
            f"**Seq2seq train step** (batch {args.seq2seq_batch}, presets rnn-seq2seq-attn "
            f"[GRU, H=128] and transformer-seq2seq [2+2 layers, d=128]): the RNN walks the "
            f"sequence step by step, the transformer processes it in parallel.\n\n{s2s}\n")


def run_gpu(args) -> str:
    import jax
    from fmzoo.models import get_config
    if (error := device_mismatch("gpu")):
        raise SystemExit(error)
    over = dict(dtype=args.dtype, attention_impl=args.attention,
                max_len=max(args.seq_len, get_config(args.preset).max_len))
    if args.remat != "none":
        over["remat"] = args.remat
    if args.layers:
        over["n_layers"] = args.layers
    config = get_config(args.preset, **over)
    fpt = flops_per_token(config.replace(max_len=args.seq_len))
    rows, best = [], None
    for B in ([args.batch_size] if args.batch_size else args.batch_sizes):
        try:
            dt = jax_lm_step_time(config, B, args.seq_len, warmup=3, steps=args.steps,
                                  packed=args.packed)
        except Exception as e:  # XlaRuntimeError RESOURCE_EXHAUSTED: try a smaller batch
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            print(f"batch {B}: does not fit", flush=True)
            continue
        tps = B * args.seq_len / dt
        best = [B, f"{dt * 1e3:.1f}", f"{tps:,.0f}", f"{100 * tps * fpt / H100_BF16_PEAK:.1f}%"]
        rows.append(best)
        print(best, flush=True)
        if args.json:
            print(json.dumps({"bench": "train", "device": jax.devices()[0].device_kind,
                              "preset": args.preset, "dtype": args.dtype, "remat": args.remat,
                              "packed": args.packed, "attention": args.attention,
                              "seq_len": args.seq_len, "batch": B, "step_ms": dt * 1e3,
                              "tokens_per_s": tps, "mfu": tps * fpt / H100_BF16_PEAK}),
                  flush=True)
        break
    if best is None:
        raise SystemExit("no batch size fitted")
    dev = jax.devices()[0].device_kind
    return (f"GPU: {dev}; {args.preset}{f' ({args.layers} layers)' if args.layers else ''}, "
            f"compute {args.dtype}, params fp32, attention {args.attention}, remat "
            f"{args.remat}, {'packed rows (segment mask)' if args.packed else 'plain causal rows'}"
            f", sequence {args.seq_len}; MFU against {H100_BF16_PEAK / 1e12:.0f} "
            f"TFLOP/s ({fpt / 1e6:.0f} MFLOP/token):\n\n"
            + table(["batch", "step ms", "tokens/s", "MFU"], rows) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--preset", default="gpt-tiny")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attention", default="auto",
                   help="attention_impl: auto, xla, cudnn, cpu (fmzoo's fused CPU kernel)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=None,
                   help="CPU default 16; GPU default: the largest of 64..8 that fits")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 48, 32, 24, 16, 8],
                   help="GPU: tried in order until one fits")
    p.add_argument("--remat", default="none", choices=["none", "full", "dots"],
                   help="activation checkpointing per block (model config field remat)")
    p.add_argument("--layers", type=int, default=None, help="override n_layers (GPU)")
    p.add_argument("--packed", action=argparse.BooleanOptionalAction, default=True,
                   help="feed segment ids + positions (a packed batch) or plain causal rows")
    p.add_argument("--json", action="store_true", help="also print one JSON object per "
                   "measurement")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seq2seq-lengths", type=int, nargs="*", default=[16, 32, 64, 128])
    p.add_argument("--seq2seq-batch", type=int, default=16)
    p.add_argument("--no-write", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        args.batch_size = args.batch_size or 16
    import jax
    body = run_cpu(args) if args.device == "cpu" else run_gpu(args)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = (f"\n## Training throughput ({args.device}), {stamp}\n\n`python bench/train.py "
               f"{' '.join(sys.argv[1:] if argv is None else argv)}` on {platform.node() or '?'}; "
               f"jax {jax.__version__}, Python {platform.python_version()}; load average "
               f"{os.getloadavg()[0]:.1f} at the end.\n\n{body}")
    print(section)
    if not args.no_write:
        with open(RESULTS, "a") as f:
            f.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
