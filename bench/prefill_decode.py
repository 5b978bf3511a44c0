"""Prefill tokens/s and decode ms/token through the public `generate`, for before/after runs.

Uses only `fmzoo.infer.generate(..., max_new_tokens=...)` and `fmzoo.models`, which every
version of fmzoo has, so the same script times two checkouts in one session:

    PYTHONPATH=/path/to/old python bench/prefill_decode.py --label old --json
    python bench/prefill_decode.py --label new --json

Prefill: wall time of generate(max_new_tokens=1) on a --prompt-token prompt (the prompt read
plus one token chosen). Decode: (time for 1 + N new tokens - time for 1) / N at each context.
Medians over --reps runs after a compile run. --override shrinks a preset while keeping, say,
its vocabulary (the [B, T, V] prefill logits grow with it). --peak-bw B/s (a card's datasheet
bandwidth) adds, per context, the bytes one decode step reads (weights + the KV cache at that
context, where the checkout has models.cache.cache_bytes) x tokens/s / peak: "bw".
"""

from __future__ import annotations

import argparse
import json
import sys

from decode import timed  # bench/decode.py, next to this script
from device import device_mismatch  # bench/device.py, next to this script


def parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _kv_bytes(model, batch: int, ctx: int) -> int:
    """The KV cache's bytes at a context (0 in checkouts without models.cache.cache_bytes)."""
    try:
        from fmzoo.models.cache import cache_bytes
    except ImportError:
        return 0
    return cache_bytes(model, batch, ctx)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["gpt-tiny", "llama-3.2-1b"])
    ap.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides applied to every preset, e.g. n_layers=2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens for the prefill")
    ap.add_argument("--contexts", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--new", type=int, default=32, help="decode tokens timed per context")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--label", default="")
    ap.add_argument("--device", choices=["any", "cpu", "gpu"], default="any")
    ap.add_argument("--json", action="store_true", help="also print one JSON line per preset")
    ap.add_argument("--peak-bw", type=float, default=0.0,
                    help="memory bandwidth in B/s to report decode against (0 = off)")
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    from fmzoo.infer import generate
    from fmzoo.models import build, count_params, get_config, init

    backend = jax.default_backend()
    if (error := device_mismatch(args.device)):
        print(error, file=sys.stderr)
        return 2
    overrides = dict(kv.split("=", 1) for kv in args.override)
    overrides = {k: parse_value(v) for k, v in overrides.items()}
    rows = []
    for name in args.presets:
        need = max(args.prompt, max(args.contexts)) + 1
        kw = dict(dtype=args.dtype, param_dtype=args.dtype, **overrides)
        if get_config(name).max_len < need:
            kw["max_len"] = need
        config = get_config(name, **kw)
        model = build(config)
        params = jax.jit(lambda k: init(config, k))(jax.random.key(0))
        rng = np.random.default_rng(0)
        prompts = lambda n: rng.integers(0, 256, (args.batch, n)).tolist()  # noqa: E731
        run = lambda p, n: generate(model, params, p, max_new_tokens=n)  # noqa: E731
        p = prompts(args.prompt)
        prefill_s = timed(lambda: run(p, 1), args.reps)
        row = {"label": args.label, "preset": name, "params": count_params(config),
               "vocab": config.vocab_size, "dtype": args.dtype, "batch": args.batch,
               "backend": backend, "prefill_tokens": args.prompt,
               "prefill_tok_s": args.batch * args.prompt / prefill_s, "decode_ms": {}}
        weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
        for ctx in args.contexts:
            p = prompts(max(ctx - args.new, 1))
            one = timed(lambda: run(p, 1), args.reps)
            many = timed(lambda: run(p, 1 + args.new), args.reps)
            row["decode_ms"][ctx] = 1e3 * max(many - one, 0.0) / args.new
            if args.peak_bw > 0 and many > one:
                read = weight_bytes + _kv_bytes(model, args.batch, ctx)
                row.setdefault("bytes_per_step", {})[ctx] = read
                row.setdefault("bw", {})[ctx] = read / (row["decode_ms"][ctx] / 1e3) / \
                    args.peak_bw
        if args.peak_bw > 0:
            row["peak_bw"] = args.peak_bw
        rows.append(row)
        decode = ", ".join(f"ctx {c}: {ms:.2f}" + (f" ({100 * row['bw'][c]:.0f}% of peak bw)"
                                                   if c in row.get("bw", {}) else "")
                           for c, ms in row["decode_ms"].items())
        print(f"[{args.label}] {name} ({row['params'] / 1e6:.1f}M, V={config.vocab_size}): "
              f"prefill {row['prefill_tok_s']:,.0f} tok/s at {args.prompt}; decode ms/token "
              f"{decode}", file=sys.stderr, flush=True)
        if args.json:
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
