"""GRPO and RLOO behind `fmzoo grpo`: an (SFT) language model improves on its own samples,
scored by reward functions, on the Trainer.

    trainer = prepare_grpo(settings)  # every check; raises with the fix, writes nothing
    summary = trainer.run()           # rollouts, updates, evaluation, checkpoints

Each rollout samples G = --num-generations completions for each of
--batch-size x --steps-per-generation / G prompts with the KV-cache decoder (one compiled
program, fixed shapes), scores them (--reward: the task checker, a reward model, a judge,
module:function; weighted), turns the rewards into group-relative advantages (GRPO's
(r - mean) / std, or RLOO's leave-one-out baseline with --advantage rloo), and feeds
steps_per_generation x num_iterations updates of the clipped surrogate (train/rl_losses.py:
loss types grpo, bnpo, dr_grpo, dapo; k3 KL to the frozen reference with --beta > 0).
The old log-probs are the sampler's own (equal to the training forward's; tests/test_rl.py);
the reference's are computed once per rollout. Metrics carry TRL's names: reward,
reward_std, rewards/<name>/mean, kl, clip_ratio/*, completions/mean_length, ...; each
evaluation adds greedy held-out exact match and reward.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import numpy as np

from .config import DataSourceSection, Settings, _section, config_error, setting
from .sft import LoraOptions, SFTEvalSection, SFTRunSection, lora_spec

if typing.TYPE_CHECKING:
    from .trainer import Trainer

# Measured on tasks/reverse from a llama-tiny SFT workdir (bench/RESULTS.md, bench/rl.py):
# 1e-5 left held-out exact match unchanged in 60 steps; 5e-5 raised it most (1e-4 less).
GRPO_RECIPE = {"lr": 5e-5, "warmup": 0, "schedule": "cosine"}
ADVANTAGES = ("grpo", "rloo")


@dataclasses.dataclass(frozen=True)
class GRPODataSection(DataSourceSection):
    name: str = setting("tasks/mix", "prompts: an embedded task (tasks/mix, tasks/add, ...) "
                        "or a JSONL file of TRL prompt-only records ({\"prompt\": ...} plus "
                        "columns the rewards read)", flag="--data", metavar="NAME|PATH")
    batch_size: int = setting(32, "completions per optimizer step (global)", min=1)
    max_length: int = setting(96, "tokens per row: prompt + completion", min=2)


@dataclasses.dataclass(frozen=True)
class RolloutOptions(LoraOptions):
    """Sampling and reward options an online-RL section shares (GRPO, PPO)."""
    reward: str = setting("checker", "reward(s): checker (the embedded task's), tasks/NAME, "
                          "a reward-model workdir, judge:MODEL, module:function; weighted "
                          "as a:0.5,b:1", metavar="SPEC")
    max_new_tokens: int = setting(16, "longest sampled completion", min=1)
    temperature: float = setting(1.0, "sampling temperature (> 0)")
    top_k: int = setting(0, "sample among the k most likely tokens (0 = all)", min=0)
    top_p: float = setting(1.0, "nucleus sampling mass (1 = off)", min=0.0)
    missing_eos_penalty: float = setting(0.0, "subtracted from the reward of completions "
                                         "cut at --max-new-tokens (0 = off)", min=0.0)

    def __post_init__(self):
        super().__post_init__()
        if not self.temperature > 0:
            raise config_error(f"--temperature {self.temperature}: online RL samples; pass "
                               "a temperature > 0, e.g. 1.0")
        if not 0 < self.top_p <= 1:
            raise config_error(f"--top-p {self.top_p} must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class GRPOSection(RolloutOptions):
    NAME: typing.ClassVar[str] = "grpo"
    num_generations: int = setting(8, "G: completions sampled per prompt (>= 2: advantages "
                                   "compare a prompt's completions)", min=1)
    advantage: str = setting("grpo", "grpo: (r - group mean) / group std; rloo: r minus the "
                             "mean of the group's other rewards", choices=ADVANTAGES)
    scale_rewards: str = setting("group", "GRPO's std scaling: group, batch or none (Dr. "
                                 "GRPO)", choices=("group", "batch", "none"))
    loss_type: str = setting("grpo", "normalisation: grpo (per sequence), bnpo / dapo (per "
                             "token), dr_grpo (by max completion length)",
                             choices=("grpo", "bnpo", "dr_grpo", "dapo"))
    beta: float = setting(0.0, "k3 KL coefficient to the reference (0 = no reference)",
                          min=0.0)
    epsilon: float = setting(0.2, "clip range of the ratio (low side)", min=0.0)
    epsilon_high: float = setting(0.0, "clip range above 1 (0 = --epsilon; DAPO uses 0.28)",
                                  min=0.0)
    num_iterations: int = setting(1, "updates on each rollout batch (mu)", min=1)
    steps_per_generation: int = setting(1, "optimizer steps each rollout feeds per iteration",
                                        min=1)

    def __post_init__(self):
        super().__post_init__()
        if self.num_generations < 2:
            raise config_error(f"--num-generations {self.num_generations}: GRPO and RLOO "
                               "compare a prompt's completions with each other; sample "
                               "at least 2, e.g. --num-generations 8")

    @property
    def updates_per_rollout(self) -> int:
        return self.num_iterations * self.steps_per_generation


@dataclasses.dataclass(frozen=True)
class RLRunSection(SFTRunSection):
    """The run section of the online-RL commands (GRPO, PPO)."""
    steps: int = setting(100, "total optimizer steps (a resumed run continues up to this)",
                         min=1)


@dataclasses.dataclass(frozen=True)
class GRPOSettings(Settings):
    """The settings of `fmzoo grpo`."""
    data: GRPODataSection = _section(GRPODataSection)
    eval: SFTEvalSection = _section(SFTEvalSection)
    run: RLRunSection = _section(RLRunSection)
    grpo: GRPOSection = _section(GRPOSection)


# ----------------------------------------------------------------------------- the loss


def grpo_loss(model: Any, *, beta: float, epsilon: float, epsilon_high: float,
              loss_type: str, temperature: float, max_new_tokens: int):
    """The update step's pure loss on an update batch {tokens, mask, response_mask,
    old_logps, advantages[, ref_logps]}: the clipped surrogate of the current policy's
    log-probs (one forward, dropout off as in TRL's RL trainers)."""
    from .rl_losses import action_mask, clipped_policy_loss, entropy_from_logits, masked_mean
    from .rollout import forward_logps

    def loss_fn(params, batch, rng=None):
        logps_NT, logits_NTV = forward_logps(model, params, batch["tokens"], batch["mask"],
                                             temperature)
        mask_NT = action_mask(batch["response_mask"])
        loss, m = clipped_policy_loss(
            logps_NT, batch["old_logps"], batch["advantages"], mask_NT, epsilon_low=epsilon,
            epsilon_high=epsilon_high, loss_type=loss_type, beta=beta,
            ref_logps_NT=batch.get("ref_logps"), max_completion_length=max_new_tokens)
        import jax
        m["entropy"] = jax.lax.stop_gradient(
            masked_mean(entropy_from_logits(logits_NTV / temperature), mask_NT))
        m["num_tokens"] = mask_NT.sum()
        m["loss"] = jax.lax.stop_gradient(loss)
        return loss, m
    return loss_fn


# ----------------------------------------------------------------------------- rollouts


def score_rollout(rewards: Any, prompts: list, ro: Any) -> tuple[np.ndarray, dict]:
    """(rewards[N], metrics rewards/<name>/mean|std) of a rollout: each reward function gets
    the rows' prompts, completions, the data's columns, has_eos and group_size."""
    from .prompt_data import columns
    cols = {k: ro.expand(v) for k, v in columns(prompts).items()}
    total, per = rewards.score(ro.expand([p["prompt"] for p in prompts]), ro.completions,
                               has_eos=ro.has_eos.tolist(), group_size=ro.group_size, **cols)
    metrics = {}
    for name, r in per.items():
        metrics[f"rewards/{name}/mean"] = float(r.mean())
        metrics[f"rewards/{name}/std"] = float(r.std(ddof=1)) if len(r) > 1 else 0.0
    return total, metrics


def make_grpo_rollout(model, tok, rewards, s: GRPOSection, *, batch_size: int,
                      max_length: int):
    """make(view, prompts) for OnPolicyBatches: sample, score, advantages, reference
    log-probs, then steps_per_generation x num_iterations update batches."""
    import jax

    from fmzoo.models.chat import end_of_turn_ids

    from .onpolicy import minibatches
    from .rl_losses import grpo_advantages, rloo_advantages
    from .rollout import rollout, sequence_logps
    eos = end_of_turn_ids(tok)

    def make(view, prompts):
        ro = rollout(model, view.params, tok, [p["prompt_ids"] for p in prompts],
                     group_size=s.num_generations, max_new_tokens=s.max_new_tokens,
                     temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, eos_ids=eos,
                     rng=jax.random.fold_in(view.key, 0), mesh=view.mesh,
                     max_length=max_length)
        total, metrics = score_rollout(rewards, prompts, ro)
        if s.advantage == "rloo":
            adv, m = rloo_advantages(total, s.num_generations)
        else:
            adv, m = grpo_advantages(total, s.num_generations, s.scale_rewards)
        metrics.update({k: float(v) for k, v in m.items()}, **ro.metrics())
        arrays = {**ro.arrays(), "advantages": np.asarray(adv, np.float32)}
        arrays.pop("has_eos")
        if s.beta > 0:
            arrays["ref_logps"] = np.asarray(sequence_logps(
                model, view.reference, ro.tokens, ro.mask, ro.response_mask, ro.temperature))
        batches = minibatches(arrays, batch_size, s.num_iterations,
                              jax.random.fold_in(view.key, 1))
        return batches, metrics
    return make


def reward_eval(model, tok, prompts: list, rewards: Any, *, max_new_tokens: int,
                max_length: int, show: int = 3, checker: Any = None):
    """(params) -> ({eval_reward, eval_exact_match (when the prompts have answers)}, shown
    text): greedy answers to held-out prompts, one compiled decoder."""
    import jax

    from fmzoo.models.chat import end_of_turn_ids

    from .rewards import RewardError
    from .rollout import rollout
    from .sft import score
    eos = end_of_turn_ids(tok)

    def run(params):
        if jax.process_count() > 1:
            return {}, "(no generation eval in multi-process runs; use fmzoo.load)"
        ro = rollout(model, params, tok, [p["prompt_ids"] for p in prompts], group_size=1,
                     max_new_tokens=max_new_tokens, temperature=0.0, eos_ids=eos,
                     max_length=max_length)
        out, out_note = {}, None
        try:
            total, _ = score_rollout(rewards, prompts, ro)
            out["eval_reward"] = float(total.mean())
        except RewardError as e:  # e.g. a judge reward compares a group; one answer here
            out_note = f"(no eval_reward: {e})"
        examples = [{"prompt_text": p["prompt_text"], "answer": p["columns"]["answer"],
                     "task": p["columns"].get("task")} for p in prompts
                    if "answer" in p["columns"]]
        if len(examples) == len(prompts):
            scores = score(examples, ro.completions, checker)
            out["eval_exact_match"] = sum(scores) / len(scores)
        shown = [f"{p['prompt_text']!r} -> {c!r}" for p, c in
                 list(zip(prompts, ro.completions))[:show]]
        text = "\n  ".join([x for x in [out_note] if x] + shown) or None
        return out, text
    return run


# ----------------------------------------------------------------------------- the command


def prepare_grpo(settings: GRPOSettings, *, stop_after: int | None = None) -> Trainer:
    """Every check (model, prompts, rewards, lengths, batch, LoRA, mesh, workdir), nothing
    written: a Trainer ready to `run()`."""
    import jax

    from fmzoo.models import registry
    from fmzoo.models.config import LMConfig

    from .config import with_recipe
    from .dpo import _check_reference
    from .onpolicy import OnPolicyBatches, check_rollout_steps
    from .pretrain import _tokenizer, starting_point
    from .rl_losses import check_policy_loss_args
    from .trainer import FROZEN_BASE, Task, Trainer
    settings = with_recipe(settings, GRPO_RECIPE)
    config, params, found_tok, info = starting_point(settings)
    if not isinstance(config, LMConfig) or config.head != "lm":
        raise config_error(f"fmzoo grpo trains decoder-only language models; "
                           f"{settings.model.source!r} is not one (pass an SFT workdir, an LM "
                           "preset or an LM HF directory)")
    d, e, s = settings.data, settings.eval, settings.grpo
    if jax.process_count() > 1:
        raise config_error("fmzoo grpo runs in one process (rollouts are read on the host); "
                           "use a mesh of this host's devices")
    if d.max_length > config.max_len:
        raise config_error(f"--max-length {d.max_length} is longer than the model's max_len="
                           f"{config.max_len}; pass --max-length {config.max_len} or less")
    if s.max_new_tokens >= d.max_length:
        raise config_error(f"--max-new-tokens {s.max_new_tokens} leaves no room for the "
                           f"prompt in --max-length {d.max_length}; raise --max-length")
    completions = d.batch_size * s.steps_per_generation
    if completions % s.num_generations:
        raise config_error(f"--batch-size {d.batch_size} x --steps-per-generation "
                           f"{s.steps_per_generation} = {completions} completions per rollout "
                           f"is not a multiple of --num-generations {s.num_generations}")
    check_rollout_steps(settings.run.steps, settings.checkpoint.save_every,
                        s.updates_per_rollout, "--num-iterations x --steps-per-generation")
    epsilon_high = s.epsilon_high or s.epsilon
    try:
        check_policy_loss_args(s.loss_type, s.epsilon, epsilon_high, s.beta, s.max_new_tokens)
    except ValueError as err:
        raise config_error(str(err)) from None
    rewards = section_rewards(s)
    if params is None:  # a preset: policy and reference from the same seeded init
        params = jax.device_get(registry.init(config, jax.random.key(settings.run.seed)))
        info = {**info, "seed": settings.run.seed}
    if settings.run.resume and s.beta > 0:
        _check_reference(settings, info)
    tok = _tokenizer(settings, config, found_tok)
    lora = lora_spec(s)
    if lora is not None:
        from fmzoo.models.lora import check_spec
        check_spec(registry.param_shapes(config), lora)
    prompts, held_out, width, checker = rollout_inputs(settings, config, tok,
                                                       s.max_new_tokens)
    model = registry.build(config)
    frozen = None if s.beta == 0 else FROZEN_BASE if lora is not None else params
    loss = grpo_loss(model, beta=s.beta, epsilon=s.epsilon, epsilon_high=epsilon_high,
                     loss_type=s.loss_type, temperature=s.temperature,
                     max_new_tokens=s.max_new_tokens)
    make = make_grpo_rollout(model, tok, rewards, s, batch_size=d.batch_size,
                             max_length=d.max_length)

    def task() -> Task:
        batches = OnPolicyBatches(prompts, make, prompts_per_rollout=completions //
                                  s.num_generations, updates_per_rollout=s.updates_per_rollout,
                                  seed=settings.run.seed)
        return Task(loss_fn=loss, batches=batches, frozen_in_step=False,
                    metrics=lambda m: batches.pop_metrics(),
                    generate_eval=reward_eval(model, tok, held_out, rewards,
                                              max_new_tokens=e.max_new_tokens,
                                              max_length=width + e.max_new_tokens,
                                              show=e.show, checker=checker)
                    if held_out else None,
                    no_eval_reason=f"{d.name} has no held-out prompts")
    return Trainer(settings, config, task, init_params=params, init_info=info, tokenizer=tok,
                   stop_after=stop_after, lora=lora, frozen=frozen)


def section_rewards(s: RolloutOptions) -> Any:
    """The Rewards of a section's --reward and --missing-eos-penalty, every source built
    now (a typo fails before any work) -> ConfigError with the fix."""
    from .rewards import RewardError, load_rewards
    try:
        return load_rewards(s.reward, missing_eos_penalty=s.missing_eos_penalty or None)
    except (RewardError, FileNotFoundError) as err:
        raise config_error(str(err)) from None


def rollout_inputs(settings: Settings, config: Any, tok: Any, max_new_tokens: int
                   ) -> tuple[list, list, int, Any]:
    """What every online-RL command reads before training: (training prompts, held-out
    prompts, the decoder's prompt width, the exact-match checker). Prompts longer than the
    width (--max-length - --max-new-tokens) are left out; none fitting is an error."""
    from . import prompt_data
    from .sft import load_checker
    d, e = settings.data, settings.eval
    checker = load_checker(e.checker) if e.checker else None
    width = d.max_length - max_new_tokens
    if width + e.max_new_tokens > config.max_len:
        raise config_error(f"--eval-max-new-tokens {e.max_new_tokens} with prompts of up to "
                           f"{width} tokens passes the model's max_len={config.max_len}; "
                           "lower it")
    prompts = _fitting(prompt_data.load_prompts(d.name, tok, **d.options), width, d.name)
    split = prompt_data.eval_split(d.name, **d.options)
    held_out = [] if split is None or e.examples == 0 else _fitting(prompt_data.load_prompts(
        d.name, tok, split=split, limit=e.examples, **d.options), width, d.name)
    return prompts, held_out, width, checker


def _fitting(prompts: list, width: int, name: str) -> list:
    """The prompts that fit the decoder's prompt width; none -> a clear error."""
    kept = [p for p in prompts if len(p["prompt_ids"]) <= width]
    if not kept:
        longest = min(len(p["prompt_ids"]) for p in prompts)
        raise config_error(f"no prompt of {name} fits: the shortest has {longest} tokens but "
                           f"--max-length - --max-new-tokens leaves {width}; raise --max-length")
    return kept


def grpo(settings: GRPOSettings | Trainer, *, stop_after: int | None = None) -> dict:
    """Runs (or resumes) GRPO / RLOO; returns the run's summary."""
    from .trainer import Trainer
    trainer = settings if isinstance(settings, Trainer) else prepare_grpo(settings,
                                                                          stop_after=stop_after)
    return trainer.run()
