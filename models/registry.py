"""The zoo: preset names -> configs, and build / init / count_params for any config."""

from __future__ import annotations

import difflib
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import (ActorCriticConfig, ConfigError, EncDecConfig, LMConfig, ModelConfig,
                     RNNConfig)
from .sharding import LOGICAL_AXIS_RULES, boxed_shardings

_LLAMA3_ROPE = (32.0, 1.0, 4.0, 8192)

PRESETS: dict[str, ModelConfig] = {
    "rnn-seq2seq": RNNConfig(cell="gru", attention=None),
    "rnn-seq2seq-attn": RNNConfig(cell="gru", attention="bahdanau"),
    "transformer-seq2seq": EncDecConfig(d_model=128, n_encoder_layers=2, n_decoder_layers=2,
                                        n_heads=4, d_ff=512, max_len=256),
    "transformer-base": EncDecConfig(src_vocab_size=37000, tgt_vocab_size=37000, max_len=512,
                                     d_model=512, n_encoder_layers=6, n_decoder_layers=6,
                                     n_heads=8, d_ff=2048, dropout=0.1, pad_id=0, bos_id=1,
                                     eos_id=2),
    "gpt-tiny": LMConfig(flavor="gpt2", vocab_size=264, max_len=256, d_model=128, n_layers=4,
                         n_heads=4, d_ff=512),
    "gpt2-124m": LMConfig(flavor="gpt2", vocab_size=50257, max_len=1024, d_model=768,
                          n_layers=12, n_heads=12, d_ff=3072, pad_id=50256, bos_id=50256,
                          eos_id=50256),
    "gpt2-355m": LMConfig(flavor="gpt2", vocab_size=50257, max_len=1024, d_model=1024,
                          n_layers=24, n_heads=16, d_ff=4096, pad_id=50256, bos_id=50256,
                          eos_id=50256),
    "llama-tiny": LMConfig(flavor="llama", vocab_size=264, max_len=256, d_model=128, n_layers=4,
                           n_heads=4, n_kv_heads=2, d_ff=344, use_bias=False,
                           tie_embeddings=False, norm_eps=1e-5),
    "llama-3.2-1b": LMConfig(flavor="llama", vocab_size=128256, max_len=131072, d_model=2048,
                             n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192, use_bias=False,
                             tie_embeddings=True, norm_eps=1e-5, rope_theta=500000.0,
                             rope_scaling=_LLAMA3_ROPE, pad_id=128004, bos_id=128000,
                             eos_id=128001),
}


def list_models() -> list[str]:
    return list(PRESETS)


def get_config(name: str, **overrides) -> ModelConfig:
    """The preset's config, with fields replaced by `overrides` (validated again)."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model preset {name!r}{hint} (all presets: {', '.join(PRESETS)})")
    cfg = PRESETS[name]
    return cfg.replace(**overrides) if overrides else cfg


def family_name(config: ModelConfig) -> str:
    return config.flavor if isinstance(config, LMConfig) else config.family


def build(config: ModelConfig) -> nn.Module:
    """The Linen module for a config."""
    if isinstance(config, LMConfig):
        from .transformer import DecoderLM
        return DecoderLM(config)
    if isinstance(config, EncDecConfig):
        from .transformer import EncoderDecoder
        return EncoderDecoder(config)
    if isinstance(config, RNNConfig):
        from .rnn import RNNSeq2Seq
        return RNNSeq2Seq(config)
    if isinstance(config, ActorCriticConfig):  # PPO's policy + value model
        from .actor_critic import ActorCritic
        return ActorCritic(config)
    raise ConfigError(f"no model for config of type {type(config).__name__}")


def dummy_inputs(config: ModelConfig, batch: int = 1, length: int = 8) -> tuple[Any, ...]:
    length = min(length, config.max_len)
    toks = jnp.zeros((batch, length), jnp.int32)
    return (toks,) if isinstance(config, (LMConfig, ActorCriticConfig)) else (toks, toks)


def init_boxed(config: ModelConfig, rng: jax.Array) -> Any:
    """Params still wrapped in `nn.Partitioned` (they carry their logical axis names)."""
    return build(config).init(rng, *dummy_inputs(config))["params"]


def init(config: ModelConfig, rng: jax.Array | int = 0) -> Any:
    """Fresh params as a plain pytree of arrays."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    params = nn.meta.unbox(init_boxed(config, rng))
    if isinstance(config, RNNConfig):
        # gated cells start with their keep gate open (forget/update bias 1), as is standard:
        # with flax's zero bias a GRU/LSTM forgets as fast as a tanh RNN at init
        from .rnn import open_keep_gates
        params = open_keep_gates(params, config.cell)
    return params


def boxed_shapes(config: ModelConfig) -> Any:
    """Abstract params still boxed in `nn.Partitioned`: shapes plus logical axis names."""
    return jax.eval_shape(functools.partial(init_boxed, config), jax.random.key(0))


def param_shapes(config: ModelConfig) -> Any:
    """ShapeDtypeStructs of the params; nothing is allocated."""
    return nn.meta.unbox(boxed_shapes(config))


def logical_axes(config: ModelConfig) -> Any:
    """Pytree (same structure as the params) of logical PartitionSpecs, e.g.
    P('embed', 'heads', 'head_dim'), read by flax's `nn.get_partition_spec`."""
    return nn.get_partition_spec(boxed_shapes(config))


def param_shardings_for(config: ModelConfig, mesh: jax.sharding.Mesh,
                        rules=LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings of the config's params on `mesh` under the rules."""
    return boxed_shardings(boxed_shapes(config), mesh, rules)


def place_params(params: Any, config: ModelConfig, mesh: jax.sharding.Mesh,
                 rules=LOGICAL_AXIS_RULES) -> Any:
    """Puts a params pytree onto `mesh` following the config's logical axes."""
    return jax.device_put(params, param_shardings_for(config, mesh, rules))


def count_params(config: ModelConfig) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(param_shapes(config)))
