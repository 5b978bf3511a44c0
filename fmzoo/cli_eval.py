"""`fmzoo eval`: loss, perplexity and token accuracy of a model on a dataset split, plus
exact match (greedy decoding) for seq2seq tasks.

The numbers come from the training package (fmzoo.train: the same batches, loss and
jitted eval step as `fmzoo train`'s own evaluation); exact match decodes with
fmzoo.infer.generate.
"""

from __future__ import annotations

HELP = "evaluate a model on a dataset: loss, perplexity, token accuracy (+ exact match)"

EPILOG = """examples:
  fmzoo eval --model runs/gpt-tiny --data python_docs
  fmzoo eval --model runs/rev --data algorithmic/reverse --batches 4 --json
  fmzoo eval --model exported/gpt-tiny --data notes.txt --seq-len 256 --split train
loss and accuracy are token-weighted over every evaluated batch; perplexity = exp(loss)"""


def add_arguments(p):
    from fmzoo.cli import Formatter
    p.epilog, p.formatter_class = EPILOG, Formatter
    p.add_argument("--model", required=True,
                   help="training workdir (latest checkpoint), HF checkpoint dir or preset name")
    p.add_argument("--data", required=True,
                   help="dataset: an embedded/TFDS name (e.g. algorithmic/reverse) or a text file")
    p.add_argument("--split", default=None,
                   help="split to evaluate (default: the dataset's held-out split, else train)")
    p.add_argument("--batches", type=int, default=8, help="number of batches (0 = whole split)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch")
    p.add_argument("--seq-len", type=int, default=128,
                   help="tokens per row (seq2seq: source and target length each)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute and parameter dtype (default: the model's own)")
    p.add_argument("--data-dir", default=None, help="TFDS data directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _check(batches: int, batch_size: int, seq_len: int) -> None:
    for name, value, low in (("--batches", batches, 0), ("--batch-size", batch_size, 1),
                             ("--seq-len", seq_len, 2)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")


def _exact_match(loaded, batch) -> tuple[int, int]:
    """Rows whose greedy decoding equals the reference target, and rows compared."""
    import numpy as np

    from fmzoo.infer import generate

    src, src_mask = np.asarray(batch["src"]), np.asarray(batch["src_mask"]).astype(bool)
    tgt, tgt_mask = np.asarray(batch["tgt_out"]), np.asarray(batch["tgt_mask"]).astype(bool)
    rows = [i for i in range(len(src)) if src_mask[i].any() and tgt_mask[i].any()]
    if not rows:
        return 0, 0
    prompts = [src[i][src_mask[i]].tolist() for i in rows]
    refs = [tgt[i][tgt_mask[i]].tolist() for i in rows]  # the target + eos
    eos = loaded.config.eos_id
    outs = generate(loaded.model, loaded.params, prompts, eos_id=eos,
                    max_new_tokens=max(len(r) for r in refs))
    return sum(out == ref for out, ref in zip(outs, refs)), len(rows)


def evaluate(model: str, data: str, *, split: str | None = None, batches: int = 8,
             batch_size: int = 8, seq_len: int = 128, dtype: str | None = None,
             data_dir: str | None = None) -> dict:
    """The metrics as a dict: loss, perplexity, accuracy, tokens, batches (+ exact_match,
    rows for seq2seq)."""
    import math
    from itertools import islice

    import jax

    import fmzoo
    from fmzoo.models.registry import param_shardings_for
    from fmzoo.train import data as data_lib
    from fmzoo.train import make_eval_step, make_loss, make_mesh, put_batch
    from fmzoo.train.losses import data_kind

    _check(batches, batch_size, seq_len)
    # the batch is split over the devices: use as many as divide it
    n = math.gcd(batch_size, jax.device_count())
    mesh = make_mesh(None, devices=jax.devices()[:n])
    loaded = fmzoo.load(model, dtype=dtype, mesh=mesh)
    kind = data_kind(loaded.config)
    if data_lib.dataset_kind(data, data_dir) != kind:
        raise ValueError(f"{data!r} is a {data_lib.dataset_kind(data, data_dir)} dataset but "
                         f"{model!r} is a {kind} model; pick a matching dataset")
    if split is None:
        split = data_lib.eval_split(data, data_dir) or "train"
    opts = dict(batch_size=batch_size, split=split, shuffle=False, num_epochs=1,
                data_dir=data_dir)
    if kind == "lm":
        it = data_lib.lm_batches(data, loaded.tokenizer, seq_len=seq_len, **opts)
    else:
        it = data_lib.seq2seq_batches(data, loaded.tokenizer, src_len=seq_len, tgt_len=seq_len,
                                      **opts)
    loss_fn = make_loss(loaded.model, loaded.config, deterministic=True)
    step = make_eval_step(loss_fn, mesh, param_shardings_for(loaded.config, mesh))
    total = {"loss": 0.0, "accuracy": 0.0, "tokens": 0.0}
    matched = rows = seen = 0
    for batch in islice(it, batches or None):
        m = jax.device_get(step(loaded.params, put_batch(batch, mesh)))
        t = float(m["tokens"])
        total["loss"] += float(m["loss"]) * t
        total["accuracy"] += float(m["accuracy"]) * t
        total["tokens"] += t
        seen += 1
        if kind == "seq2seq":
            hit, n_rows = _exact_match(loaded, batch)
            matched, rows = matched + hit, rows + n_rows
    if not total["tokens"]:
        raise ValueError(f"split {split!r} of {data!r} gave no tokens to evaluate; pick "
                         "another --split or dataset")
    loss = total["loss"] / total["tokens"]
    out = {"model": model, "data": data, "split": split, "batches": seen,
           "tokens": int(total["tokens"]), "loss": loss,
           "perplexity": math.exp(min(loss, 700.0)),  # exp overflows a float past ~709
           "accuracy": total["accuracy"] / total["tokens"]}
    if kind == "seq2seq":
        out.update(exact_match=matched / max(rows, 1), rows=rows)
    return out


def format_metrics(metrics: dict) -> str:
    keys = [k for k in ("loss", "perplexity", "accuracy", "exact_match", "tokens", "rows",
                        "batches") if k in metrics]
    width = max(map(len, keys))
    head = f"{metrics['model']} on {metrics['data']} ({metrics['split']} split)"
    lines = [head, "-" * len(head)]
    for k in keys:
        v = metrics[k]
        shown = f"{v:.4f}" if isinstance(v, float) else str(v)
        lines.append(f"{k.ljust(width)}  {shown}")
    return "\n".join(lines)


def run(args) -> int:
    import contextlib
    import sys

    # dataset preparation (TFDS) prints progress to stdout: keep stdout for the result
    with contextlib.redirect_stdout(sys.stderr):
        metrics = evaluate(args.model, args.data, split=args.split, batches=args.batches,
                           batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype,
                           data_dir=args.data_dir)
    if args.json:
        import json
        print(json.dumps(metrics, indent=2))
    else:
        print(format_metrics(metrics))
    return 0
