"""`fmzoo ppo`: PPO (RLHF) of an (SFT) LM with a value model against a reward into a workdir
(fmzoo.train.ppo on the Trainer); the options are generated from the PPO settings schema."""

from __future__ import annotations

HELP = "online RL with PPO (RLHF): a policy and a value model against a reward"

EPILOG = """examples:
  fmzoo ppo --model runs/sft --reward runs/rm --data tasks/mix --workdir runs/ppo
            (reward model from fmzoo reward; the value model starts from it)
  fmzoo ppo --model runs/sft --reward checker --data tasks/add --workdir runs/ppo
            (the task's checker; the value model starts from the policy)
  fmzoo ppo ... --data prompts.jsonl --reward my_rewards:fn   (TRL prompt-only records)
  fmzoo ppo ... --kl-coef 0.05 --kl-estimator k3; --gamma 1 --lam 0.95; --whiten-rewards
  fmzoo ppo ... --batch-size 16 --num-mini-batches 4 --num-ppo-epochs 4
            (64 prompts per rollout, 16 optimizer steps each)
  fmzoo ppo ... --mesh data=2,fsdp=2,tensor=2 (or --pmap); --resume continues a run
then: fmzoo chat --model runs/ppo   (the workdir loads as its policy)"""


def add_arguments(p):
    from fmzoo.train.config import add_arguments as add_settings
    from fmzoo.train.ppo import PPOSettings

    from .cli_train import add_multihost_arguments
    p.epilog = EPILOG
    add_settings(p, PPOSettings)
    add_multihost_arguments(p)


def run(args) -> int:
    from .cli_train import run_training

    def prepare(settings):
        from fmzoo.train.ppo import prepare_ppo
        return prepare_ppo(settings)
    return run_training(args, prepare)
