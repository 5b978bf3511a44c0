"""`fmzoo sft`: supervised finetuning of a decoder LM into a workdir (fmzoo.train.sft on the
Trainer); the options are generated from the SFT settings schema."""

from __future__ import annotations

HELP = "supervised finetuning (chat data, completion-only loss, packing, LoRA) of an LM"

EPILOG = """examples:
  fmzoo sft --model runs/base --data tasks/mix --workdir runs/sft          (embedded tasks)
  fmzoo sft --model llama-tiny --data chats.jsonl --workdir runs/chat      (TRL JSONL)
  fmzoo sft --model hf_dir --data chats.jsonl --workdir runs/lora --lora-rank 8
  fmzoo sft ... --packing --max-length 512 --loss-on all
  fmzoo sft ... --mesh data=2,fsdp=2,tensor=2 (or --pmap); --resume continues a run
then: fmzoo chat --model runs/sft"""


def add_arguments(p):
    from fmzoo.train.config import add_arguments as add_settings
    from fmzoo.train.sft import SFTSettings

    from .cli_train import add_multihost_arguments
    p.epilog = EPILOG
    add_settings(p, SFTSettings)
    add_multihost_arguments(p)


def run(args) -> int:
    from .cli_train import run_training

    def prepare(settings):
        from fmzoo.train.sft import prepare_sft
        return prepare_sft(settings)
    return run_training(args, prepare)
