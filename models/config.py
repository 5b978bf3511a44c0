"""Configs: one frozen, hashable, JSON-serialisable dataclass per model family.

Every config validates itself on construction, so a bad value fails with a message that
names the field and the fix before any parameter is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLS = ("auto", "reference", "xla", "cudnn", "cpu")
REMAT_POLICIES = ("none", "full", "dots")  # activation checkpointing per transformer block
LM_HEADS = ("lm", "score")  # what a decoder LM's last hidden states feed


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
        _check_types(self)
        for field in ("dtype", "param_dtype"):
            if hasattr(self, field):
                resolve_dtype(getattr(self, field))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if _annotation(f).startswith("int") and isinstance(v, int) and v < 0:
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


def _annotation(f: dataclasses.Field) -> str:
    """A field's annotation as written ('int | None'), postponed (a string) or not."""
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def _check_types(config) -> None:
    """Each field holds its annotated kind: ints (not bools: True is an int in Python, and
    not strings such as "128" from a hand-written JSON), floats, bools, strings. numpy
    scalars are turned into Python ones, so the config stays hashable and JSON-able."""
    for f in dataclasses.fields(config):
        annotation = _annotation(f)
        v, kind = getattr(config, f.name), annotation.split("|")[0].strip()
        if v is None:
            if annotation.endswith("| None"):
                continue
            ok = False
        elif kind == "int":
            ok = isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))
            v = int(v) if ok else v
        elif kind == "float":
            ok = isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
            v = float(v) if ok else v
        elif kind == "bool":
            ok = isinstance(v, (bool, np.bool_))
            v = bool(v) if ok else v
        elif kind == "str":
            ok = isinstance(v, str)
        else:
            continue
        if not ok:
            what = {"int": "an integer", "float": "a number", "bool": "true or false",
                    "str": "a string"}[kind]
            hint = ""
            if isinstance(v, str) and kind in ("int", "float"):
                hint = f"; write the number without quotes ({f.name}={v.strip()})"
            elif isinstance(v, bool):
                hint = "; a boolean is not a size"
            raise ConfigError(f"{type(config).__name__}.{f.name} must be {what}, got {v!r} "
                              f"({type(v).__name__}){hint}")
        object.__setattr__(config, f.name, v)


def _check_positive(config, *names: str) -> None:
    for name in names:
        v = getattr(config, name)
        _require(v > 0, f"{name} must be positive, got {v}")


def _check_common(config, id_vocab: dict[str, tuple[str, ...]]) -> None:
    """Ranges every transformer/RNN family shares; `id_vocab` maps each special-token id to
    the vocabulary fields it must index."""
    for name, vocabs in id_vocab.items():
        v = getattr(config, name)
        for vocab in vocabs:
            size = getattr(config, vocab)
            _require(0 <= v < size,
                     f"{name}={v} is outside the vocabulary ({vocab}={size}); set {name} "
                     f"to an id below {size} (e.g. {name}={min(size - 1, 2)})")
    if hasattr(config, "dropout"):
        _require(0.0 <= config.dropout < 1.0,
                 f"dropout must be in [0, 1), got {config.dropout}; e.g. dropout=0.1")
    if hasattr(config, "norm_eps"):
        _require(config.norm_eps >= 0,
                 f"norm_eps must be >= 0 (it keeps the normalisation's division away from 0), "
                 f"got {config.norm_eps}; e.g. norm_eps=1e-5")


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
    remat: str = "none"  # 'none' | 'full' (recompute each block) | 'dots' (keep matmul outputs)
    # 'lm': next-token logits; 'score': a reward model, HF's *ForSequenceClassification with
    # num_labels=1 (a Dense(d_model -> 1) read at each row's last real token, no LM head)
    head: str = "lm"
    # True: one `nn.scan` over the blocks, params stacked under `layers` with a leading
    # [n_layers] axis (models/scan.py converts); compiles one block instead of n_layers
    scan_layers: bool = False

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
        _require(self.remat in REMAT_POLICIES,
                 f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        _require(self.head in LM_HEADS,
                 f"head must be one of {LM_HEADS} ('lm': next-token logits; 'score': a "
                 f"reward model's scalar), got {self.head!r}")
        _check_positive(self, "vocab_size", "max_len", "d_model", "n_layers", "d_ff")
        _require(self.head_dim is None or self.head_dim > 0,
                 f"head_dim must be positive, or None for d_model // n_heads; got {self.head_dim}")
        _require(self.rope_theta > 0, f"rope_theta must be positive (the rotary base), got "
                                      f"{self.rope_theta}; e.g. rope_theta=10000.0")
        _check_common(self, {k: ("vocab_size",) for k in ("pad_id", "bos_id", "eos_id")})
        _require(self.dim_per_head % 2 == 0 or self.flavor != "llama",
                 f"rotary embeddings need an even head_dim, got {self.dim_per_head}")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def use_rope(self) -> bool:
        return self.flavor == "llama"


# padding fills sources and targets; bos and eos are target tokens
_SEQ2SEQ_IDS = {"pad_id": ("src_vocab_size", "tgt_vocab_size"), "bos_id": ("tgt_vocab_size",),
                "eos_id": ("tgt_vocab_size",)}


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
    remat: str = "none"  # 'none' | 'full' | 'dots'

    def validate(self):
        _check_positive(self, "src_vocab_size", "tgt_vocab_size", "max_len", "d_model",
                        "n_encoder_layers", "n_decoder_layers", "d_ff")
        _check_heads(self.d_model, self.n_heads, self.n_heads, None)
        _require(self.attention_impl in ATTENTION_IMPLS,
                 f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        _require(self.remat in REMAT_POLICIES,
                 f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        _require(not self.share_embeddings or self.src_vocab_size == self.tgt_vocab_size,
                 "share_embeddings needs src_vocab_size == tgt_vocab_size; "
                 "set share_embeddings=False or make the vocabularies equal")
        _check_common(self, _SEQ2SEQ_IDS)

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
        _check_positive(self, "src_vocab_size", "tgt_vocab_size", "max_len", "d_embed",
                        "d_hidden")
        _check_common(self, _SEQ2SEQ_IDS)
        _require(self.cell in ("rnn", "gru", "lstm"), f"cell must be 'rnn', 'gru' or 'lstm', got {self.cell!r}")
        _require(self.attention in (None, "bahdanau", "luong"),
                 f"attention must be None, 'bahdanau' or 'luong', got {self.attention!r}")

    @property
    def vocab_size(self) -> int:
        return self.tgt_vocab_size

    @property
    def d_model(self) -> int:
        return self.d_hidden


@dataclasses.dataclass(frozen=True)
class ActorCriticConfig:
    """PPO's trained pair (models/actor_critic.py): a policy LM (head 'lm') and a value
    model (head 'score', read at every position), one param tree {"policy", "value"} under
    one optimizer, as TRL's PPO trains them. The shared-looking fields (dtype, ids,
    vocab_size, max_len) are the policy's: generic LM code sees the policy."""

    family: ClassVar[str] = "actor_critic"
    policy: LMConfig = dataclasses.field(default_factory=LMConfig)
    value: LMConfig = dataclasses.field(default_factory=lambda: LMConfig(head="score"))

    def __post_init__(self):
        for name in ("policy", "value"):  # from JSON: nested dicts
            v = getattr(self, name)
            if isinstance(v, dict):
                v = config_from_dict({"family": "lm", **v})
                object.__setattr__(self, name, v)
            if not isinstance(v, LMConfig):
                raise ConfigError(f"ActorCriticConfig.{name} must be a decoder-only LMConfig, "
                                  f"got {type(v).__name__}")
        self.validate()

    def validate(self) -> None:
        p, v = self.policy, self.value
        _require(p.head == "lm", f"ActorCriticConfig.policy must be a language model "
                 f"(head='lm'), got head={p.head!r}; pass the SFT model's config")
        _require(v.head == "score", f"ActorCriticConfig.value must have a score head "
                 f"(head='score'), got head={v.head!r}; use a reward model's config or "
                 "policy.replace(head='score')")
        _require(p.vocab_size == v.vocab_size,
                 f"the value model's vocabulary ({v.vocab_size}) differs from the policy's "
                 f"({p.vocab_size}); it must read the policy's tokens: use a reward model "
                 "trained from the same tokenizer, or --value-model policy")

    def replace(self, **kw) -> "ActorCriticConfig":
        unknown = sorted(set(kw) - {"policy", "value"})
        if unknown:
            raise ConfigError(f"ActorCriticConfig has no field(s) {unknown}; fields are "
                              "['policy', 'value'] (replace inside them: "
                              "config.replace(policy=config.policy.replace(...)))")
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "policy": self.policy.to_dict(),
                "value": self.value.to_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    # What generic LM code reads (generation, recipes, messages): the policy's, except
    # max_len, which both models must fit.
    dtype = property(lambda self: self.policy.dtype)
    param_dtype = property(lambda self: self.policy.param_dtype)
    compute_dtype = property(lambda self: self.policy.compute_dtype)
    params_dtype = property(lambda self: self.policy.params_dtype)
    pad_id = property(lambda self: self.policy.pad_id)
    bos_id = property(lambda self: self.policy.bos_id)
    eos_id = property(lambda self: self.policy.eos_id)
    vocab_size = property(lambda self: self.policy.vocab_size)
    max_len = property(lambda self: min(self.policy.max_len, self.value.max_len))


CONFIG_CLASSES = {c.family: c for c in (LMConfig, EncDecConfig, RNNConfig, ActorCriticConfig)}
ModelConfig = LMConfig | EncDecConfig | RNNConfig | ActorCriticConfig


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
