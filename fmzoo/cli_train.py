"""`fmzoo train`: pretrain a model into a workdir; the options are generated from the run
settings schema (fmzoo.train.config), the run is fmzoo.train.pretrain on the Trainer."""

from __future__ import annotations

import sys

HELP = "train a model on a dataset (jit on a mesh or pmap), with eval, samples and checkpoints"

EPILOG = """examples:
  fmzoo train --model gpt-tiny --data python_docs --workdir runs/gpt-tiny --steps 1800
  fmzoo train --model rnn-seq2seq-attn --data algorithmic/reverse --workdir runs/rev --seq-len 24
  fmzoo train --model runs/gpt-tiny --data notes.txt --workdir runs/notes  (from a workdir/HF dir)
  fmzoo train ... --mesh data=2,fsdp=2,tensor=2      (or --pmap for plain data parallel)
  fmzoo train ... --dtype bfloat16 --remat full       (bf16 compute, recompute each block)
  fmzoo train ... --resume                            (continue from the latest checkpoint)
  trailing key=value pairs override model config fields, e.g. n_layers=2 dropout=0.1"""


def add_arguments(p):
    from fmzoo.train.config import Settings, add_arguments as add_settings
    p.epilog = EPILOG
    add_settings(p, Settings)
    add_multihost_arguments(p)


def add_multihost_arguments(p):
    g = p.add_argument_group("multi-host")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="HOST:PORT of process 0; when not given, $JAX_COORDINATOR_ADDRESS")
    g.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="number of processes; when not given, $JAX_NUM_PROCESSES")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="this process's index; when not given, $JAX_PROCESS_ID")


def run(args) -> int:
    def prepare(settings):
        from fmzoo.train.pretrain import prepare
        return prepare(settings)
    return run_training(args, prepare)


def run_training(args, prepare) -> int:
    """Settings from the options, multi-host set up, `prepare(settings)` -> Trainer (every
    user error reported before training), the run, and its summary and loss curve."""
    from fmzoo.train.config import from_args
    try:  # every user error surfaces here, before any training
        settings = from_args(args)
        from fmzoo.train.mesh import maybe_initialize_distributed
        maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        trainer = prepare(settings)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from fmzoo.train.checkpoint import CheckpointError
    from fmzoo.train.trainer import TrainingDiverged
    try:
        summary = trainer.run()
    except TrainingDiverged as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return 3
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax
    print(f"done: step {summary.get('step')} loss {summary.get('loss', float('nan')):.4f}"
          + (f" eval loss {summary['eval_loss']:.4f}" if "eval_loss" in summary else "")
          + (f" exact match {summary['eval_exact_match']:.3f}"
             if "eval_exact_match" in summary else "")
          + f"; checkpoints and metrics in {trainer.workdir}")
    if jax.process_index() == 0:
        from fmzoo.train.metrics import plot_metrics
        plot = plot_metrics(trainer.workdir)
        if plot:
            print(f"loss curve: {plot}")
    return 0
