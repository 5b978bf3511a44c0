"""Losses as pure functions `(params, batch, rng) -> (loss, metrics)`, built from a model.

Shape letters: B batch, T target length, S source length, V vocabulary.

Every loss returns the token-mean cross entropy and metrics {"loss", "accuracy",
"tokens"}; "tokens" (the number of target tokens that count) is what the step functions
weight by, so that accumulated microbatches and data-parallel shards average exactly as
one big batch would.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fmzoo.models.config import EncDecConfig, LMConfig, RNNConfig

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


def masked_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array,
                         mask_BT: jax.Array) -> tuple[jax.Array, dict]:
    """Token-mean cross entropy over mask_BT (computed in fp32), accuracy and token count."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    mask_BT = mask_BT.astype(jnp.float32)
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    tokens = mask_BT.sum()
    denom = jnp.maximum(tokens, 1.0)
    loss = (nll_BT * mask_BT).sum() / denom
    correct_BT = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
    accuracy = (correct_BT * mask_BT).sum() / denom
    return loss, {"loss": loss, "accuracy": accuracy, "tokens": tokens}


def _rngs(config: Any, rng: jax.Array | None, deterministic: bool) -> tuple[dict, bool]:
    """Dropout only runs when training, the config has dropout, and a key is given."""
    use = (not deterministic) and rng is not None and getattr(config, "dropout", 0.0) > 0
    if not use:
        return {}, True
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)
    return {"dropout": rng}, False


def lm_loss(model: Any, config: LMConfig, *, deterministic: bool = False) -> LossFn:
    """Masked next-token cross entropy; packed documents are kept apart by segment ids."""

    def loss_fn(params, batch, rng=None):
        rngs, det = _rngs(config, rng, deterministic)
        # Segment ids alone keep pads (segment 0) and documents apart; positions restart
        # per document, so the model sees each packed document as if it were alone.
        logits_BTV = model.apply({"params": params}, batch["inputs"],
                                 positions_BT=batch.get("positions"),
                                 segment_ids_BT=batch.get("segment_ids"),
                                 deterministic=det, rngs=rngs)
        return masked_cross_entropy(logits_BTV, batch["targets"], batch["loss_mask"])

    return loss_fn


def seq2seq_loss(model: Any, config: EncDecConfig | RNNConfig, *,
                 deterministic: bool = False) -> LossFn:
    """Teacher-forced cross entropy: the decoder reads tgt_in and predicts tgt_out."""

    def loss_fn(params, batch, rng=None):
        rngs, det = _rngs(config, rng, deterministic)
        src_BS, tgt_in_BT = batch["src"], batch["tgt_in"]
        src_mask_BS = batch["src_mask"].astype(bool)
        logits_BTV = model.apply({"params": params}, src_BS, tgt_in_BT, src_mask_BS,
                                 batch["tgt_mask"].astype(bool), deterministic=det, rngs=rngs)
        return masked_cross_entropy(logits_BTV, batch["tgt_out"], batch["tgt_mask"])

    return loss_fn


def make_loss(model: Any, config: Any, *, deterministic: bool = False) -> LossFn:
    """The loss that fits the model family (LM or seq2seq)."""
    if isinstance(config, LMConfig):
        return lm_loss(model, config, deterministic=deterministic)
    return seq2seq_loss(model, config, deterministic=deterministic)


def data_kind(config: Any) -> str:
    """'lm' for decoder-only models, 'seq2seq' for encoder-decoders and RNNs."""
    return "lm" if isinstance(config, LMConfig) else "seq2seq"
