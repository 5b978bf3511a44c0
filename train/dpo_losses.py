"""The DPO family as pure functions: TRL's losses, sequence log-probs from one concatenated
forward pass, and the step loss with TRL's metric names.

Shape letters: B pairs, N = 2B rows (chosen and rejected of a pair adjacent), T row length,
V vocabulary. A preference batch (the issue 11 contract) holds tokens / mask int32[B, 2, T],
response_mask float32[B, 2, T], margin float32[B], index int32[B] and, with a precomputed
reference, ref_logps float32[B, 2] (summed log-probs of the reference model).

Length normalisation (ipo, simpo): TRL divides each sequence's summed log-prob by its
number of response tokens for these losses, for the policy and the reference alike. Here
that happens in `dpo_step_loss` (the caller of `dpo_loss`): `dpo_loss` itself takes
whatever log-probs it is given, so pass mean log-probs for ipo / simpo when calling it
directly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "simpo")
MEAN_LOGPS = ("ipo", "simpo")  # losses that see length-normalised log-probs (TRL)
REFERENCE_FREE = ("simpo",)


def check_dpo_args(beta: float, loss_type: str, label_smoothing: float) -> None:
    """The one check of dpo_loss's knobs (also run by DPOSettings before any work)."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (the DPO temperature), got {beta}; pass e.g. "
                         "--beta 0.1")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type in ("hinge", "ipo"):
        raise ValueError(f"label_smoothing applies to the sigmoid, robust and simpo losses, "
                         f"not to {loss_type}; leave it at 0")


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             simpo_gamma: float = 0.5):
    """(losses[B], chosen_rewards[B], rejected_rewards[B]) as TRL defines them.

    With h = (chosen - rejected) - (ref_chosen - ref_rejected) and eps = label_smoothing:
      sigmoid  -log s(beta h) (1 - eps) - log s(-beta h) eps   (eps > 0: conservative DPO)
      robust   (-log s(beta h) (1 - eps) + log s(-beta h) eps) / (1 - 2 eps)
      hinge    relu(1 - beta h)
      ipo      (h - 1 / (2 beta))^2                            (mean log-probs, see above)
      simpo    sigmoid's formula on h = chosen - rejected - simpo_gamma / beta
               (reference-free: the ref_* arguments are ignored; mean log-probs)
    rewards = beta * (policy - reference) log-probs (simpo: beta * policy log-probs), with
    stop_gradient. beta <= 0 raises ValueError.
    """
    check_dpo_args(beta, loss_type, label_smoothing)
    chosen_logps = jnp.asarray(chosen_logps, jnp.float32)
    rejected_logps = jnp.asarray(rejected_logps, jnp.float32)
    eps = label_smoothing
    if loss_type in REFERENCE_FREE:
        h = chosen_logps - rejected_logps - simpo_gamma / beta
        ref_chosen, ref_rejected = 0.0, 0.0
    else:
        ref_chosen = jnp.asarray(ref_chosen_logps, jnp.float32)
        ref_rejected = jnp.asarray(ref_rejected_logps, jnp.float32)
        h = (chosen_logps - rejected_logps) - (ref_chosen - ref_rejected)
    log_sig = jax.nn.log_sigmoid
    if loss_type in ("sigmoid", "simpo"):
        losses = -log_sig(beta * h) * (1 - eps) - log_sig(-beta * h) * eps
    elif loss_type == "robust":
        losses = (-log_sig(beta * h) * (1 - eps) + log_sig(-beta * h) * eps) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * h)
    else:  # ipo
        losses = (h - 1 / (2 * beta)) ** 2
    chosen_rewards = jax.lax.stop_gradient(beta * (chosen_logps - ref_chosen))
    rejected_rewards = jax.lax.stop_gradient(beta * (rejected_logps - ref_rejected))
    return losses, chosen_rewards, rejected_rewards


# ----------------------------------------------------------------------------- log-probs


def _rows(x_B2T: jax.Array) -> jax.Array:
    """[B, 2, T] -> [2B, T], row-major: a pair's chosen and rejected stay adjacent."""
    return x_B2T.reshape(-1, x_B2T.shape[-1])


def sequence_logps(model: Any, params: Any, batch: dict, *, rng: jax.Array | None = None,
                   deterministic: bool = True, config: Any = None) -> dict:
    """One forward pass over the 2B rows: {"logps": summed log-probs of the response tokens
    [B, 2], "counts": response tokens [B, 2], "mean_logits": mean logit over the response
    positions [B, 2], "nll": token NLL [B, 2, T-1] weighted 0 off the response}.

    Positions come from the mask, and the mask is the model's padding mask, so the amount
    and side of padding change nothing."""
    from .losses import _rngs
    tokens_NT = _rows(batch["tokens"])
    mask_NT = _rows(batch["mask"])
    weights_NT = _rows(batch["response_mask"]).astype(jnp.float32)[:, 1:]
    positions_NT = jnp.maximum(jnp.cumsum(mask_NT, axis=-1) - 1, 0).astype(jnp.int32)
    rngs, det = _rngs(config, rng, deterministic)
    logits_NTV = model.apply({"params": params}, tokens_NT, positions_BT=positions_NT,
                             padding_mask_BT=mask_NT, deterministic=det, rngs=rngs)
    logits_NTV = logits_NTV[:, :-1].astype(jnp.float32)  # position t predicts token t + 1
    nll_NT = optax.softmax_cross_entropy_with_integer_labels(logits_NTV, tokens_NT[:, 1:])
    counts_N = weights_NT.sum(-1)
    logps_N = -(nll_NT * weights_NT).sum(-1)
    mean_logits_N = (logits_NTV.mean(-1) * weights_NT).sum(-1) / jnp.maximum(counts_N, 1.0)
    B = batch["tokens"].shape[0]
    return {"logps": logps_N.reshape(B, 2), "counts": counts_N.reshape(B, 2),
            "mean_logits": mean_logits_N.reshape(B, 2)}


def reference_logps(model: Any, params: Any, batch: dict) -> jax.Array:
    """The reference's summed response log-probs [B, 2] (deterministic, no gradient)."""
    return jax.lax.stop_gradient(sequence_logps(model, params, batch)["logps"])


# ----------------------------------------------------------------------------- the step


def dpo_step_loss(model: Any, config: Any, *, beta: float, loss_type: str = "sigmoid",
                  label_smoothing: float = 0.0, rpo_alpha: float = 0.0,
                  simpo_gamma: float = 0.5, deterministic: bool = False):
    """The pure loss `(params, batch, rng, frozen=None) -> (loss, metrics)` of one DPO step.

    The reference log-probs come from batch["ref_logps"] (precomputed) when present, else
    from a forward pass of `frozen` (the reference weights, a frozen step input), and are
    not needed for simpo. The loss is the mean over pairs (TRL); metrics["tokens"] is the
    number of pairs (a pair counts when both responses hold a labelled token), so
    microbatches and devices weigh exactly; "num_tokens" counts real input tokens.
    rpo_alpha > 0 adds TRL's RPO term: alpha * the chosen response's NLL (here a per-pair
    token mean, averaged over pairs, so that microbatches agree)."""
    check_dpo_args(beta, loss_type, label_smoothing)
    mean_lp = loss_type in MEAN_LOGPS

    def loss_fn(params, batch, rng=None, frozen=None):
        out = sequence_logps(model, params, batch, rng=rng, deterministic=deterministic,
                             config=config)
        counts_B2 = out["counts"]
        denom_B2 = jnp.maximum(counts_B2, 1.0)
        if loss_type in REFERENCE_FREE:
            ref_B2 = jnp.zeros_like(out["logps"])
        elif "ref_logps" in batch:
            ref_B2 = jax.lax.stop_gradient(batch["ref_logps"].astype(jnp.float32))
        elif frozen is not None:
            ref_B2 = reference_logps(model, frozen, batch)
        else:
            raise ValueError(f"the {loss_type} DPO loss needs reference log-probs: give the "
                             "reference weights (Trainer(frozen=...)) or batch['ref_logps']")
        pol_B2 = out["logps"] / denom_B2 if mean_lp else out["logps"]
        ref_B2 = ref_B2 / denom_B2 if mean_lp else ref_B2
        losses_B, chosen_B, rejected_B = dpo_loss(
            pol_B2[:, 0], pol_B2[:, 1], ref_B2[:, 0], ref_B2[:, 1], beta=beta,
            loss_type=loss_type, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)
        valid_B = (counts_B2 > 0).all(-1).astype(jnp.float32)  # padding rows: no pair
        pairs = valid_B.sum()

        def mean(x_B):
            return (x_B * valid_B).sum() / jnp.maximum(pairs, 1.0)
        loss = mean(losses_B)
        metrics = {
            "rewards/chosen": mean(chosen_B), "rewards/rejected": mean(rejected_B),
            "rewards/accuracies": mean((chosen_B > rejected_B).astype(jnp.float32)),
            "rewards/margins": mean(chosen_B - rejected_B),
            "logps/chosen": mean(pol_B2[:, 0]), "logps/rejected": mean(pol_B2[:, 1]),
            "logits/chosen": mean(out["mean_logits"][:, 0]),
            "logits/rejected": mean(out["mean_logits"][:, 1]),
        }
        if rpo_alpha > 0:
            nll = mean(-out["logps"][:, 0] / denom_B2[:, 0])
            loss = loss + rpo_alpha * nll
            metrics["nll_loss"] = nll
        metrics.update(loss=loss, tokens=pairs,
                       num_tokens=(batch["mask"] > 0).sum().astype(jnp.float32))
        return loss, metrics
    return loss_fn
