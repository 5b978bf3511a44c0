"""`fmzoo train`: train a preset on a dataset into a workdir (fmzoo.train.loop)."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "train a preset on a dataset (jit on a mesh or pmap), with eval, samples and checkpoints"

EPILOG = """examples:
  fmzoo train --model gpt-tiny --data python_docs --workdir runs/gpt-tiny --steps 1800
  fmzoo train --model rnn-seq2seq-attn --data algorithmic/reverse --workdir runs/rev --steps 500 --seq-len 24
  fmzoo train ... --mesh data=2,fsdp=2,tensor=2      (or --pmap for plain data parallel)
  fmzoo train ... --resume                            (continue from the latest checkpoint)
  trailing key=value pairs override model config fields, e.g. n_layers=2 dropout=0.1"""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the examples' line breaks."""


def add_arguments(p):
    p.epilog = EPILOG
    p.formatter_class = _Formatter
    p.add_argument("--model", default="gpt-tiny", help="preset name (see `fmzoo models`)")
    p.add_argument("--data", default="python_docs",
                   help="dataset: python_docs, algorithmic/{copy,reverse,sort,addition} or a "
                        "prepared TFDS catalog name")
    p.add_argument("--workdir", required=True, help="directory for checkpoints and metrics")
    p.add_argument("--steps", type=int, default=1800, help="total optimiser steps")
    p.add_argument("--batch-size", type=int, default=16, help="global batch (all processes)")
    p.add_argument("--seq-len", type=int, default=128,
                   help="LM row length; seq2seq source/target length unless given below")
    p.add_argument("--src-len", type=int, default=None)
    p.add_argument("--tgt-len", type=int, default=None)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip-norm", type=float, default=1.0, help="global-norm clip (0 = off)")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation microbatches")
    p.add_argument("--mesh", default=None,
                   help="e.g. data=2,fsdp=2,tensor=2 (default: data over all devices)")
    p.add_argument("--pmap", action="store_true", help="data parallel with jax.pmap")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--eval-every", type=int, default=200, help="0 = only at the end")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-prompt", default="def ", help="LM prompt for eval samples")
    p.add_argument("--sample-tokens", type=int, default=96)
    p.add_argument("--data-dir", default=None, help="TFDS data dir (default $FMZOO_DATA_DIR "
                                                    "or ~/.cache/fmzoo/tensorflow_datasets)")
    p.add_argument("--data-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="dataset builder option, e.g. max_len=40 for algorithmic/*")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: bytes)")
    p.add_argument("--sync-save", action="store_true", help="save checkpoints synchronously")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--coordinator", default=None,
                   help="multi-host: HOST:PORT of process 0 (or JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="model config overrides, e.g. n_layers=2")


def parse_pairs(pairs: list[str], what: str) -> dict:
    """['n_layers=2', 'dtype=bfloat16'] -> {'n_layers': 2, 'dtype': 'bfloat16'} (JSON values)."""
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ValueError(f"{what} {pair!r} is not key=value (e.g. n_layers=2)")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = {"None": None, "True": True, "False": False}.get(value, value)
    return out


def config_from_args(args):
    from fmzoo.train.loop import TrainConfig
    return TrainConfig(
        workdir=args.workdir, model=args.model, data=args.data, steps=args.steps,
        overrides=parse_pairs(args.overrides, "override"),
        data_options=parse_pairs(args.data_opt, "--data-opt"), batch_size=args.batch_size,
        seq_len=args.seq_len, src_len=args.src_len, tgt_len=args.tgt_len, lr=args.lr,
        warmup=args.warmup, weight_decay=args.weight_decay, clip_norm=args.clip_norm,
        accum=args.accum, mesh=args.mesh, pmap=args.pmap, seed=args.seed,
        log_every=args.log_every, eval_every=args.eval_every, eval_batches=args.eval_batches,
        save_every=args.save_every, keep=args.keep, async_save=not args.sync_save,
        resume=args.resume, sample_prompt=args.sample_prompt, sample_tokens=args.sample_tokens,
        data_dir=args.data_dir, tokenizer=args.tokenizer, progress=not args.no_progress)


def run(args) -> int:
    from fmzoo.train.mesh import maybe_initialize_distributed
    try:  # every user error surfaces here, before any training
        maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        cfg = config_from_args(args)
        from fmzoo.train.loop import prepare
        prepared = prepare(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from fmzoo.train.checkpoint import CheckpointError
    from fmzoo.train.loop import TrainingDiverged, train
    try:
        summary = train(prepared)
    except TrainingDiverged as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return 3
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: step {summary.get('step')} loss {summary.get('loss', float('nan')):.4f}"
          + (f" eval loss {summary['eval_loss']:.4f}" if "eval_loss" in summary else "")
          + f"; checkpoints and metrics in {cfg.workdir}")
    if summary.get("plot"):
        print(f"loss curve: {summary['plot']}")
    return 0
