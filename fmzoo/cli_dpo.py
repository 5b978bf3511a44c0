"""`fmzoo dpo`: Direct Preference Optimization of an (SFT) LM into a workdir (fmzoo.train.dpo
on the Trainer); the options are generated from the DPO settings schema."""

from __future__ import annotations

HELP = "preference finetuning with DPO (sigmoid, hinge, ipo, robust, simpo) of an LM"

EPILOG = """examples:
  fmzoo dpo --model runs/sft --data tasks/mix --workdir runs/dpo --beta 0.1 --loss-type sigmoid
  fmzoo dpo --model runs/sft --data prefs.jsonl --workdir runs/dpo  (TRL prompt/chosen/rejected)
  fmzoo dpo ... --precompute-ref            (reference log-probs once, before training)
  fmzoo dpo ... --lora-rank 8               (adapters; the frozen base is the reference)
  fmzoo dpo ... --loss-type ipo --beta 0.5; --label-smoothing 0.1 (conservative DPO)
  fmzoo dpo ... --mesh data=2,fsdp=2,tensor=2 (or --pmap); --resume continues a run
then: fmzoo chat --model runs/dpo"""


def add_arguments(p):
    from fmzoo.train.config import add_arguments as add_settings
    from fmzoo.train.dpo import DPOSettings

    from .cli_train import add_multihost_arguments
    p.epilog = EPILOG
    add_settings(p, DPOSettings)
    add_multihost_arguments(p)


def run(args) -> int:
    from .cli_train import run_training

    def prepare(settings):
        from fmzoo.train.dpo import prepare_dpo
        return prepare_dpo(settings)
    return run_training(args, prepare)
