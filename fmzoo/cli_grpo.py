"""`fmzoo grpo`: GRPO / RLOO of an (SFT) LM on its own samples into a workdir
(fmzoo.train.grpo on the Trainer); the options are generated from the GRPO settings schema."""

from __future__ import annotations

HELP = "online RL with group-relative advantages (GRPO, RLOO) of an LM"

EPILOG = """examples:
  fmzoo grpo --model runs/sft --data tasks/add --workdir runs/grpo        (checker reward)
  fmzoo grpo --model runs/sft --data prompts.jsonl --reward my_rewards:fn --workdir runs/grpo
  fmzoo grpo ... --reward runs/rm                 (a reward model from fmzoo reward)
  fmzoo grpo ... --reward tasks/add:1,my_rewards:brevity:0.1   (weighted rewards)
  fmzoo grpo ... --advantage rloo; --loss-type dr_grpo --scale-rewards none; --beta 0.04
  fmzoo grpo ... --num-generations 8 --num-iterations 2 --steps-per-generation 2
  fmzoo grpo ... --lora-rank 8; --mesh data=2,fsdp=2,tensor=2 (or --pmap); --resume
then: fmzoo chat --model runs/grpo"""


def add_arguments(p):
    from fmzoo.train.config import add_arguments as add_settings
    from fmzoo.train.grpo import GRPOSettings

    from .cli_train import add_multihost_arguments
    p.epilog = EPILOG
    add_settings(p, GRPOSettings)
    add_multihost_arguments(p)


def run(args) -> int:
    from .cli_train import run_training

    def prepare(settings):
        from fmzoo.train.grpo import prepare_grpo
        return prepare_grpo(settings)
    return run_training(args, prepare)
