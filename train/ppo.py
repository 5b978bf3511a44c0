"""PPO (RLHF) behind `fmzoo ppo`: an (SFT) policy and a value model trained together against
a reward (usually a reward model from `fmzoo reward`), with a KL penalty to the frozen SFT
model, on the Trainer.

    trainer = prepare_ppo(settings)   # every check; raises with the fix, writes nothing
    summary = trainer.run()           # rollouts, updates, evaluation, checkpoints

The trained model is one actor-critic (models/actor_critic.py): params {"policy", "value"}
under one optimizer, as TRL's PPOTrainer wraps them; `fmzoo.load(workdir)` gives the policy.
The value model starts from the reward model (--value-model reward, the default when
--reward is a reward-model workdir) or from the policy with a fresh score head.

Each rollout samples one completion for each of --rollout-batch prompts with the KV-cache
decoder (fixed shapes), then, as TRL does: the reference's log-probs, the value model's
per-token values, the scores (--reward), per-token rewards = -kl_coef * KL at each response
token + the score at the last one (k1; with --kl-estimator k3 the KL is a loss term
instead, kl_coef * k3 to the reference), optional reward whitening, GAE (--gamma, --lam) and
whitened advantages; then --num-ppo-epochs passes over the rollout, each shuffled and cut
into --num-mini-batches update batches of --batch-size rows, one optimizer step each.
The step's loss is the clipped policy loss + vf_coef x the clipped value loss, token-
weighted (train/rl_losses.ppo_loss). Metrics carry TRL's names: objective/kl,
objective/entropy, objective/non_score_reward, objective/rlhf_reward, objective/scores
(per rollout), loss/policy_avg, loss/value_avg, policy/approxkl_avg, policy/clipfrac_avg,
val/clipfrac_avg, policy/entropy_avg (per step); each evaluation adds greedy held-out
reward and exact match.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
from typing import Any

import numpy as np

from .config import DataSourceSection, Settings, _section, config_error, setting
from .grpo import RLRunSection, RolloutOptions
from .sft import SFTEvalSection

if typing.TYPE_CHECKING:
    from .trainer import Trainer

# TRL's PPO default learning rate (PPOConfig.learning_rate = 3e-6) is for billion-parameter
# models; the zoo's tiny SFT models move at 1e-5 as GRPO does, with no warm-up (an on-policy
# run's first rollouts are the informative ones).
PPO_RECIPE = {"lr": 1e-5, "warmup": 0, "schedule": "cosine"}
VALUE_MODELS = ("auto", "reward", "policy")


@dataclasses.dataclass(frozen=True)
class PPODataSection(DataSourceSection):
    name: str = setting("tasks/mix", "prompts: an embedded task (tasks/mix, tasks/add, ...) "
                        "or a JSONL file of TRL prompt-only records ({\"prompt\": ...} plus "
                        "columns the rewards read)", flag="--data", metavar="NAME|PATH")
    batch_size: int = setting(16, "completions per optimizer step (the PPO minibatch, "
                              "global)", min=1)
    max_length: int = setting(96, "tokens per row: prompt + completion", min=2)


@dataclasses.dataclass(frozen=True)
class PPOSection(RolloutOptions):
    NAME: typing.ClassVar[str] = "ppo"
    value_model: str = setting("auto", "where the value model starts: reward (the reward "
                               "model of --reward), policy (the policy with a fresh score "
                               "head), auto (reward when --reward is a reward-model workdir)",
                               choices=VALUE_MODELS)
    kl_coef: float = setting(0.05, "KL penalty coefficient to the reference (the SFT model)",
                             min=0.0)
    kl_estimator: str = setting("k1", "k1: log(pi/ref) per token, in the reward (TRL's "
                                "default); k3: exp(ref - logp) - (ref - logp) - 1, a loss "
                                "term", choices=("k1", "k3"))
    gamma: float = setting(1.0, "discount factor of GAE", min=0.0)
    lam: float = setting(0.95, "lambda of GAE", min=0.0)
    cliprange: float = setting(0.2, "clip range of the policy ratio", min=0.0)
    cliprange_value: float = setting(0.2, "clip range of the value update", min=0.0)
    vf_coef: float = setting(0.1, "weight of the value loss", min=0.0)
    whiten_rewards: bool = setting(False, "whiten the per-token rewards before GAE",
                                   action="store_true")
    num_ppo_epochs: int = setting(4, "passes over each rollout batch", min=1)
    num_mini_batches: int = setting(1, "update batches (optimizer steps) per pass", min=1)
    rollout_batch: int = setting(0, "prompts per rollout (one completion each; 0 = "
                                 "--batch-size x --num-mini-batches)", min=0)

    def __post_init__(self):
        super().__post_init__()
        if self.lora_rank:
            raise config_error(f"--lora-rank {self.lora_rank}: fmzoo ppo trains the policy and "
                               "the value model in full; drop --lora-rank (fmzoo grpo and dpo "
                               "take adapters)")
        if self.gamma > 1 or self.lam > 1:
            raise config_error(f"--gamma {self.gamma} / --lam {self.lam} must be in [0, 1]")

    @property
    def updates_per_rollout(self) -> int:
        return self.num_ppo_epochs * self.num_mini_batches


@dataclasses.dataclass(frozen=True)
class PPOSettings(Settings):
    """The settings of `fmzoo ppo`."""
    data: PPODataSection = _section(PPODataSection)
    eval: SFTEvalSection = _section(SFTEvalSection)
    run: RLRunSection = _section(RLRunSection)
    ppo: PPOSection = _section(PPOSection)


# ----------------------------------------------------------------------------- the loss


def ppo_step_loss(model: Any, s: PPOSection):
    """The update step's pure loss on an update batch {tokens, mask, response_mask,
    old_logps, old_values, advantages, returns[, ref_logps]} of an actor-critic `model`:
    one forward of the policy and the value model (dropout off, as in TRL)."""
    import jax

    from .rl_losses import (action_mask, entropy_from_logits, kl_k3, masked_mean, ppo_loss,
                            token_logps)

    def loss_fn(params, batch, rng=None):
        logits_NTV, values_NT = model.apply({"params": params}, batch["tokens"], batch["mask"],
                                            method=model.logits_and_values)
        logits_NTV = logits_NTV / s.temperature
        logps_NT = token_logps(logits_NTV, batch["tokens"])
        mask_NT = action_mask(batch["response_mask"])
        loss, m = ppo_loss(logps_NT, batch["old_logps"], batch["advantages"], values_NT,
                           batch["old_values"], batch["returns"], mask_NT,
                           cliprange=s.cliprange, cliprange_value=s.cliprange_value,
                           vf_coef=s.vf_coef, entropy_NT=entropy_from_logits(logits_NTV))
        if s.kl_estimator == "k3" and s.kl_coef > 0:  # the KL as a loss term (GRPO's way)
            kl = masked_mean(kl_k3(logps_NT, batch["ref_logps"]), mask_NT)
            loss = loss + s.kl_coef * kl
            m["kl"] = jax.lax.stop_gradient(kl)
        m["loss"] = jax.lax.stop_gradient(loss)
        return loss, m
    return loss_fn


# ----------------------------------------------------------------------------- rollouts


@functools.cache
def _values():
    """The jitted value forward, made once (jax is imported only when a rollout runs; the
    model is static, so each config and rollout shape compiles once): per-token values of
    a rollout, aligned as targets and masked."""
    import jax

    from .rl_losses import action_mask

    def values(model, params, tokens_NT, mask_NT, response_mask_NT):
        values_NT = model.apply({"params": params}, tokens_NT, mask_NT, method=model.values)
        return values_NT * action_mask(response_mask_NT)
    return jax.jit(values, static_argnums=0)


def make_ppo_rollout(model: Any, tok: Any, rewards: Any, s: PPOSection, *, batch_size: int,
                     max_length: int):
    """make(view, prompts) for OnPolicyBatches on an actor-critic `model`: sample with the
    policy, reference log-probs, old values, scores, per-token rewards, GAE, whitening, then
    num_ppo_epochs x num_mini_batches update batches of batch_size rows."""
    import jax
    import jax.numpy as jnp

    from fmzoo.models.chat import end_of_turn_ids
    from fmzoo.models.registry import build

    from .grpo import score_rollout
    from .onpolicy import minibatches
    from .rl_losses import (action_mask, gae, masked_whiten, ppo_rewards,
                            ppo_rollout_metrics)
    from .rollout import rollout, sequence_logps
    policy = build(model.config.policy)
    eos = end_of_turn_ids(tok)
    # k3 is a loss term: the reward then holds the score alone
    reward_kl_coef = s.kl_coef if s.kl_estimator == "k1" else 0.0

    def make(view, prompts):
        ro = rollout(policy, view.params["policy"], tok, [p["prompt_ids"] for p in prompts],
                     group_size=1, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                     top_k=s.top_k, top_p=s.top_p, eos_ids=eos,
                     rng=jax.random.fold_in(view.key, 0), mesh=view.mesh,
                     max_length=max_length)
        mask_NT = action_mask(ro.response_mask)
        ref_NT = sequence_logps(policy, view.reference["policy"], ro.tokens, ro.mask,
                                ro.response_mask, ro.temperature)
        values_NT = _values()(model, view.params, jnp.asarray(ro.tokens), jnp.asarray(ro.mask),
                            jnp.asarray(ro.response_mask))
        scores_N, metrics = score_rollout(rewards, prompts, ro)
        rewards_NT, kl_NT, non_score_NT = ppo_rewards(
            scores_N, ro.old_logps, ref_NT, mask_NT, kl_coef=reward_kl_coef,
            kl_estimator=s.kl_estimator)
        if s.whiten_rewards:
            rewards_NT = masked_whiten(rewards_NT, mask_NT, shift_mean=False) * mask_NT
        advantages_NT, returns_NT = gae(rewards_NT, values_NT, mask_NT, gamma=s.gamma,
                                        lam=s.lam)
        advantages_NT = masked_whiten(advantages_NT, mask_NT) * mask_NT
        m = ppo_rollout_metrics(scores_N, kl_NT, non_score_NT, ro.old_logps, mask_NT)
        metrics.update({k: float(v) for k, v in m.items()}, **ro.metrics())
        arrays = {"tokens": ro.tokens, "mask": ro.mask, "response_mask": ro.response_mask,
                  "old_logps": ro.old_logps,
                  **{k: np.asarray(v, np.float32) for k, v in (
                      ("old_values", values_NT), ("advantages", advantages_NT),
                      ("returns", returns_NT))}}
        if s.kl_estimator == "k3":
            arrays["ref_logps"] = np.asarray(ref_NT, np.float32)
        return minibatches(arrays, batch_size, s.num_ppo_epochs,
                           jax.random.fold_in(view.key, 1)), metrics
    return make


# ----------------------------------------------------------------------------- the command


def _reward_model_dirs(spec: str) -> list[str]:
    """The reward-model workdirs (head 'score') a --reward spec names."""
    from fmzoo.models.workdir import RUN_FILE, read_run_file

    from .rewards import RewardError, parse_reward_spec
    try:
        items = parse_reward_spec(spec)
    except RewardError as e:
        raise config_error(str(e)) from None
    return [src for src, _ in items
            if os.path.isfile(os.path.join(os.path.expanduser(src), RUN_FILE))
            and getattr(read_run_file(os.path.expanduser(src))["config"], "head", None)
            == "score"]


def value_start(settings: PPOSettings, policy_config: Any, policy_params: Any
                ) -> tuple[Any, Any, dict]:
    """(value config, value params, record) for --value-model: the reward model of --reward
    (its trunk and head), or the policy with a fresh score head (TRL's two choices)."""
    import jax

    from fmzoo.models.workdir import load_workdir

    from .reward import with_score_head
    s, m = settings.ppo, settings.model
    dirs = _reward_model_dirs(s.reward)
    kind = s.value_model if s.value_model != "auto" else "reward" if dirs else "policy"
    keep = {k: v for k, v in (("dtype", m.dtype), ("remat", m.remat)) if v}
    if kind == "reward":
        if not dirs:
            raise config_error(f"--value-model reward starts the value model from a reward "
                               f"model, but --reward {s.reward!r} names no reward-model "
                               "workdir; pass --reward RM_DIR or --value-model policy")
        path = os.path.abspath(os.path.expanduser(dirs[0]))
        loaded = load_workdir(path, **keep)
        return loaded.config, jax.device_get(loaded.params), {"kind": "reward", "source": path}
    # The policy's trunk with a ZERO score head: values start at 0, so the first advantages
    # are the returns themselves, not the noise of a random head (whose values have a
    # std near 1, far above a rollout's reward differences); TRL's head starts near 0 too
    # (N(0, 0.02) from AutoModelForSequenceClassification).
    config = policy_config.replace(head="score")
    params = with_score_head(policy_params, config, 0)
    params["score_head"] = jax.tree.map(np.zeros_like, params["score_head"])
    return config, params, {"kind": "policy"}


def prepare_ppo(settings: PPOSettings, *, stop_after: int | None = None) -> Trainer:
    """Every check (model, value model, prompts, rewards, lengths, batch, mesh, workdir),
    nothing written: a Trainer ready to `run()`."""
    import jax

    from fmzoo.models import registry
    from fmzoo.models.config import ActorCriticConfig, ConfigError, LMConfig

    from .config import with_recipe
    from .dpo import _check_reference
    from .grpo import reward_eval, rollout_inputs, section_rewards
    from .onpolicy import OnPolicyBatches, check_rollout_steps
    from .pretrain import _tokenizer, starting_point
    from .trainer import Task, Trainer
    settings = with_recipe(settings, PPO_RECIPE)
    d, e, s = settings.data, settings.eval, settings.ppo
    rollout_batch = s.rollout_batch or d.batch_size * s.num_mini_batches
    if rollout_batch % s.num_mini_batches or \
            rollout_batch // s.num_mini_batches != d.batch_size:
        raise config_error(
            f"--rollout-batch {rollout_batch} does not split into --num-mini-batches "
            f"{s.num_mini_batches} update batches of --batch-size {d.batch_size}; pass "
            f"--rollout-batch {d.batch_size * s.num_mini_batches} (or leave it out)")
    check_rollout_steps(settings.run.steps, settings.checkpoint.save_every,
                        s.updates_per_rollout, "--num-ppo-epochs x --num-mini-batches")
    if s.max_new_tokens >= d.max_length:
        raise config_error(f"--max-new-tokens {s.max_new_tokens} leaves no room for the "
                           f"prompt in --max-length {d.max_length}; raise --max-length")
    if jax.process_count() > 1:
        raise config_error("fmzoo ppo runs in one process (rollouts are read on the host); "
                           "use a mesh of this host's devices")
    config, params, found_tok, info = starting_point(settings)
    if not isinstance(config, LMConfig) or config.head != "lm":
        raise config_error(f"fmzoo ppo trains decoder-only language models; "
                           f"{settings.model.source!r} is not one (pass an SFT workdir, an LM "
                           "preset or an LM HF directory)")
    rewards = section_rewards(s)
    if params is None:  # a preset: policy and reference from the same seeded init
        params = jax.device_get(registry.init(config, jax.random.key(settings.run.seed)))
        info = {**info, "seed": settings.run.seed}
    value_config, value_params, value_info = value_start(settings, config, params)
    try:
        pair = ActorCriticConfig(policy=config, value=value_config)
    except ConfigError as err:
        raise config_error(f"--value-model {value_info['kind']} "
                           f"({value_info.get('source', 'the policy')}): {err}") from None
    if d.max_length > pair.max_len:
        raise config_error(f"--max-length {d.max_length} is longer than the model's max_len="
                           f"{pair.max_len} (policy {config.max_len}, value model "
                           f"{value_config.max_len}); pass --max-length {pair.max_len} or less")
    info = {**info, "value": value_info}
    if settings.run.resume:
        _check_reference(settings, info)
    tok = _tokenizer(settings, config, found_tok)
    prompts, held_out, width, checker = rollout_inputs(settings, config, tok,
                                                       s.max_new_tokens)
    model = registry.build(pair)
    policy = registry.build(config)
    make = make_ppo_rollout(model, tok, rewards, s, batch_size=d.batch_size,
                            max_length=d.max_length)
    init = {"policy": params, "value": value_params}

    def task() -> Task:
        batches = OnPolicyBatches(prompts, make, prompts_per_rollout=rollout_batch,
                                  updates_per_rollout=s.updates_per_rollout,
                                  seed=settings.run.seed)
        evaluate = reward_eval(policy, tok, held_out, rewards, max_new_tokens=e.max_new_tokens,
                               max_length=width + e.max_new_tokens, show=e.show,
                               checker=checker) if held_out else None
        return Task(loss_fn=ppo_step_loss(model, s), batches=batches, frozen_in_step=False,
                    metrics=lambda m: batches.pop_metrics(),
                    generate_eval=None if evaluate is None else
                    (lambda params: evaluate(params["policy"])),
                    no_eval_reason=f"{d.name} has no held-out prompts")
    # the reference is the SFT policy; the Trainer lays frozen weights out like the whole
    # param tree, so the value half rides along (unused)
    return Trainer(settings, pair, task, init_params=init, init_info=info, tokenizer=tok,
                   stop_after=stop_after, frozen=init)


def ppo(settings: PPOSettings | Trainer, *, stop_after: int | None = None) -> dict:
    """Runs (or resumes) PPO; returns the run's summary."""
    from .trainer import Trainer
    trainer = settings if isinstance(settings, Trainer) else prepare_ppo(settings,
                                                                         stop_after=stop_after)
    return trainer.run()
