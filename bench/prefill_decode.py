"""Prefill tokens/s and decode ms/token through the public `generate`, for before/after runs.

Uses only `fmzoo.infer.generate(..., max_new_tokens=...)` and `fmzoo.models`, which every
version of fmzoo has, so the same script times two checkouts in one session:

    PYTHONPATH=/path/to/old python bench/prefill_decode.py --label old --json
    python bench/prefill_decode.py --label new --json

Prefill: wall time of generate(max_new_tokens=1) on a --prompt-token prompt (the prompt read
plus one token chosen). Decode: (time for 1 + N new tokens - time for 1) / N at each context.
Medians over --reps runs after a compile run. --override shrinks a preset while keeping, say,
its vocabulary (the [B, T, V] prefill logits grow with it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from decode import timed  # bench/decode.py, next to this script


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


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
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    from fmzoo.infer import generate
    from fmzoo.models import build, count_params, get_config, init

    backend = jax.default_backend()
    if args.device != "any" and backend != args.device and not os.environ.get("FMZOO_BENCH_DRY"):
        print(f"error: asked for {args.device} but jax runs on {backend}", file=sys.stderr)
        return 2
    overrides = dict(kv.split("=", 1) for kv in args.override)
    overrides = {k: _value(v) for k, v in overrides.items()}
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
        for ctx in args.contexts:
            p = prompts(max(ctx - args.new, 1))
            one = timed(lambda: run(p, 1), args.reps)
            many = timed(lambda: run(p, 1 + args.new), args.reps)
            row["decode_ms"][ctx] = 1e3 * max(many - one, 0.0) / args.new
        rows.append(row)
        decode = ", ".join(f"ctx {c}: {ms:.2f}" for c, ms in row["decode_ms"].items())
        print(f"[{args.label}] {name} ({row['params'] / 1e6:.1f}M, V={config.vocab_size}): "
              f"prefill {row['prefill_tok_s']:,.0f} tok/s at {args.prompt}; decode ms/token "
              f"{decode}", file=sys.stderr, flush=True)
        if args.json:
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
