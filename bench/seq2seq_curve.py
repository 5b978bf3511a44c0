"""The chapter's comparison as a measured curve: vanilla RNN (final-state bottleneck), RNN +
attention and the encoder-decoder transformer, each trained with the same budget (steps,
batch, data) and its preset's default recipe (models/recipes.py), on string reversal at
several source lengths, several seeds. Reports held-out exact match and token accuracy vs
source length as a table, `--json`, and a PNG plot.

    python bench/seq2seq_curve.py                          # table + bench/seq2seq_curve.png
    python bench/seq2seq_curve.py --json out.json --lengths 4 8 16 --seeds 0 1 2

Exact match is computed from teacher-forced logits: every target token (and the end token)
is the argmax given the true prefix. That is the same as greedy decoding reproducing the
target exactly (greedy follows the true prefix as long as each argmax is right), without
compiling a decoder per length. Every run pads to the longest length, so each model
compiles its step once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

MODELS = {"vanilla RNN": "rnn-seq2seq", "RNN + attention": "rnn-seq2seq-attn",
          "transformer": "transformer-seq2seq"}


def reversal_pairs(length: int, split: str, seed: int, num_train: int, num_test: int):
    from fmzoo.train.datasets import algorithmic_examples
    return algorithmic_examples("reverse", split, min_len=length, max_len=length,
                                num_train=num_train, num_test=num_test, seed=seed)


def make_runner(preset: str, steps: int, src_len: int, tgt_len: int, mesh):
    """(train_and_eval(train_pairs, test_pairs, seed) -> metrics) with the step compiled once."""
    import jax

    from fmzoo.models import build, get_config
    from fmzoo.models.recipes import recipe_for
    from fmzoo.models.tokenizer import ByteTokenizer
    from fmzoo.train.data import seq2seq_batches
    from fmzoo.train.losses import make_loss
    from fmzoo.train.mesh import put_batch
    from fmzoo.train.optim import make_optimizer
    from fmzoo.train.state import create_train_state, init_params, sharded_init
    from fmzoo.train.step import make_train_step

    config, recipe, tok = get_config(preset), recipe_for(preset), ByteTokenizer()
    model = build(config)
    tx = make_optimizer(recipe["lr"], steps, warmup_steps=recipe["warmup"],
                        schedule=recipe["schedule"])
    _, shardings = sharded_init(config, tx, mesh, 0)
    step = make_train_step(make_loss(model, config), tx, mesh, shardings)
    # one compiled init for every seed (eager init is slow; sharded_init compiles per seed)
    init_jit = jax.jit(lambda key: init_params(config, key))

    @jax.jit
    def scores(params, b):
        logits_BTV = model.apply({"params": params}, b["src"], b["tgt_in"],
                                 b["src_mask"].astype(bool), b["tgt_mask"].astype(bool),
                                 deterministic=True)
        mask_BT = b["tgt_mask"].astype(bool)
        right_BT = (logits_BTV.argmax(-1) == b["tgt_out"]) & mask_BT
        exact_B = (right_BT | ~mask_BT).all(-1)
        return right_BT.sum(), mask_BT.sum(), exact_B.sum()

    def run(train_pairs, test_pairs, seed: int, batch_size: int) -> dict:
        params = init_jit(jax.random.key(seed))
        state = jax.device_put(create_train_state(params, tx, seed), shardings)
        it = seq2seq_batches(train_pairs, tok, batch_size=batch_size, seed=seed,
                             src_len=src_len, tgt_len=tgt_len)
        for _ in range(steps):
            state, m = step(state, put_batch(next(it), mesh))
        right = total = exact = 0
        for b in seq2seq_batches(test_pairs, tok, batch_size=len(test_pairs), shuffle=False,
                                 num_epochs=1, src_len=src_len, tgt_len=tgt_len):
            r, t, e = jax.device_get(scores(state.params, put_batch(b, mesh)))
            right, total, exact = right + int(r), total + int(t), exact + int(e)
        return {"token_accuracy": right / total, "exact_match": exact / len(test_pairs),
                "train_loss": float(jax.device_get(m["loss"]))}
    return run, recipe


def measure(lengths, seeds, steps, batch_size, num_test, models, log=print) -> dict:
    import jax

    from fmzoo.train.mesh import make_mesh
    mesh = make_mesh("data=1", jax.devices()[:1])
    src_len, tgt_len = max(lengths), max(lengths) + 1
    out = {"task": "algorithmic/reverse, source length exactly L (26 letters)",
           "steps": steps, "batch_size": batch_size, "num_test": num_test,
           "lengths": list(lengths), "seeds": list(seeds), "models": {}}
    for label in models:
        preset = MODELS[label]
        run, recipe = make_runner(preset, steps, src_len, tgt_len, mesh)
        rows = []
        for length in lengths:
            for seed in seeds:
                t0 = time.perf_counter()
                r = run(reversal_pairs(length, "train", seed, 5000, num_test),
                        reversal_pairs(length, "test", seed, 5000, num_test), seed,
                        batch_size)
                rows.append({"length": length, "seed": seed, **r})
                log(f"{label:16s} L={length:3d} seed={seed}  exact {r['exact_match']:.3f}  "
                    f"token acc {r['token_accuracy']:.3f}  ({time.perf_counter() - t0:.0f} s)")
        out["models"][label] = {"preset": preset, "recipe": recipe, "runs": rows}
    return out


def summary(result: dict) -> dict:
    """{model: {length: (mean exact, std exact, mean token acc, std token acc)}}."""
    def mean_std(xs):
        m = sum(xs) / len(xs)
        return m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))
    table = {}
    for label, m in result["models"].items():
        table[label] = {}
        for length in result["lengths"]:
            runs = [r for r in m["runs"] if r["length"] == length]
            table[label][length] = (*mean_std([r["exact_match"] for r in runs]),
                                    *mean_std([r["token_accuracy"] for r in runs]))
    return table


def format_table(result: dict) -> str:
    table = summary(result)
    lines = ["| source length | " + " | ".join(f"{m} exact / token acc" for m in table) + " |",
             "|---:|" + "---:|" * len(table)]
    for length in result["lengths"]:
        cells = [f"{e:.2f}±{es:.2f} / {a:.2f}±{as_:.2f}"
                 for e, es, a, as_ in (table[m][length] for m in table)]
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    table = summary(result)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, per_len in table.items():
        xs = list(per_len)
        for ax, i in zip(axes, (0, 2)):
            ys, err = [per_len[x][i] for x in xs], [per_len[x][i + 1] for x in xs]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
    for ax, title in zip(axes, ("held-out exact match", "held-out token accuracy")):
        ax.set_xlabel("source length")
        ax.set_title(title)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"string reversal, same budget ({result['steps']} steps x batch "
                 f"{result['batch_size']}), mean ± std over seeds {result['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4, 8, 12, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-test", type=int, default=256)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--json", metavar="PATH", help="also write the measurements as JSON")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="train nothing: merge the "
                   "measurements of earlier --json runs (e.g. one per model) into one")
    p.add_argument("--plot", metavar="PNG", default=os.path.join(os.path.dirname(
        os.path.abspath(__file__)), "seq2seq_curve.png"), help="the plot ('' = none)")
    a = p.parse_args(argv)
    if min(a.lengths) < 1 or a.steps < 1 or a.batch_size < 1 or a.num_test < 1:
        p.error("--lengths, --steps, --batch-size and --num-test must be >= 1")
    if a.merge:
        result = None
        for path in a.merge:
            with open(path) as f:
                part = json.load(f)
            if result is None:
                result = part
            elif {k: part[k] for k in ("lengths", "seeds", "steps", "batch_size")} != \
                    {k: result[k] for k in ("lengths", "seeds", "steps", "batch_size")}:
                p.error(f"--merge {path}: measured with other lengths/seeds/budget")
            else:
                result["models"].update(part["models"])
    else:
        result = measure(a.lengths, a.seeds, a.steps, a.batch_size, a.num_test, a.models,
                         log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_table(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    if a.plot:
        plot(result, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
