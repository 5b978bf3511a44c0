"""Supervised finetuning behind `fmzoo sft`: a decoder LM learns to answer in a conversation
format, from a preset, a training workdir or a Hugging Face directory, run by the Trainer.

    trainer = prepare_sft(settings)   # every check; raises with the fix, writes nothing
    summary = trainer.run()           # trains, evaluates (loss + exact match), saves

The step is the language-model loss on SFT batches (train/sft_data.py): only the labelled
targets count (assistant/completion tokens and their end of turn, unless --loss-on all), the
mean is over labelled tokens of the global batch, token-weighted across microbatches and
devices like pretraining, on the same mesh / pmap paths. Metrics carry TRL's names: `loss`,
`mean_token_accuracy`, `num_tokens` (real input tokens so far). With --lora-rank R the base
weights are frozen and only adapters train (models/lora.py; the Trainer merges them inside
the step). Each evaluation adds held-out loss, exact match by greedy generation on held-out
prompts (the embedded tasks' checkers, the reference completion, or --checker) and a few
sampled answers.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from typing import Any, Callable

from .config import (DataSourceSection, RunSection, Section, Settings, _section, config_error,
                     setting)

if typing.TYPE_CHECKING:
    from .trainer import Trainer

# Finetuning a small pretrained model: a lower peak than pretraining's, a short warm-up.
SFT_RECIPE = {"lr": 1e-3, "warmup": 20, "schedule": "cosine"}


@dataclasses.dataclass(frozen=True)
class SFTDataSection(DataSourceSection):
    name: str = setting("tasks/mix", "instruction data: an embedded task (tasks/mix, "
                        "tasks/add, tasks/reverse, ...) or a JSONL file in TRL's formats "
                        "(messages, prompt/completion, text)", flag="--data",
                        metavar="NAME|PATH")
    batch_size: int = setting(32, "global batch size (rows, over all processes)", min=1)
    max_length: int = setting(128, "tokens per row; longer examples are truncated (counted "
                              "in the log)", min=2)


@dataclasses.dataclass(frozen=True)
class LoraOptions(Section):
    """The --lora-* options a finetuning section shares (SFT, DPO)."""
    lora_rank: int = setting(0, "LoRA rank R (0 = full finetuning): freeze the base weights "
                             "and train rank-R adapters", min=0)
    lora_alpha: float = setting(16.0, "LoRA alpha: the update is scaled by alpha / rank",
                                min=0.0)
    lora_targets: str = setting("", "comma-separated module names to adapt (default: the "
                                "attention and MLP kernels)", metavar="NAMES")


@dataclasses.dataclass(frozen=True)
class SFTSection(LoraOptions):
    NAME: typing.ClassVar[str] = "sft"
    loss_on: str = setting("completion", "which tokens carry labels: completion (assistant "
                           "turns / completions and their end of turn) or all",
                           choices=("completion", "all"))
    packing: bool = setting(False, "pack several whole examples per row (positions restart, "
                            "attention stays inside each example)", action="store_true")


@dataclasses.dataclass(frozen=True)
class SFTEvalSection(Section):
    NAME: typing.ClassVar[str] = "eval"
    every: int = setting(100, "evaluate every N steps (0 = only at the end)", min=0,
                         flag="--eval-every")
    batches: int = setting(4, "held-out batches per evaluation (loss)", min=1,
                           flag="--eval-batches")
    examples: int = setting(64, "held-out prompts answered greedily for exact match "
                            "(0 = none)", min=0, flag="--eval-examples")
    max_new_tokens: int = setting(32, "longest answer generated for exact match", min=1,
                                  flag="--eval-max-new-tokens")
    show: int = setting(3, "sampled answers shown at each evaluation", min=0,
                        flag="--eval-show")
    at_start: bool = setting(True, "no evaluation of the starting model before training",
                             flag="--no-eval-at-start", action="invert")
    checker: str | None = setting(None, "exact-match checker for user data, module:function "
                                  "called as f(prompts, completions, answers) -> list of "
                                  "floats; when not given, the embedded task's checker or "
                                  "equality with the reference completion",
                                  metavar="MODULE:FUNC")


@dataclasses.dataclass(frozen=True)
class SFTRunSection(RunSection):
    steps: int = setting(300, "total optimizer steps (a resumed run continues up to this)",
                         min=1)


@dataclasses.dataclass(frozen=True)
class SFTSettings(Settings):
    """The settings of `fmzoo sft` (the same schema as pretraining, its own data, eval and
    sft sections)."""
    data: SFTDataSection = _section(SFTDataSection)
    eval: SFTEvalSection = _section(SFTEvalSection)
    run: SFTRunSection = _section(SFTRunSection)
    sft: SFTSection = _section(SFTSection)


# ----------------------------------------------------------------------------- the loss


def sft_loss(model: Any, config: Any, *, deterministic: bool = False):
    """The LM loss on SFT batches with TRL's metric names; `num_tokens` counts the real
    input tokens (a count: summed over microbatches and devices, cumulative in the log)."""
    import jax.numpy as jnp

    from .losses import lm_loss
    base = lm_loss(model, config, deterministic=deterministic)

    def loss_fn(params, batch, rng=None):
        loss, m = base(params, batch, rng)
        real = (batch["segment_ids"] > 0).sum().astype(jnp.float32)
        return loss, {"loss": m["loss"], "mean_token_accuracy": m["accuracy"],
                      "tokens": m["tokens"], "num_tokens": real}
    return loss_fn


# ----------------------------------------------------------------------------- evaluation


def import_function(spec: str, flag: str, example: str, error: Callable = config_error
                    ) -> Callable:
    """'module:function' -> the function, imported now so a typo fails before any work;
    a bad spec raises `error(message)` naming the flag and an example."""
    module, colon, name = spec.partition(":")
    if not colon or not module or not name or ":" in name:
        raise error(f"{flag} {spec!r} is not module:function (e.g. {example})")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise error(f"{flag} {spec}: cannot import it ({e}); put the module on "
                    "PYTHONPATH and check the function name") from None
    if not callable(fn):
        raise error(f"{flag} {spec} is not a function")
    return fn


def load_checker(spec: str) -> Callable:
    """--checker 'module:function' -> the function."""
    return import_function(spec, "--checker", "mychecks:exact_number")


def score(examples: list[dict], completions: list[str], checker: Callable | None = None
          ) -> list[float]:
    """1.0 / 0.0 per example: `checker(prompts, completions, answers)` when given, else the
    embedded task's checker (examples with a "task"), else equality with the reference
    answer (surrounding whitespace ignored)."""
    if checker is not None:
        prompts = [e.get("prompt_text", "") for e in examples]
        got = [float(x) for x in checker(prompts, completions, [e["answer"] for e in examples])]
        if len(got) != len(examples):
            raise ValueError(f"the checker returned {len(got)} scores for {len(examples)} "
                             "completions; return one float per completion")
        return got
    from . import tasks
    return [float(tasks.checker_for(e["task"])(e, c)) if e.get("task") else
            float(c.strip() == str(e["answer"]).strip()) for e, c in zip(examples, completions)]


def exact_match_eval(model: Any, tok: Any, examples: list[dict], *, max_new_tokens: int,
                     show: int = 3, checker: Callable | None = None) -> Callable:
    """(params) -> ({"eval_exact_match": ..., "eval_exact_match/<task>": ...}, shown text):
    greedy answers to held-out prompts, stopped at the end of the turn, one compiled decoder
    (the prompts' shapes never change)."""
    import jax

    from fmzoo.infer import generate
    from fmzoo.models.chat import end_of_turn_ids
    eos = end_of_turn_ids(tok)
    prompts = [list(e["prompt_ids"]) for e in examples]

    def run(params) -> tuple[dict, str | None]:
        if not examples:
            return {}, None
        if jax.process_count() > 1:  # generate() reads its output on the host
            return {}, "(no exact match in multi-process runs; use fmzoo.load on the workdir)"
        outs = generate(model, params, prompts, max_new_tokens=max_new_tokens, eos_id=eos)
        completions = [tok.decode([t for t in o if t not in eos]) for o in outs]
        scores = score(examples, completions, checker)
        out = {"eval_exact_match": sum(scores) / len(scores)}
        by_task: dict[str, list[float]] = {}
        for e, s in zip(examples, scores):
            if e.get("task"):
                by_task.setdefault(e["task"], []).append(s)
        if len(by_task) > 1:
            out.update({f"eval_exact_match/{k}": sum(v) / len(v) for k, v in by_task.items()})
        shown = [f"{e.get('prompt_text', tok.decode(e['prompt_ids']))!r} -> {c!r} "
                 f"({'right' if s else 'wrong'}; answer {e['answer']!r})"
                 for e, c, s in list(zip(examples, completions, scores))[:show]]
        return out, "\n  ".join(shown) or None
    return run


# ----------------------------------------------------------------------------- the command


def lora_spec(options: LoraOptions | SFTSettings):
    """The LoraSpec of --lora-* (a section with LoraOptions, or SFT settings), or None for
    full finetuning."""
    s = options.sft if isinstance(options, Settings) else options
    if s.lora_rank == 0:
        return None
    from fmzoo.models.lora import DEFAULT_TARGETS, LoraSpec
    targets = tuple(t.strip() for t in s.lora_targets.split(",") if t.strip())
    return LoraSpec(rank=s.lora_rank, alpha=s.lora_alpha, targets=targets or DEFAULT_TARGETS)


def prepare_sft(settings: SFTSettings, *, stop_after: int | None = None) -> Trainer:
    """Every check (model, data, lengths, tokenizer, LoRA, mesh, batch, workdir), nothing
    written: a Trainer ready to `run()`."""
    from fmzoo.models import registry
    from fmzoo.models.config import LMConfig

    from . import sft_data
    from .config import with_recipe
    from .pretrain import _tokenizer, starting_point
    from .trainer import Task, Trainer
    settings = with_recipe(settings, SFT_RECIPE)
    config, params, found_tok, info = starting_point(settings)
    if not isinstance(config, LMConfig):
        raise config_error(f"fmzoo sft finetunes decoder-only language models; "
                           f"{settings.model.source!r} is a {config.family} model (pick an LM "
                           "preset such as llama-tiny, or an LM workdir / HF directory)")
    d, e = settings.data, settings.eval
    if d.max_length > config.max_len:
        raise config_error(f"--max-length {d.max_length} is longer than the model's max_len="
                           f"{config.max_len}; pass --max-length {config.max_len} or less")
    tok = _tokenizer(settings, config, found_tok)
    lora = lora_spec(settings)
    if lora is not None:  # a bad target or rank fails here, before any data is prepared
        from fmzoo.models.lora import check_spec
        check_spec(registry.param_shapes(config), lora)
    checker = load_checker(e.checker) if e.checker else None
    model = registry.build(config)
    common = dict(batch_size=d.batch_size, max_length=d.max_length, loss_on=settings.sft.loss_on,
                  packing=settings.sft.packing, data_dir=d.data_dir, **d.options)

    def task() -> Task:  # the Trainer calls it once its own checks passed
        split = sft_data.eval_split(d.name, data_dir=d.data_dir, **d.options)
        examples = [] if split is None or e.examples == 0 else sft_data.sft_eval_prompts(
            d.name, tok, split=split, n=e.examples, data_dir=d.data_dir, **d.options)
        batches = sft_data.sft_batches(d.name, tok, split="train", seed=settings.run.seed,
                                       **common)
        return Task(
            loss_fn=sft_loss(model, config),
            eval_loss_fn=sft_loss(model, config, deterministic=True),
            batches=batches,
            # examples cut to --max-length so far (read ahead by the input threads)
            metrics=lambda m: {"truncated_examples": batches.num_truncated},
            eval_batches=None if split is None else lambda: sft_data.sft_batches(
                d.name, tok, split=split, shuffle=False, num_epochs=1, shard_index=0,
                shard_count=1, **common),
            generate_eval=exact_match_eval(model, tok, examples, max_new_tokens=e.max_new_tokens,
                                           show=e.show, checker=checker) if examples else None,
            no_eval_reason=f"{d.name} has no held-out split")
    return Trainer(settings, config, task, init_params=params, init_info=info, tokenizer=tok,
                   stop_after=stop_after, lora=lora)


def sft(settings: SFTSettings | Trainer, *, stop_after: int | None = None) -> dict:
    """Runs (or resumes) supervised finetuning; returns the run's summary."""
    from .trainer import Trainer
    trainer = settings if isinstance(settings, Trainer) else prepare_sft(settings,
                                                                         stop_after=stop_after)
    return trainer.run()
