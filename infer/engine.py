"""Prefill and decode step, one engine per model family, all with the same interface.

    carry = engine.alloc(batch, cache_len, src_len)          # outside jit; donated
    logits_BV, carry = engine.prefill(params, carry, prompt_BT, mask_BT)
    logits_BV, carry = engine.step(params, carry, token_B)

`prefill` reads a batch of right-padded prompts (mask True = real token) in one parallel
pass and returns the logits that predict each sequence's first new token; `step` feeds one
token per sequence and returns the logits for the next. The carry is a pytree whose every
leaf has the batch as leading axis, so beam search can reorder it with one gather.

- Decoder-only LM: the carry is the KV cache; the prompt is the start of the text.
- Encoder-decoder transformer: the prompt is the source. Prefill runs the encoder once,
  precomputes each decoder layer's cross-attention keys/values into the carry, then feeds
  config.bos_id; the self-attention cache grows from there.
- RNN seq2seq: the prompt is the source; the carry is the RNN decoder state (plus the
  encoder states for the attention models), built by the model's own init_decode_state;
  one step is one cell update -- the recurrence the transformer's cache replaces.

Engines are frozen dataclasses over a (hashable) Linen module, so they can be static
arguments of jax.jit. Shape letters: B batch, T prompt length, S source length, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fmzoo.models.config import ConfigError, EncDecConfig, LMConfig, RNNConfig

from .cache import init_cache

Array = jax.Array


def _vars(params):
    return {"params": params}


@dataclasses.dataclass(frozen=True)
class _EngineBase:
    """The model and its config; by default the carry starts as a zeroed KV cache."""

    model: Any

    @property
    def config(self):
        return self.model.config

    def alloc(self, batch: int, cache_len: int, src_len: int = 0) -> dict:
        return init_cache(self.config, batch, cache_len)


@dataclasses.dataclass(frozen=True)
class LMEngine(_EngineBase):
    """GPT-2 / Llama decoder-only models over the explicit KV cache."""

    seq2seq = False

    def prefill(self, params, carry: dict, prompt_BT: Array, mask_BT: Array):
        logits_BTV, carry = self.model.apply(_vars(params), prompt_BT, padding_mask_BT=mask_BT,
                                             cache=carry)
        last_B = mask_BT.sum(-1).astype(jnp.int32) - 1
        logits_BV = jnp.take_along_axis(logits_BTV, last_B[:, None, None], axis=1)[:, 0]
        return logits_BV, carry

    def step(self, params, carry: dict, token_B: Array):
        logits_B1V, carry = self.model.apply(_vars(params), token_B[:, None], cache=carry)
        return logits_B1V[:, 0], carry


@dataclasses.dataclass(frozen=True)
class EncDecEngine(_EngineBase):
    """Vaswani encoder-decoder: encoder once, cross keys/values once, cached self-attention."""

    seq2seq = True

    def prefill(self, params, carry: dict, src_BS: Array, src_mask_BS: Array):
        m = self.model
        memory_BSE = m.apply(_vars(params), src_BS, src_mask_BS, method=m.encode)
        cross = m.apply(_vars(params), memory_BSE, method=m.cross_kv)
        carry = {**carry, "cross": cross, "src_mask": src_mask_BS.astype(bool)}
        return self.step(params, carry, jnp.full(src_BS.shape[:1], self.config.bos_id, jnp.int32))

    def step(self, params, carry: dict, token_B: Array):
        m = self.model
        logits_B1V, carry = m.apply(_vars(params), token_B[:, None], cache=carry, method=m.decode)
        return logits_B1V[:, 0], carry


@dataclasses.dataclass(frozen=True)
class RNNEngine(_EngineBase):
    """RNN seq2seq: the carried state is the decoder's recurrent state (+ encoder states)."""

    seq2seq = True

    def alloc(self, batch: int, cache_len: int, src_len: int = 0) -> dict:
        return {}  # the state is born in prefill from the encoder; nothing to preallocate

    def prefill(self, params, carry: dict, src_BS: Array, src_mask_BS: Array):
        m = self.model
        memory_BSH, final = m.apply(_vars(params), src_BS, src_mask_BS, method=m.encode)
        state = m.apply(_vars(params), memory_BSH, final, src_mask_BS,
                        method=m.init_decode_state)
        return self.step(params, state, jnp.full(src_BS.shape[:1], self.config.bos_id, jnp.int32))

    def step(self, params, carry: dict, token_B: Array):
        m = self.model
        logits_B1V, carry = m.apply(_vars(params), token_B[:, None], carry, method=m.decode)
        return logits_B1V[:, 0], carry


Engine = LMEngine | EncDecEngine | RNNEngine
ENGINES = {LMConfig: LMEngine, EncDecConfig: EncDecEngine, RNNConfig: RNNEngine}


def make_engine(model: Any) -> Engine:
    """The engine for a zoo model (DecoderLM, EncoderDecoder or RNNSeq2Seq)."""
    engine = ENGINES.get(type(getattr(model, "config", None)))
    if engine is None:
        raise ConfigError(f"cannot generate with {type(model).__name__}: expected a zoo model "
                          "built by fmzoo.models.build (DecoderLM, EncoderDecoder or RNNSeq2Seq)")
    return engine(model)


def source_vocab(config) -> int:
    """Size of the prompt's vocabulary: the source side for seq2seq models."""
    return getattr(config, "src_vocab_size", config.vocab_size)
