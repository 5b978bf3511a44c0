"""`fmzoo reward`: a reward model (Bradley-Terry, scalar head on an LM) trained on
preference pairs into a workdir (fmzoo.train.reward on the Trainer); the options are
generated from the reward settings schema."""

from __future__ import annotations

HELP = "train a reward model (scalar head, Bradley-Terry loss) on preference pairs"

EPILOG = """examples:
  fmzoo reward --model runs/sft --data tasks/mix --workdir runs/rm         (embedded pairs)
  fmzoo reward --model llama-tiny --data prefs.jsonl --workdir runs/rm     (TRL JSONL)
  fmzoo reward ... --center-rewards-coefficient 0.01 --max-length 256
  fmzoo reward ... --mesh data=2,fsdp=2,tensor=2 (or --pmap); --resume continues a run
then, in Python:
  m = fmzoo.load("runs/rm")
  fmzoo.train.reward.score(m.model, m.params, m.tokenizer, prompts, responses)"""


def add_arguments(p):
    from fmzoo.train.config import add_arguments as add_settings
    from fmzoo.train.reward import RewardSettings

    from .cli_train import add_multihost_arguments
    p.epilog = EPILOG
    add_settings(p, RewardSettings)
    add_multihost_arguments(p)


def run(args) -> int:
    from .cli_train import run_training

    def prepare(settings):
        from fmzoo.train.reward import prepare_reward
        return prepare_reward(settings)
    return run_training(args, prepare)
