"""Configs: one frozen, hashable, JSON-serialisable dataclass per model family.

Every config validates itself on construction, so a bad value fails with a message that
names the field and the fix before any parameter is allocated.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLS = ("auto", "reference", "xla", "cudnn")


class ConfigError(ValueError):
    """A config value that cannot build a model."""


def resolve_dtype(name: str):
    """Maps a dtype name ('float32', 'bfloat16', 'float16') to the jnp dtype."""
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclasses.dataclass(frozen=True)
class _Base:
    """Shared plumbing: dtype validation, JSON round trip, replace."""

    family: ClassVar[str] = ""
    # fields every family has (dataclass inheritance puts them first in the field order)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    pad_id: int = 256  # byte-tokenizer ids; checkpoints with their own vocabulary override them
    bos_id: int = 257
    eos_id: int = 258

    def __post_init__(self):
        for field in ("dtype", "param_dtype"):
            if hasattr(self, field):
                resolve_dtype(getattr(self, field))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("int",) and isinstance(v, int) and v < 0:
                raise ConfigError(f"{f.name} must be >= 0, got {v}")
        self.validate()

    def validate(self) -> None:  # overridden per family
        pass

    def replace(self, **kw) -> "_Base":
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise ConfigError(
                f"{type(self).__name__} has no field(s) {unknown}; fields are {sorted(names)}"
            )
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["family"] = self.family
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @property
    def compute_dtype(self):
        return resolve_dtype(self.dtype)

    @property
    def params_dtype(self):
        return resolve_dtype(self.param_dtype)


def _check_heads(d_model: int, n_heads: int, n_kv_heads: int, head_dim: int | None) -> None:
    _require(n_heads > 0, f"n_heads must be positive, got {n_heads}")
    if head_dim is None:
        _require(
            d_model % n_heads == 0,
            f"n_heads={n_heads} does not divide d_model={d_model}; choose n_heads among "
            f"{[h for h in range(1, min(d_model, 64) + 1) if d_model % h == 0]} or set head_dim",
        )
    _require(n_kv_heads > 0, f"n_kv_heads must be positive, got {n_kv_heads}")
    _require(
        n_heads % n_kv_heads == 0,
        f"n_kv_heads={n_kv_heads} does not divide n_heads={n_heads}; choose n_kv_heads among "
        f"{[k for k in range(1, n_heads + 1) if n_heads % k == 0]}",
    )


@dataclasses.dataclass(frozen=True)
class LMConfig(_Base):
    """Decoder-only language model; `flavor` picks GPT-2 or Llama defaults for the blocks.

    GPT-2: learned positions, LayerNorm, GELU MLP, biases, tied embeddings.
    Llama: rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention, no biases.
    """

    family: ClassVar[str] = "lm"
    flavor: str = "gpt2"  # 'gpt2' | 'llama'
    vocab_size: int = 264
    max_len: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 means n_heads (plain multi-head attention)
    head_dim: int | None = None  # None means d_model // n_heads
    d_ff: int = 512
    norm_eps: float = 1e-5
    use_bias: bool = True
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    # Llama-3 style rope scaling: (factor, low_freq_factor, high_freq_factor, original_max_len)
    rope_scaling: tuple[float, float, float, int] | None = None
    dropout: float = 0.0
    attention_impl: str = "auto"

    def __post_init__(self):
        if self.n_kv_heads == 0:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if isinstance(self.rope_scaling, list):
            object.__setattr__(self, "rope_scaling", tuple(self.rope_scaling))
        super().__post_init__()

    def validate(self):
        _require(self.flavor in ("gpt2", "llama"), f"flavor must be 'gpt2' or 'llama', got {self.flavor!r}")
        _check_heads(self.d_model, self.n_heads, self.n_kv_heads, self.head_dim)
        _require(self.attention_impl in ATTENTION_IMPLS,
                 f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        _require(self.vocab_size > 0 and self.max_len > 0 and self.n_layers > 0,
                 "vocab_size, max_len and n_layers must be positive")
        _require(self.dim_per_head % 2 == 0 or self.flavor != "llama",
                 f"rotary embeddings need an even head_dim, got {self.dim_per_head}")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def use_rope(self) -> bool:
        return self.flavor == "llama"


@dataclasses.dataclass(frozen=True)
class EncDecConfig(_Base):
    """Encoder-decoder transformer of Vaswani et al. (2017)."""

    family: ClassVar[str] = "encdec"
    src_vocab_size: int = 264
    tgt_vocab_size: int = 264
    max_len: int = 256
    d_model: int = 128
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    n_heads: int = 4
    d_ff: int = 512
    pre_ln: bool = False  # the paper is post-LN
    share_embeddings: bool = True  # source, target and output projection share one matrix
    norm_eps: float = 1e-6
    dropout: float = 0.0
    attention_impl: str = "auto"

    def validate(self):
        _check_heads(self.d_model, self.n_heads, self.n_heads, None)
        _require(self.attention_impl in ATTENTION_IMPLS,
                 f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        _require(not self.share_embeddings or self.src_vocab_size == self.tgt_vocab_size,
                 "share_embeddings needs src_vocab_size == tgt_vocab_size; "
                 "set share_embeddings=False or make the vocabularies equal")

    @property
    def vocab_size(self) -> int:
        return self.tgt_vocab_size

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_layers(self) -> int:
        return self.n_decoder_layers


@dataclasses.dataclass(frozen=True)
class RNNConfig(_Base):
    """RNN encoder-decoder; `attention` None is the vanilla final-state model."""

    family: ClassVar[str] = "rnn"
    cell: str = "gru"  # 'rnn' (tanh) | 'gru' | 'lstm'
    attention: str | None = None  # None | 'bahdanau' (additive) | 'luong' (dot)
    src_vocab_size: int = 264
    tgt_vocab_size: int = 264
    max_len: int = 256
    d_embed: int = 64
    d_hidden: int = 128

    def validate(self):
        _require(self.cell in ("rnn", "gru", "lstm"), f"cell must be 'rnn', 'gru' or 'lstm', got {self.cell!r}")
        _require(self.attention in (None, "bahdanau", "luong"),
                 f"attention must be None, 'bahdanau' or 'luong', got {self.attention!r}")

    @property
    def vocab_size(self) -> int:
        return self.tgt_vocab_size

    @property
    def d_model(self) -> int:
        return self.d_hidden


CONFIG_CLASSES = {c.family: c for c in (LMConfig, EncDecConfig, RNNConfig)}
ModelConfig = LMConfig | EncDecConfig | RNNConfig


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Inverse of `to_dict` (the family key picks the class)."""
    d = dict(d)
    family = d.pop("family", None)
    if family not in CONFIG_CLASSES:
        raise ConfigError(f"unknown config family {family!r}; expected one of {sorted(CONFIG_CLASSES)}")
    cls = CONFIG_CLASSES[family]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {unknown}")
    return cls(**d)


def config_from_json(s: str) -> ModelConfig:
    return config_from_dict(json.loads(s))
