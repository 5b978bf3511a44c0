"""PPO's actor-critic: a policy LM and a value model trained together (TRL's PolicyAndValueWrapper).

The pair is one zoo model, so the Trainer, the sharding rules, checkpoints and bit-exact
resume treat it like any other: one param tree {"policy": ..., "value": ...} (each the
params of a DecoderLM, their logical axes unchanged), one optimizer over both.

    model = ActorCritic(ActorCriticConfig(policy=sft_config, value=rm_config))
    logits_BTV = model.apply(v, tokens_BT)                        # the policy's, as an LM
    values_BT = model.apply(v, tokens_BT, mask_BT, method=model.values)
    logits_BTV, values_BT = model.apply(v, tokens_BT, mask_BT, method=model.logits_and_values)

The value model is a DecoderLM with a score head (config head 'score'), read at EVERY
position: values_BT[:, t] is the value of the state after tokens[:, :t + 1], i.e. before the
policy picks tokens[:, t + 1]; aligned as targets, like a rollout's log-probs.
Decoding (init_cache / prefill / decode_step) is the policy's, so generation code runs on
an ActorCritic with its full params unchanged.

Shape letters: B batch, T length, V vocabulary.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import ActorCriticConfig
from .transformer import DecoderLM

Array = jax.Array


def _positions(mask_BT: Array | None) -> Array | None:
    """Positions from the mask's running count (as rollouts and scoring number tokens)."""
    if mask_BT is None:
        return None
    mask_BT = jnp.asarray(mask_BT, jnp.int32)
    return jnp.maximum(jnp.cumsum(mask_BT, axis=-1) - 1, 0).astype(jnp.int32)


class ActorCritic(nn.Module):
    """Policy (DecoderLM, head 'lm') + value model (DecoderLM, head 'score')."""

    config: ActorCriticConfig

    def setup(self):
        self.policy = DecoderLM(self.config.policy)
        self.value = DecoderLM(self.config.value)

    def __call__(self, tokens_BT: Array, positions_BT: Array | None = None,
                 padding_mask_BT: Array | None = None, segment_ids_BT: Array | None = None,
                 deterministic: bool = True, return_hidden: bool = False):
        """The policy's logits [B, T, V] (DecoderLM's signature). At init the value model
        runs too, so `init` creates both halves of the param tree."""
        out = self.policy(tokens_BT, positions_BT, padding_mask_BT, segment_ids_BT,
                          deterministic, return_hidden)
        if self.is_initializing():
            self.value(tokens_BT, positions_BT, padding_mask_BT, segment_ids_BT, deterministic)
        return out

    def values(self, tokens_BT: Array, padding_mask_BT: Array | None = None,
               positions_BT: Array | None = None, deterministic: bool = True) -> Array:
        """float32 [B, T]: the value head at every position (positions default to the
        mask's running count, so padding changes nothing on real tokens)."""
        if positions_BT is None:
            positions_BT = _positions(padding_mask_BT)
        return self.value(tokens_BT, positions_BT, padding_mask_BT, None, deterministic)

    def logits_and_values(self, tokens_BT: Array, padding_mask_BT: Array | None = None,
                          positions_BT: Array | None = None, deterministic: bool = True
                          ) -> tuple[Array, Array]:
        """(policy logits [B, T, V] float32, values [B, T] float32) of the same rows: the
        PPO update's one forward of both models."""
        if positions_BT is None:
            positions_BT = _positions(padding_mask_BT)
        logits_BTV = self.policy(tokens_BT, positions_BT, padding_mask_BT, None, deterministic)
        return logits_BTV, self.values(tokens_BT, padding_mask_BT, positions_BT, deterministic)

    # decoding is the policy's: generate / stream / rollouts work on the pair unchanged
    def init_cache(self, batch: int, max_len: int, src_len: int = 0, dtype=None):
        return DecoderLM(self.config.policy).init_cache(batch, max_len, src_len, dtype)

    def prefill(self, tokens_BT: Array, mask_BT: Array, cache):
        return self.policy.prefill(tokens_BT, mask_BT, cache)

    def decode_step(self, token_B: Array, cache):
        return self.policy.decode_step(token_B, cache)
