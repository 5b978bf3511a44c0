"""Direct Preference Optimization behind `fmzoo dpo`: an (SFT) language model learns from
preference pairs against a frozen reference, run by the Trainer.

    trainer = prepare_dpo(settings)   # every check; raises with the fix, writes nothing
    summary = trainer.run()           # trains, evaluates (rewards + exact match), saves

The loss is one of TRL's (train/dpo_loss.py: sigmoid, hinge, ipo, robust, simpo) on
preference batches (train/pref_data.py): chosen and rejected in one forward pass. The
reference is the starting model: a frozen step input sharded like the policy (with LoRA:
the frozen base itself, no second copy), or with --precompute-ref its log-probs computed
once before training and stored with the prepared data (train/dpo_ref.py). It is not in the
checkpoint: --resume reloads it from --model, which must be the run's starting point.
Metrics carry TRL's names (rewards/chosen, rewards/accuracies, logps/chosen, ...), held-out
ones with eval_; on embedded tasks each evaluation adds exact match by greedy generation.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any

from .config import Settings, _section, config_error, setting
from .reward import PrefDataSection
from .sft import (LoraOptions, SFTEvalSection, SFTRunSection, exact_match_eval, load_checker,
                  lora_spec)

if typing.TYPE_CHECKING:
    from .trainer import Trainer

# Measured from a llama-tiny SFT workdir on tasks/reverse (bench/RESULTS.md): at 1e-5 the
# held-out rewards/accuracies reach 0.81 in 40 steps and exact match holds (0.47 -> 0.50);
# at 1e-4 both log-probs sink (chosen -3.1 -> -8.0) and exact match falls to 0.25.
DPO_RECIPE = {"lr": 1e-5, "warmup": 10, "schedule": "cosine"}
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "simpo")


@dataclasses.dataclass(frozen=True)
class DPODataSection(PrefDataSection):
    batch_size: int = setting(16, "global batch size (pairs, over all processes)", min=1)


@dataclasses.dataclass(frozen=True)
class DPOSection(LoraOptions):
    NAME: typing.ClassVar[str] = "dpo"
    beta: float = setting(0.1, "the DPO temperature beta (> 0): smaller lets the policy move "
                          "further from the reference")
    loss_type: str = setting("sigmoid", "TRL's loss: sigmoid (DPO), hinge (RSO), ipo, robust, "
                             "or simpo (reference-free)", choices=LOSS_TYPES)
    label_smoothing: float = setting(0.0, "probability that a label is flipped (sigmoid: "
                                     "conservative DPO; robust), in [0, 0.5)", min=0.0)
    simpo_gamma: float = setting(0.5, "SimPO's target reward margin gamma", min=0.0)
    rpo_alpha: float = setting(0.0, "weight of RPO's NLL term on the chosen responses "
                               "(0 = off)", min=0.0)
    precompute_ref: bool = setting(False, "compute the reference log-probs once before "
                                   "training and store them with the prepared data (no "
                                   "reference forward in the step)", action="store_true")
    def __post_init__(self):
        super().__post_init__()
        from .dpo_losses import check_dpo_args
        try:
            check_dpo_args(self.beta, self.loss_type, self.label_smoothing)
        except ValueError as e:
            flags = str(e).replace("label_smoothing", "--label-smoothing").replace(
                "loss_type", "--loss-type").replace("beta must", "--beta must")
            raise config_error(flags) from None


@dataclasses.dataclass(frozen=True)
class DPORunSection(SFTRunSection):
    steps: int = setting(200, "total optimizer steps (a resumed run continues up to this)",
                         min=1)


@dataclasses.dataclass(frozen=True)
class DPOSettings(Settings):
    """The settings of `fmzoo dpo`: the common schema with its own data, eval, run and dpo
    sections."""
    data: DPODataSection = _section(DPODataSection)
    eval: SFTEvalSection = _section(SFTEvalSection)
    run: DPORunSection = _section(DPORunSection)
    dpo: DPOSection = _section(DPOSection)


def _check_reference(settings: DPOSettings, info: dict) -> None:
    """--resume: the reference is reloaded from --model, so it must be the run's start."""
    from . import checkpoint as ckpt_lib
    workdir = os.path.abspath(os.path.expanduser(settings.run.workdir))
    if not os.path.exists(os.path.join(workdir, ckpt_lib.RUN_FILE)):
        return  # the Trainer reports the missing run
    was = ckpt_lib.read_run_file(workdir).get("init", {})
    # what the start was, not what it carried (runs recorded before "generation" existed)
    where = lambda d: {k: v for k, v in d.items() if k != "generation"}  # noqa: E731
    if where(was) != where(info):
        raise config_error(
            f"--resume: the reference model is reloaded from --model, but --model is "
            f"{info.get('source')} ({info}) while the run started from {was.get('source')} "
            f"({was}); pass --model {was.get('source')} as the run began")


def loss_fns(model: Any, config: Any, settings: DPOSettings) -> tuple:
    """(train loss, eval loss) of the dpo section's knobs."""
    from .dpo_losses import dpo_step_loss
    s = settings.dpo
    kw = dict(beta=s.beta, loss_type=s.loss_type, label_smoothing=s.label_smoothing,
              rpo_alpha=s.rpo_alpha, simpo_gamma=s.simpo_gamma)
    return (dpo_step_loss(model, config, **kw),
            dpo_step_loss(model, config, deterministic=True, **kw))


def prepare_dpo(settings: DPOSettings, *, stop_after: int | None = None) -> Trainer:
    """Every check (model, reference, data, lengths, tokenizer, LoRA, mesh, batch, workdir),
    nothing written: a Trainer ready to `run()`."""
    import jax

    from fmzoo.models import registry
    from fmzoo.models.config import LMConfig

    from . import pref_data, sft_data
    from .config import with_recipe
    from .data import default_data_dir
    from .dpo_losses import REFERENCE_FREE
    from .pretrain import _tokenizer, starting_point
    from .trainer import FROZEN_BASE, Task, Trainer
    settings = with_recipe(settings, DPO_RECIPE)
    config, params, found_tok, info = starting_point(settings)
    if not isinstance(config, LMConfig):
        raise config_error(f"fmzoo dpo finetunes decoder-only language models; "
                           f"{settings.model.source!r} is a {config.family} model (pass an SFT "
                           "workdir, an LM preset or an LM HF directory)")
    d, e, s = settings.data, settings.eval, settings.dpo
    if d.max_length > config.max_len:
        raise config_error(f"--max-length {d.max_length} is longer than the model's max_len="
                           f"{config.max_len}; pass --max-length {config.max_len} or less")
    if params is None:  # a preset: policy and reference start from the same seeded init
        params = jax.device_get(registry.init(config, jax.random.key(settings.run.seed)))
        info = {**info, "seed": settings.run.seed}
    if settings.run.resume:
        _check_reference(settings, info)
    tok = _tokenizer(settings, config, found_tok)
    lora = lora_spec(settings.dpo)
    if lora is not None:
        from fmzoo.models.lora import check_spec
        check_spec(registry.param_shapes(config), lora)
    checker = load_checker(e.checker) if e.checker else None
    model = registry.build(config)
    needs_ref = s.loss_type not in REFERENCE_FREE
    in_step = needs_ref and not s.precompute_ref
    frozen = None if not in_step else FROZEN_BASE if lora is not None else params
    reference = params if needs_ref and s.precompute_ref else None
    common = dict(batch_size=d.batch_size, max_length=d.max_length,
                  padding_side=d.padding_side, data_dir=d.data_dir, **d.options)
    train_loss, eval_loss = loss_fns(model, config, settings)

    def split_batches(split: str, **kw):
        return pref_data.pref_batches(d.name, tok, split=split, **common, **kw)

    tables: dict[str, Any] = {}

    def with_ref(split: str, batches):
        """`batches` with the reference log-probs of `split` (computed once, stored)."""
        if reference is None:
            return batches
        from .dpo_ref import WithRefLogps, reference_table
        if split not in tables:
            key = {"data": d.name, "options": d.options, "split": split,
                   "max_length": d.max_length, "tokenizer_vocab": tok.vocab_size}
            tables[split] = reference_table(
                model, config, reference, lambda: split_batches(
                    split, shuffle=False, num_epochs=1, shard_index=0, shard_count=1),
                data_dir=d.data_dir or default_data_dir(), name=d.name, key=key,
                batch_size=d.batch_size)
        return WithRefLogps(batches, tables[split])

    def task() -> Task:  # the Trainer calls it once its own checks passed
        split = pref_data.pref_eval_split(d.name, data_dir=d.data_dir, **d.options)
        tasks_data = d.name.startswith("tasks/")
        examples = [] if split is None or e.examples == 0 or not tasks_data else \
            sft_data.sft_eval_prompts(d.name, tok, split=split, n=e.examples,
                                      data_dir=d.data_dir, **d.options)
        batches = with_ref("train", split_batches("train", seed=settings.run.seed))
        if split is not None:
            with_ref(split, iter(()))  # the eval split's table, computed before training

        def eval_batches():
            return with_ref(split, split_batches(split, shuffle=False, num_epochs=1,
                                                 shard_index=0, shard_count=1))
        return Task(
            loss_fn=train_loss, eval_loss_fn=eval_loss, batches=batches,
            metrics=lambda m: {"truncated_pairs": getattr(batches, "num_truncated", 0)},
            eval_batches=None if split is None else eval_batches,
            generate_eval=exact_match_eval(model, tok, examples, max_new_tokens=e.max_new_tokens,
                                           show=e.show, checker=checker) if examples else None,
            no_eval_reason=f"{d.name} has no held-out split")
    return Trainer(settings, config, task, init_params=params, init_info=info, tokenizer=tok,
                   stop_after=stop_after, lora=lora, frozen=frozen)


def dpo(settings: DPOSettings | Trainer, *, stop_after: int | None = None) -> dict:
    """Runs (or resumes) DPO; returns the run's summary."""
    from .trainer import Trainer
    trainer = settings if isinstance(settings, Trainer) else prepare_dpo(settings,
                                                                         stop_after=stop_after)
    return trainer.run()
