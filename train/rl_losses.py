"""Online RL as pure jnp functions: group advantages (GRPO, RLOO), KL estimators, the clipped
policy-gradient loss with GRPO's normalisations, and PPO's pieces (whitening, GAE, the
per-token reward, the clipped value loss, entropy), following TRL's definitions
(trl/trainer/grpo_trainer.py, rloo_trainer.py, experimental/ppo/ppo_trainer.py).

Shape letters: N completions (rows; GRPO groups are N // G consecutive rows, as a rollout
repeats each prompt G times), G group size, T row length, V vocabulary.

Per-token arrays are aligned as TARGETS, like a rollout's old_logps: position t holds the
log-prob (value, reward, advantage) of tokens[:, t + 1]. `action_mask(response_mask)` turns
a rollout's response_mask (1 on completion tokens) into that alignment; every `mask_NT`
below is such an action mask (float, 1 where the policy chose a token).

Where this differs from TRL, on purpose:
  - PPO's score is added at the last response token (TRL adds it one step past the last
    token of the truncated response, a known quirk that lands on padding for full rows).
  - policy/approxkl_avg is a masked mean (TRL's mean includes padding, where it is 0).
  - dapo normalises by the batch's token count, like bnpo: the Trainer's token weighting
    (metrics["tokens"]) makes that the whole batch's count across microbatches and devices,
    which is what TRL's num_items_in_batch is for.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
KL_ESTIMATORS = ("k1", "k3")
STD_EPS = 1e-4  # TRL's: advantages / (std + 1e-4)
WHITEN_EPS = 1e-8  # TRL's masked_whiten


def action_mask(response_mask_NT: Any) -> jax.Array:
    """response_mask (1 on completion tokens) -> float32 mask aligned as targets: position t
    is 1 when tokens[:, t + 1] is a completion token (the EOS included)."""
    r = jnp.asarray(response_mask_NT, jnp.float32)
    return jnp.concatenate([r[:, 1:], jnp.zeros_like(r[:, :1])], axis=1)


def masked_mean(x: Any, mask: Any, axis: int | None = None) -> jax.Array:
    """sum(x * mask) / sum(mask) (over `axis`, or all), 0 where the mask is empty."""
    mask = jnp.asarray(mask, jnp.float32)
    return (x * mask).sum(axis) / jnp.maximum(mask.sum(axis), 1.0)


def masked_var(x: Any, mask: Any, unbiased: bool = True) -> jax.Array:
    """Variance over the masked entries, with Bessel's correction when `unbiased` (TRL)."""
    mask = jnp.asarray(mask, jnp.float32)
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / jnp.maximum(n - 1.0, 1.0)
    return var


def masked_whiten(x: Any, mask: Any, shift_mean: bool = True) -> jax.Array:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries; shift_mean=False adds the mean
    back (TRL's reward whitening)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * jax.lax.rsqrt(var + WHITEN_EPS)
    return out if shift_mean else out + mean


# ------------------------------------------------------------------------- advantages


def _groups(rewards_N: Any, group_size: int) -> jax.Array:
    if not isinstance(group_size, numbers.Integral) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2 (GRPO and RLOO compare a "
                         f"prompt's completions with each other), got {group_size!r}; sample "
                         "several completions per prompt, e.g. --num-generations 8")
    r = jnp.asarray(rewards_N, jnp.float32)
    if r.ndim != 1 or r.shape[0] % group_size:
        raise ValueError(f"rewards must be a flat array whose length is a multiple of "
                         f"group_size={group_size}, got shape {tuple(r.shape)}")
    return r.reshape(-1, int(group_size))


def grpo_advantages(rewards_N: Any, group_size: int, scale_rewards: str | bool = "group"
                    ) -> tuple[jax.Array, dict]:
    """GRPO: (r - group mean) / (std + 1e-4), std the unbiased group std ("group"), the
    whole batch's ("batch"), or no scaling ("none"; also False; True means "group").
    Returns (advantages[N], metrics: reward, reward_std, frac_reward_zero_std)."""
    scale = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got "
                         f"{scale_rewards!r}")
    r_PG = _groups(rewards_N, group_size)
    adv_PG = r_PG - r_PG.mean(1, keepdims=True)
    if scale == "batch":
        std_PG = jnp.broadcast_to(jnp.std(r_PG, ddof=1), r_PG.shape)
    else:  # "none" keeps the group std for the zero-std metric only
        std_PG = jnp.broadcast_to(jnp.std(r_PG, axis=1, ddof=1, keepdims=True), r_PG.shape)
    if scale != "none":
        adv_PG = adv_PG / (std_PG + STD_EPS)
    r_N = r_PG.reshape(-1)
    metrics = {"reward": r_N.mean(), "reward_std": jnp.std(r_N, ddof=1),
               "frac_reward_zero_std": jnp.isclose(std_PG, 0.0).mean()}
    return adv_PG.reshape(-1), metrics


def rloo_advantages(rewards_N: Any, group_size: int, normalize: bool = False
                    ) -> tuple[jax.Array, dict]:
    """RLOO: r_i minus the mean of the other G - 1 rewards of its group; `normalize` then
    whitens over the batch, (a - mean) / (std + 1e-4) (TRL's normalize_advantages)."""
    r_PG = _groups(rewards_N, group_size)
    baseline_PG = (r_PG.sum(1, keepdims=True) - r_PG) / (group_size - 1)
    adv_N = (r_PG - baseline_PG).reshape(-1)
    if normalize:
        adv_N = (adv_N - adv_N.mean()) / (jnp.std(adv_N, ddof=1) + STD_EPS)
    r_N = r_PG.reshape(-1)
    std_PG = jnp.std(r_PG, axis=1, ddof=1)
    metrics = {"reward": r_N.mean(), "reward_std": jnp.std(r_N, ddof=1),
               "frac_reward_zero_std": jnp.isclose(std_PG, 0.0).mean()}
    return adv_N, metrics


# -------------------------------------------------------------------------------- KL


def kl_k1(logps: Any, ref_logps: Any) -> jax.Array:
    """k1 = log(pi / ref) per token (unbiased, can be negative)."""
    return logps - ref_logps


def kl_k3(logps: Any, ref_logps: Any) -> jax.Array:
    """k3 = exp(ref - logp) - (ref - logp) - 1 per token (unbiased, >= 0; GRPO's)."""
    d = ref_logps - logps
    return jnp.exp(d) - d - 1.0


def kl_estimate(logps: Any, ref_logps: Any, estimator: str = "k1") -> jax.Array:
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator must be one of {', '.join(KL_ESTIMATORS)}, got "
                         f"{estimator!r}")
    return (kl_k1 if estimator == "k1" else kl_k3)(logps, ref_logps)


# ---------------------------------------------------------------- clipped policy loss


def check_policy_loss_args(loss_type: str, epsilon_low: float, epsilon_high: float,
                           beta: float, max_completion_length: int | None) -> None:
    """The one check of the clipped loss's knobs (a command runs it before any work)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if not (0 <= epsilon_low < 1 and epsilon_high >= 0):
        raise ValueError(f"clip epsilons must satisfy 0 <= epsilon_low < 1 and epsilon_high "
                         f">= 0, got {epsilon_low}, {epsilon_high}; e.g. --epsilon 0.2")
    if not beta >= 0:
        raise ValueError(f"beta (the KL coefficient) must be >= 0, got {beta}")
    if loss_type == "dr_grpo" and not (isinstance(max_completion_length, int)
                                       and max_completion_length > 0):
        raise ValueError("loss_type 'dr_grpo' divides by max_completion_length: pass the "
                         f"rollout's max_new_tokens, got {max_completion_length!r}")


def clipped_policy_loss(logps_NT: Any, old_logps_NT: Any, advantages: Any, mask_NT: Any, *,
                        epsilon_low: float = 0.2, epsilon_high: float | None = None,
                        loss_type: str = "grpo", beta: float = 0.0, ref_logps_NT: Any = None,
                        max_completion_length: int | None = None) -> tuple[jax.Array, dict]:
    """GRPO's clipped surrogate, -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A)
    with ratio = exp(logp - old_logp), plus beta * k3 KL to the reference per token.

    advantages: [N] (one per completion) or [N, T]. Normalisation (`loss_type`):
      grpo     each sequence's token mean, then the mean over sequences  (tokens = N)
      bnpo     the mean over all tokens of the batch                     (tokens = mask sum)
      dapo     the same as bnpo here (see the module notes)              (tokens = mask sum)
      dr_grpo  sum over tokens / (N * max_completion_length)             (tokens = N)
    metrics["tokens"] is the weight the Trainer averages (micro)batches with, so k
    microbatches equal one batch. Metrics: kl (k3 token mean; with beta > 0),
    clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean (= clip_ratio)."""
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    check_policy_loss_args(loss_type, epsilon_low, epsilon_high, beta, max_completion_length)
    if beta > 0 and ref_logps_NT is None:
        raise ValueError("beta > 0 adds a KL term to the reference: pass ref_logps_NT (or "
                         "set beta=0)")
    mask = jnp.asarray(mask_NT, jnp.float32)
    adv = jnp.asarray(advantages, jnp.float32)
    adv_NT = adv[:, None] if adv.ndim == 1 else adv
    log_ratio = logps_NT - jax.lax.stop_gradient(old_logps_NT)
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -jnp.minimum(ratio * adv_NT, clipped * adv_NT)
    metrics: dict[str, jax.Array] = {}
    if beta > 0:
        kl_NT = kl_k3(logps_NT, jax.lax.stop_gradient(ref_logps_NT))
        per_token = per_token + beta * kl_NT
        metrics["kl"] = jax.lax.stop_gradient(masked_mean(kl_NT, mask))
    n_rows = jnp.float32(mask.shape[0])
    if loss_type == "grpo":
        loss = masked_mean(per_token, mask, axis=-1).mean()
        tokens = n_rows
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (n_rows * max_completion_length)
        tokens = n_rows
    else:  # bnpo, dapo
        loss = masked_mean(per_token, mask)
        tokens = mask.sum()
    low = ((ratio < 1 - epsilon_low) & (adv_NT < 0)).astype(jnp.float32)
    high = ((ratio > 1 + epsilon_high) & (adv_NT > 0)).astype(jnp.float32)
    region = jnp.maximum(low, high)
    metrics.update({"clip_ratio/low_mean": masked_mean(low, mask),
                    "clip_ratio/high_mean": masked_mean(high, mask),
                    "clip_ratio/region_mean": masked_mean(region, mask),
                    "clip_ratio": masked_mean(region, mask),
                    "policy_loss": jax.lax.stop_gradient(loss),
                    "tokens": tokens})
    return loss, metrics


# ------------------------------------------------------------------------------- PPO


def entropy_from_logits(logits_NTV: Any) -> jax.Array:
    """Per-position entropy of softmax(logits): logsumexp(l) - sum(softmax(l) l) (TRL)."""
    logits = jnp.asarray(logits_NTV, jnp.float32)
    return jax.nn.logsumexp(logits, -1) - (jax.nn.softmax(logits, -1) * logits).sum(-1)


def token_logps(logits_NTV: Any, tokens_NT: Any, temperature: float | jax.Array = 1.0
                ) -> jax.Array:
    """Target-aligned log-probs [N, T]: position t holds log softmax(logits[t] / T) at
    tokens[t + 1]; the last position (nothing to predict) holds 0."""
    lp_NTV = jax.nn.log_softmax(jnp.asarray(logits_NTV, jnp.float32)[:, :-1] / temperature, -1)
    lp_NT = jnp.take_along_axis(lp_NTV, jnp.asarray(tokens_NT)[:, 1:, None], axis=-1)[..., 0]
    return jnp.concatenate([lp_NT, jnp.zeros_like(lp_NT[:, :1])], axis=1)


def last_token_onehot(mask_NT: Any) -> jax.Array:
    """1.0 at each row's last masked position (all 0 for an empty row)."""
    mask = jnp.asarray(mask_NT, jnp.float32)
    T = mask.shape[1]
    last_N = T - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    return jax.nn.one_hot(last_N, T, dtype=jnp.float32) * (mask.sum(1, keepdims=True) > 0)


def ppo_rewards(scores_N: Any, logps_NT: Any, ref_logps_NT: Any, mask_NT: Any, *,
                kl_coef: float, kl_estimator: str = "k1") -> tuple[jax.Array, jax.Array,
                                                                    jax.Array]:
    """Per-token rewards: -kl_coef * KL(policy || ref) at every response token, plus the
    sequence's score at its last response token. Returns (rewards, kl, non_score_reward),
    each [N, T] and 0 off the mask."""
    mask = jnp.asarray(mask_NT, jnp.float32)
    kl_NT = kl_estimate(logps_NT, ref_logps_NT, kl_estimator) * mask
    non_score_NT = -kl_coef * kl_NT
    rewards_NT = non_score_NT + jnp.asarray(scores_N, jnp.float32)[:, None] * \
        last_token_onehot(mask)
    return rewards_NT, kl_NT, non_score_NT


def gae(rewards_NT: Any, values_NT: Any, mask_NT: Any, *, gamma: float, lam: float
        ) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over the masked (response) positions, right to
    left: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, with
    V and A zero past the response (the episode ends at its last token).
    Returns (advantages, returns = advantages + values), both 0 off the mask."""
    mask = jnp.asarray(mask_NT, jnp.float32)
    r_TN, v_TN, m_TN = (jnp.swapaxes(jnp.asarray(x, jnp.float32) * mask, 0, 1)
                        for x in (rewards_NT, values_NT, mask))

    def step(carry, xs):
        next_value_N, next_adv_N = carry
        r_N, v_N, m_N = xs
        delta_N = r_N + gamma * next_value_N - v_N
        adv_N = (delta_N + gamma * lam * next_adv_N) * m_N
        return (v_N, adv_N), adv_N

    zeros = jnp.zeros_like(r_TN[0])
    _, adv_TN = jax.lax.scan(step, (zeros, zeros), (r_TN, v_TN, m_TN), reverse=True)
    adv_NT = jnp.swapaxes(adv_TN, 0, 1)
    return adv_NT, (adv_NT + v_TN.swapaxes(0, 1)) * mask


def clipped_value_loss(values_NT: Any, old_values_NT: Any, returns_NT: Any, mask_NT: Any, *,
                       cliprange_value: float) -> tuple[jax.Array, jax.Array]:
    """0.5 * masked mean of max((v - R)^2, (clip(v, v_old +- c) - R)^2), and the fraction
    of tokens where the clipped term is the larger (val/clipfrac)."""
    v_clipped = jnp.clip(values_NT, old_values_NT - cliprange_value,
                         old_values_NT + cliprange_value)
    l1 = (values_NT - returns_NT) ** 2
    l2 = (v_clipped - returns_NT) ** 2
    loss = 0.5 * masked_mean(jnp.maximum(l1, l2), mask_NT)
    return loss, masked_mean((l2 > l1).astype(jnp.float32), mask_NT)


def ppo_loss(logps_NT: Any, old_logps_NT: Any, advantages_NT: Any, values_NT: Any,
             old_values_NT: Any, returns_NT: Any, mask_NT: Any, *, cliprange: float = 0.2,
             cliprange_value: float = 0.2, vf_coef: float = 0.1, entropy_NT: Any = None
             ) -> tuple[jax.Array, dict]:
    """PPO's loss: masked mean of max(-A ratio, -A clip(ratio, 1 +- cliprange)) plus
    vf_coef * the clipped value loss. Metrics with TRL's names (loss/policy_avg,
    loss/value_avg, policy/approxkl_avg = 0.5 mean (logp - old)^2, policy/clipfrac_avg,
    val/clipfrac_avg, policy/entropy_avg with entropy_NT) and tokens = response tokens."""
    mask = jnp.asarray(mask_NT, jnp.float32)
    diff = logps_NT - jax.lax.stop_gradient(old_logps_NT)
    ratio = jnp.exp(diff)
    pg1 = -advantages_NT * ratio
    pg2 = -advantages_NT * jnp.clip(ratio, 1 - cliprange, 1 + cliprange)
    pg_loss = masked_mean(jnp.maximum(pg1, pg2), mask)
    vf_loss, vf_clipfrac = clipped_value_loss(values_NT, jax.lax.stop_gradient(old_values_NT),
                                              returns_NT, mask, cliprange_value=cliprange_value)
    sg = jax.lax.stop_gradient
    metrics = {"loss/policy_avg": sg(pg_loss), "loss/value_avg": sg(vf_loss),
               "policy/approxkl_avg": sg(0.5 * masked_mean(diff ** 2, mask)),
               "policy/clipfrac_avg": masked_mean((pg2 > pg1).astype(jnp.float32), mask),
               "val/clipfrac_avg": vf_clipfrac, "tokens": mask.sum()}
    if entropy_NT is not None:
        metrics["policy/entropy_avg"] = sg(masked_mean(entropy_NT, mask))
    return pg_loss + vf_coef * vf_loss, metrics


def ppo_rollout_metrics(scores_N: Any, kl_NT: Any, non_score_NT: Any, old_logps_NT: Any,
                        mask_NT: Any) -> dict:
    """A rollout batch's objective/* metrics as TRL logs them: per-sequence sums averaged
    over sequences (objective/entropy is the sampled tokens' -log-prob sum)."""
    mask = jnp.asarray(mask_NT, jnp.float32)
    scores = jnp.asarray(scores_N, jnp.float32)
    non_score = (non_score_NT * mask).sum(1).mean()
    return {"objective/kl": (kl_NT * mask).sum(1).mean(),
            "objective/entropy": (-old_logps_NT * mask).sum(1).mean(),
            "objective/non_score_reward": non_score,
            "objective/rlhf_reward": non_score + scores.mean(),
            "objective/scores": scores.mean()}
