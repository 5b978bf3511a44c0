"""Reward modelling behind `fmzoo reward`: a decoder LM with a scalar head learns a
Bradley-Terry preference from (prompt, chosen, rejected) pairs, run by the Trainer.

    trainer = prepare_reward(settings)   # every check; raises with the fix, writes nothing
    summary = trainer.run()              # trains, evaluates (held-out loss, accuracy), saves
    scores = score(model, params, tok, prompts, responses)   # a trained workdir as a reward

The model is the starting LM (preset, workdir or HF dir) with config head='score': its LM
head is dropped and a fresh Dense(d_model -> 1, no bias) reads the final hidden state at each
row's last real token (the response's EOS), as HF's *ForSequenceClassification with
num_labels=1 does. Chosen and rejected go through ONE forward pass ([B, 2, T] -> [2B, T],
train/pref_data.py's batches). The loss is TRL RewardTrainer's:

    loss = mean over pairs of -log sigmoid(r_chosen - r_rejected - margin)
           + center_rewards_coefficient * mean over pairs of (r_chosen + r_rejected)^2

(margin from the data's "margin", 0 when absent). Metrics: loss, accuracy (r_chosen >
r_rejected), margin (mean r_chosen - r_rejected), mean_reward (TRL's: the mean over chosen
and rejected), rewards/chosen and rewards/rejected (means) with rewards/chosen_std and
rewards/rejected_std (over all the pairs of a logged step or evaluation: the loss reports
mean squares, rewards/*_sq, which combine exactly across microbatches and devices, and the
command turns them into std), num_tokens (real tokens, cumulative). They are means over
PAIRS: metrics["tokens"] is the number of pairs, so microbatches, devices and one batch
agree. Evaluation gives the same names with eval_.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Sequence

from .config import RunSection, Section, Settings, _section, config_error, setting
from .sft import SFTDataSection

if typing.TYPE_CHECKING:
    from .trainer import Trainer

# From an SFT model: a lower peak than SFT's (the whole trunk moves), a short warm-up.
REWARD_RECIPE = {"lr": 5e-4, "warmup": 10, "schedule": "cosine"}


@dataclasses.dataclass(frozen=True)
class PrefDataSection(SFTDataSection):  # batch_size (in pairs) and max_length as SFT's
    name: str = setting("tasks/mix", "preference data: an embedded task (tasks/mix, "
                        "tasks/add, ...: the right answer against a wrong one) or a JSONL "
                        "file in TRL's preference format (prompt/chosen/rejected, or "
                        "chosen/rejected with an implicit prompt; optional margin)",
                        flag="--data", metavar="NAME|PATH")
    padding_side: str = setting("right", "where sequences are padded (the scores and "
                                "log-probs do not depend on it)", choices=("right", "left"))


@dataclasses.dataclass(frozen=True)
class RewardSection(Section):
    NAME: typing.ClassVar[str] = "reward"
    center_rewards_coefficient: float = setting(
        0.0, "weight of TRL's reward centering term mean((r_chosen + r_rejected)^2), which "
        "keeps the rewards near zero (e.g. 0.01; 0 = off)", min=0.0)


@dataclasses.dataclass(frozen=True)
class RewardEvalSection(Section):
    NAME: typing.ClassVar[str] = "eval"
    every: int = setting(50, "evaluate every N steps (0 = only at the end)", min=0,
                         flag="--eval-every")
    batches: int = setting(4, "held-out batches per evaluation (loss, accuracy)", min=1,
                           flag="--eval-batches")
    at_start: bool = setting(True, "no evaluation of the starting model before training",
                             flag="--no-eval-at-start", action="invert")


@dataclasses.dataclass(frozen=True)
class RewardRunSection(RunSection):
    steps: int = setting(200, "total optimizer steps (a resumed run continues up to this)",
                         min=1)


@dataclasses.dataclass(frozen=True)
class RewardSettings(Settings):
    """The settings of `fmzoo reward` (the schema of pretraining with its own data, eval,
    run and reward sections)."""
    data: PrefDataSection = _section(PrefDataSection)
    eval: RewardEvalSection = _section(RewardEvalSection)
    run: RewardRunSection = _section(RewardRunSection)
    reward: RewardSection = _section(RewardSection)


# ----------------------------------------------------------------------------- the loss


def _check_coefficient(c: float) -> None:
    if not (c >= 0.0 and c != float("inf")):
        raise ValueError(f"center_rewards_coefficient must be a finite number >= 0, got {c}; "
                         "pass 0 (off) or a small weight such as 0.01")


def bt_loss(rewards_chosen, rewards_rejected, margin=None, *,
            center_rewards_coefficient: float = 0.0):
    """Per-pair Bradley-Terry losses float32[B]: -log sigmoid(r_c - r_r - margin)
    + center_rewards_coefficient * (r_c + r_r)^2; their mean is TRL's RewardTrainer loss."""
    import jax
    import jax.numpy as jnp
    _check_coefficient(center_rewards_coefficient)
    rc = jnp.asarray(rewards_chosen, jnp.float32)
    rr = jnp.asarray(rewards_rejected, jnp.float32)
    diff = rc - rr if margin is None else rc - rr - jnp.asarray(margin, jnp.float32)
    losses = -jax.nn.log_sigmoid(diff)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (rc + rr) ** 2
    return losses


def pair_rewards(model: Any, params: Any, batch: dict, *, rngs: dict | None = None,
                 deterministic: bool = True):
    """(r_chosen[B], r_rejected[B]) of a preference batch, from one forward pass over the
    [2B, T] rows (a pair's two rows stay adjacent, so on the same device). A row with no
    real token (the padding pairs of a last batch) is read at its first position, so it
    stays finite under every attention kernel; the loss gives it no weight."""
    import jax.numpy as jnp
    B, _, T = batch["tokens"].shape
    tokens_RT = jnp.asarray(batch["tokens"]).reshape(2 * B, T)
    mask_RT = jnp.asarray(batch["mask"]).reshape(2 * B, T).astype(jnp.int32)
    empty_R = mask_RT.sum(-1) == 0
    mask_RT = mask_RT.at[:, 0].set(jnp.where(empty_R, 1, mask_RT[:, 0]))
    positions_RT = jnp.maximum(jnp.cumsum(mask_RT, -1) - 1, 0)
    r_R = model.apply({"params": params}, tokens_RT, mask_RT, positions_RT,
                      deterministic=deterministic, rngs=rngs or {}, method=model.score)
    r_B2 = r_R.reshape(B, 2)
    return r_B2[:, 0], r_B2[:, 1]


def reward_loss(model: Any, config: Any, *, center_rewards_coefficient: float = 0.0,
                deterministic: bool = False):
    """The Trainer loss `(params, batch, rng) -> (loss, metrics)` on preference batches (see
    the module docstring). A pair with no real token (a padding row) weighs nothing."""
    import jax.numpy as jnp

    from .losses import _rngs
    _check_coefficient(center_rewards_coefficient)
    if getattr(config, "head", None) != "score":
        raise ValueError("reward_loss needs a reward model (an LMConfig with head='score'); "
                         "make one with config.replace(head='score') and with_score_head")

    def loss_fn(params, batch, rng=None):
        rngs, det = _rngs(config, rng, deterministic)
        rc, rr = pair_rewards(model, params, batch, rngs=rngs, deterministic=det)
        valid_B = (batch["mask"].reshape(rc.shape[0], -1).sum(-1) > 0).astype(jnp.float32)
        pairs = valid_B.sum()
        losses = bt_loss(rc, rr, batch.get("margin"),
                         center_rewards_coefficient=center_rewards_coefficient)

        def mean(x_B):
            return (x_B * valid_B).sum() / jnp.maximum(pairs, 1.0)
        loss = mean(losses)
        metrics = {"loss": loss, "accuracy": mean((rc > rr).astype(jnp.float32)),
                   "margin": mean(rc - rr), "mean_reward": mean((rc + rr) / 2),
                   "rewards/chosen": mean(rc), "rewards/rejected": mean(rr),
                   "rewards/chosen_sq": mean(rc ** 2), "rewards/rejected_sq": mean(rr ** 2),
                   "tokens": pairs,
                   "num_tokens": batch["mask"].astype(jnp.float32).sum()}
        return loss, metrics
    return loss_fn


def std_from_squares(m: dict, prefix: str = "") -> dict:
    """Replaces rewards/{chosen,rejected}_sq of a logged row (pair means, exact over
    microbatches and devices) by rewards/{chosen,rejected}_std; edits `m` in place."""
    import math
    out = {}
    for side in ("chosen", "rejected"):
        sq = m.pop(f"{prefix}rewards/{side}_sq", None)
        mean = m.get(f"{prefix}rewards/{side}")
        if sq is not None and mean is not None:
            out[f"{prefix}rewards/{side}_std"] = math.sqrt(max(sq - mean * mean, 0.0))
    return out


# ----------------------------------------------------------------------------- the model


def with_score_head(params: Any, config: Any, rng: Any = 0) -> Any:
    """An LM's params as a reward model's (config head 'score'): the LM head (if untied) is
    dropped and a fresh score head drawn (models/transformer.py's init); the trunk is kept."""
    import jax
    import jax.numpy as jnp

    from fmzoo.models.transformer import score_head_init
    if getattr(config, "head", None) != "score":
        raise ValueError("with_score_head takes the reward model's config (head='score')")
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    out = {k: v for k, v in params.items() if k not in ("lm_head", "score_head")}
    kernel = score_head_init(config.d_model)(rng, (config.d_model, 1), config.params_dtype)
    out["score_head"] = {"kernel": jnp.asarray(kernel)}
    return out


def reward_config(config: Any, source: str) -> Any:
    """The reward model's config for a starting model: an LM gets head='score'."""
    from fmzoo.models.config import LMConfig
    if not isinstance(config, LMConfig):
        raise config_error(f"fmzoo reward trains a scalar head on a decoder-only language "
                           f"model; {source!r} is a {config.family} model (pick an LM preset "
                           "such as llama-tiny, or an LM workdir / HF directory, e.g. an SFT "
                           "run)")
    return config if config.head == "score" else config.replace(head="score")


# ----------------------------------------------------------------------------- the command


def prepare_reward(settings: RewardSettings, *, stop_after: int | None = None) -> Trainer:
    """Every check (model, data, lengths, tokenizer, mesh, batch, workdir), nothing
    written: a Trainer ready to `run()`."""
    import jax

    from fmzoo.models import registry

    from . import pref_data
    from .config import with_recipe
    from .pretrain import _tokenizer, starting_point
    from .trainer import Task, Trainer
    settings = with_recipe(settings, REWARD_RECIPE)
    lm_config, params, found_tok, info = starting_point(settings)
    config = reward_config(lm_config, settings.model.source)
    if params is not None and lm_config.head != "score":  # an LM's trunk, a fresh head
        key = jax.random.fold_in(jax.random.key(settings.run.seed), 2)
        params = with_score_head(params, config, key)
    d, coef = settings.data, settings.reward.center_rewards_coefficient
    if d.max_length > config.max_len:
        raise config_error(f"--max-length {d.max_length} is longer than the model's max_len="
                           f"{config.max_len}; pass --max-length {config.max_len} or less")
    tok = _tokenizer(settings, config, found_tok)
    model = registry.build(config)
    common = dict(batch_size=d.batch_size, max_length=d.max_length,
                  padding_side=d.padding_side, data_dir=d.data_dir, **d.options)

    def task() -> Task:  # the Trainer calls it once its own checks passed
        split = pref_data.pref_eval_split(d.name, data_dir=d.data_dir, **d.options)
        batches = pref_data.pref_batches(d.name, tok, split="train", seed=settings.run.seed,
                                         **common)

        def train_metrics(m: dict) -> dict:
            return {**std_from_squares(m), "truncated_pairs": batches.num_truncated}
        return Task(
            loss_fn=reward_loss(model, config, center_rewards_coefficient=coef),
            eval_loss_fn=reward_loss(model, config, center_rewards_coefficient=coef,
                                     deterministic=True),
            batches=batches,
            metrics=train_metrics,
            eval_metrics=functools.partial(std_from_squares, prefix="eval_"),
            eval_batches=None if split is None else lambda: pref_data.pref_batches(
                d.name, tok, split=split, shuffle=False, num_epochs=1, shard_index=0,
                shard_count=1, **common),
            no_eval_reason=f"{d.name} has no held-out split")
    return Trainer(settings, config, task, init_params=params, init_info=info, tokenizer=tok,
                   stop_after=stop_after)


def reward(settings: RewardSettings | Trainer, *, stop_after: int | None = None) -> dict:
    """Runs (or resumes) reward-model training; returns the run's summary."""
    from .trainer import Trainer
    trainer = settings if isinstance(settings, Trainer) else prepare_reward(
        settings, stop_after=stop_after)
    return trainer.run()


# ----------------------------------------------------------------------------- scoring


@functools.cache
def _scorer():
    """The jitted scoring forward, made once (jax is imported only when scoring): the model
    is a static argument, so each model config and batch shape compiles once per process."""
    import jax
    import jax.numpy as jnp

    def rows(model, params, tokens_BT, mask_BT):
        positions_BT = jnp.maximum(jnp.cumsum(mask_BT, -1) - 1, 0)
        return model.apply({"params": params}, tokens_BT, mask_BT, positions_BT,
                           method=model.score)
    return jax.jit(rows, static_argnums=0)


def _bucket(n: int, limit: int) -> int:
    """The padded length: the next power of two (at least 16), at most the model's max_len,
    so that scoring compiles for a few shapes only."""
    size = 16
    while size < n:
        size *= 2
    return min(size, limit)


def score(model: Any, params: Any, tokenizer: Any, prompts: Sequence[Any],
          responses: Sequence[Any], *, batch_size: int = 32,
          max_length: int | None = None) -> list[float]:
    """The reward model's score of each (prompt, response) pair, encoded as training encoded
    its pairs (train/pref_data.py's encode_pair: the chat template for message lists,
    bos + prompt + response + eos for strings). A pair longer than `max_length` (default:
    the model's max_len; pass the run's --max-length to match training) is cut as training
    cut it: the prompt from the left, then the response. One compiled forward per
    (batch_size, padded length) shape; rows are right-padded to a power of two."""
    import numpy as np

    from .pref_data import encode_pair, fit_pair
    config = getattr(model, "config", None)
    if getattr(config, "head", None) != "score":
        raise ValueError("score() needs a reward model (a workdir written by `fmzoo reward`, "
                         "config head='score'); this model has no score head")
    if len(prompts) != len(responses):
        raise ValueError(f"score() got {len(prompts)} prompts and {len(responses)} responses; "
                         "pass one response per prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    limit = config.max_len if max_length is None else max_length
    if not 2 <= limit <= config.max_len:
        raise ValueError(f"max_length must be in [2, max_len={config.max_len}], got {limit}")
    rows = []
    for p, r in zip(prompts, responses):
        pair = encode_pair(tokenizer, {"prompt": p, "chosen": r, "rejected": r})
        rows.append(list(fit_pair(pair, limit, tokenizer.bos_id)[0][0]))
    out: list[float] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        T = _bucket(max(len(x) for x in chunk), config.max_len)
        tokens = np.full((batch_size, T), config.pad_id, np.int32)
        mask = np.zeros((batch_size, T), np.int32)
        for j, ids in enumerate(chunk):
            tokens[j, :len(ids)], mask[j, :len(ids)] = ids, 1
        mask[len(chunk):, 0] = 1  # filler rows: one token, so every row has a last token
        got = np.asarray(_scorer()(model, params, tokens, mask))
        out.extend(float(x) for x in got[:len(chunk)])
    return out
