"""Compile time with and without `scan_layers`: the training step and generate's programs.

    python bench/compile_time.py                       # gpt2-355m and llama-3.2-1b shapes
    python bench/compile_time.py --json                # one JSON object per measurement
    python bench/compile_time.py --preset gpt-tiny --n-layers 2   # a quick smoke run

Everything is lowered from abstract inputs (jax.ShapeDtypeStruct: no weights, no optimizer
state and no cache are ever materialised), then `.compile()`d, each timed on its own:

- train: `fmzoo.train.make_train_step` with the real LM loss (`make_loss`) and AdamW
  (`make_optimizer`), on a one-device mesh, as bench/train.py's jax_lm_step_time builds it;
  batch --batch x --seq-len, packed rows (positions + segment ids), as the trainer feeds.
- generate: the two programs `fmzoo.infer.generate` compiles for a greedy request (the
  decoder it builds with `infer.decoder.Decoder` for the request shape `infer.generate.plan`
  gives): prefill (the prompt in one pass) and decode (the whole `lax.while_loop` of
  decode steps). Lowered through the Decoder's jitted functions, the very ones generate
  calls (`_prefill`, `_decode`): no public lowering API exists, and this avoids
  materialising real weights.

Compile time is `lower` (tracing to StableHLO) + `compile` (XLA); both are reported. It is
independent of the batch and mostly of the sequence length, and grows with the number of
layers when they are unrolled; with scan_layers XLA compiles one block.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

PRESETS = ("gpt2-355m", "llama-3.2-1b")


def _timed(lower):
    """(lowered-and-compiled executable, lower seconds, compile seconds)."""
    t0 = time.perf_counter()
    lowered = lower()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, t1 - t0, time.perf_counter() - t1


def train_step_compile(config, batch: int, seq_len: int):
    import jax
    from fmzoo.train import make_mesh
    from memory import abstract_step  # bench/memory.py: the step from shapes and shardings
    step, state, data = abstract_step(config, make_mesh("data=1", jax.devices()[:1]), batch,
                                      seq_len, packed=True)
    _, lower_s, compile_s = _timed(lambda: step.lower(state, data))
    return {"lower_s": lower_s, "compile_s": compile_s}


def generate_compile(config, batch: int, prompt_len: int, new_tokens: int):
    import jax
    import jax.numpy as jnp

    from fmzoo.infer.decoder import Decoder
    from fmzoo.infer.generate import plan
    from fmzoo.infer.processors import eos_array
    from fmzoo.infer.sampling import sampling_settings
    from fmzoo.models.registry import build, param_shapes

    model = build(config)
    shape = plan(model, [[1] * prompt_len] * batch, new_tokens)
    dec = Decoder(model, shape)  # what generate builds (decoder_for caches it)
    params = param_shapes(config)
    cache = jax.eval_shape(dec._alloc)
    S = jax.ShapeDtypeStruct
    toks, mask = S((shape.rows, shape.width), jnp.int32), S((shape.rows, shape.width), bool)
    live = S((shape.rows,), bool)
    _, pl, pc = _timed(lambda: dec._prefill.lower(params, cache, toks, mask, live))
    state = jax.eval_shape(dec._prefill_impl, params, cache, toks, mask, live)
    settings = sampling_settings(temperature=0.0, top_k=0, top_p=1.0)
    _, dl, dc = _timed(lambda: dec._decode.lower(params, state, jax.random.key(0), settings,
                                                  eos_array(config.eos_id), jnp.int32(new_tokens)))
    return {"lower_s": pl + dl, "compile_s": pc + dc, "prefill_s": pl + pc, "decode_s": dl + dc}


def table(rows: list[dict], title: str) -> str:
    """Markdown: unrolled vs scanned lower + compile seconds per model and program."""
    out = [title, "", "| model | layers | program | unrolled: lower + compile (s) | "
           "scan_layers: lower + compile (s) | speed-up |", "|---|---|---|---|---|---|"]
    for r in rows:
        s = next((x for x in rows if x["scan_layers"] and x["preset"] == r["preset"]
                  and x["what"] == r["what"]), None)
        if r["scan_layers"] or s is None:
            continue
        out.append(f"| {r['preset']} | {r['n_layers']} | {r['what']} | {r['lower_s']:.1f} + "
                   f"{r['compile_s']:.1f} = {r['total_s']:.1f} | {s['lower_s']:.1f} + "
                   f"{s['compile_s']:.1f} = {s['total_s']:.1f} | "
                   f"{r['total_s'] / s['total_s']:.1f}x |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", action="append", help=f"repeatable; default {PRESETS}")
    ap.add_argument("--n-layers", type=int, default=None, help="override the preset's depth")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--what", choices=("train", "generate", "both"), default="both")
    ap.add_argument("--json", action="store_true", help="one JSON object per measurement")
    args = ap.parse_args(argv)

    import warnings

    import jax

    from fmzoo.models import get_config

    # the decode loop does not return the donated pending logits (infer/decoder.py says why)
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    # the backend's one-off start-up (client, first compile) is not charged to the first row
    jax.jit(lambda x: x + 1).lower(1.0).compile()
    rows = []
    for preset in args.preset or PRESETS:
        base = get_config(preset)
        if args.n_layers:
            base = base.replace(n_layers=args.n_layers)
        seq = min(args.seq_len, base.max_len)
        for scan in (False, True):
            config = base.replace(scan_layers=scan)
            todo = {"train": lambda: train_step_compile(config, args.batch, seq),
                    "generate": lambda: generate_compile(config, args.batch, args.prompt_len,
                                                         args.new_tokens)}
            for what, fn in todo.items():
                if args.what not in (what, "both"):
                    continue
                r = {"preset": preset, "n_layers": config.n_layers, "scan_layers": scan,
                     "what": what, **fn()}
                r["total_s"] = r["lower_s"] + r["compile_s"]
                rows.append(r)
                if args.json:
                    print(json.dumps(r), flush=True)
    if args.json:
        return 0
    print(table(rows, f"compile time, {platform.processor() or platform.machine()}, jax "
                      f"{jax.__version__}, {jax.devices()[0].platform}, {datetime.date.today()}; "
                      f"train: batch {args.batch} x seq {args.seq_len}; generate: {args.batch} "
                      f"prompts of {args.prompt_len}, {args.new_tokens} new tokens (prefill + "
                      "decode loop)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
