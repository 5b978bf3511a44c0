"""`fmzoo models` (the zoo as a table) and `fmzoo forward` (one forward pass per family)."""

from __future__ import annotations

HELP = {"models": "print the zoo: preset, family, parameters, layers, width, heads and "
                  "training recipe (peak lr, warm-up, schedule: what `fmzoo train` uses "
                  "unless --lr / --warmup / --schedule are given)",
        "forward": "run one forward pass of a small preset of each family"}


def add_models_arguments(p):
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_forward_arguments(p):
    p.add_argument("--presets", nargs="*",
                   default=["rnn-seq2seq", "rnn-seq2seq-attn", "transformer-seq2seq", "gpt-tiny",
                            "llama-tiny"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=16)


def zoo_rows():
    from fmzoo.models import count_params, family_name, get_config, list_models
    from fmzoo.models.recipes import recipe_for
    rows = []
    for name in list_models():
        c = get_config(name)
        r = recipe_for(name)
        rows.append({"preset": name, "family": family_name(c), "params": count_params(c),
                     "layers": c.n_layers if hasattr(c, "n_layers") else 1,
                     "d_model": c.d_model, "heads": getattr(c, "n_heads", "-"),
                     "lr": f"{r['lr']:g}", "warmup": r["warmup"], "schedule": r["schedule"]})
    return rows


def format_table(rows, columns) -> str:
    cells = [[str(r[c]) if not isinstance(r[c], int) or c != "params" else f"{r[c]:,}"
              for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) if v[:1].isdigit() else v.ljust(w)  # noqa: E731
                                  for v, w in zip(vals, widths)).rstrip()
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def run_models(args) -> int:
    rows = zoo_rows()
    if args.json:
        import json
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows, ["preset", "family", "params", "layers", "d_model", "heads",
                                  "lr", "warmup", "schedule"]))
    return 0


def run_forward(args) -> int:
    import time

    import jax
    import jax.numpy as jnp

    from fmzoo.models import LMConfig, build, get_config, init
    for name in args.presets:
        c = get_config(name)
        model, params = build(c), init(c, jax.random.key(0))
        toks = jax.random.randint(jax.random.key(1), (args.batch, args.length), 0, c.vocab_size)
        fwd = jax.jit(lambda p, *xs: model.apply({"params": p}, *xs))
        inputs = (toks,) if isinstance(c, LMConfig) else (toks, toks)
        t0 = time.perf_counter()
        logits = jax.block_until_ready(fwd(params, *inputs))
        ms = (time.perf_counter() - t0) * 1e3
        ok = bool(jnp.isfinite(logits).all())
        print(f"{name:22s} logits {tuple(logits.shape)}  finite={ok}  first call {ms:.0f} ms")
        if not ok:
            return 1
    return 0
