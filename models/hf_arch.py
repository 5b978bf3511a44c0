"""Hugging Face architectures <-> fmzoo: config translation and one weight rule per tensor.

A `Rule` ties one fmzoo parameter (a path in the DecoderLM params tree) to one Hugging Face
tensor, or to a slice of one: GPT-2 packs the query, key and value projections into a single
`c_attn` tensor. The same rules drive import (checkpoint -> params) and export.

Shape letters: E model width, H query heads, K key/value heads, D head dim, F MLP width,
V vocabulary, P positions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from .config import LMConfig


class CheckpointError(ValueError):
    """A checkpoint (or a config to export) that fmzoo cannot map; the message says why."""


@dataclasses.dataclass(frozen=True)
class Rule:
    zoo: tuple[str, ...]  # path in the fmzoo params tree
    hf: str  # tensor name in the Hugging Face state dict
    hf_shape: tuple[int, ...]  # shape of the whole Hugging Face tensor
    transpose: bool = False  # torch Linear stores [out, in]; flax kernels are [in, out]
    part: tuple[int, int] | None = None  # (i, n): i-th of n equal chunks of the last axis

    @property
    def piece_shape(self) -> tuple[int, ...]:
        if self.part is None:
            return self.hf_shape
        return self.hf_shape[:-1] + (self.hf_shape[-1] // self.part[1],)

    @property
    def piece_index(self) -> tuple[slice, ...] | None:
        """Slice of the Hugging Face tensor this rule reads; None for the whole tensor."""
        if self.part is None:
            return None
        i, width = self.part[0], self.piece_shape[-1]
        return (slice(None),) * (len(self.hf_shape) - 1) + (slice(i * width, (i + 1) * width),)

    def to_zoo(self, piece: np.ndarray, zoo_shape: tuple[int, ...]) -> np.ndarray:
        return (piece.T if self.transpose else piece).reshape(zoo_shape)

    def to_hf(self, leaf: np.ndarray) -> np.ndarray:
        shape = self.piece_shape
        if self.transpose:
            return leaf.reshape(shape[::-1]).T
        return leaf.reshape(shape)


def _first(x):
    """Llama-3 lists several eos ids; fmzoo configs hold one (the first)."""
    return x[0] if isinstance(x, (list, tuple)) and x else x


def _token_ids(hf: dict) -> dict[str, int]:
    bos, eos, pad = (_first(hf.get(k)) for k in ("bos_token_id", "eos_token_id", "pad_token_id"))
    eos = eos if eos is not None else (bos if bos is not None else 0)
    bos = bos if bos is not None else eos
    pad = pad if pad is not None else eos
    return {"bos_id": int(bos), "eos_id": int(eos), "pad_id": int(pad)}


def _unsupported(arch: str, what: str) -> CheckpointError:
    return CheckpointError(f"{arch}: {what} is not supported by fmzoo's DecoderLM; "
                           "this checkpoint cannot be loaded with numerical parity")


# ----------------------------------------------------------------------------- GPT-2


def gpt2_config(hf: dict) -> LMConfig:
    arch = "GPT2LMHeadModel"
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise _unsupported(arch, f"activation_function={act!r} (fmzoo uses tanh-approximate "
                                 "GELU, i.e. 'gelu_new')")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise _unsupported(arch, "scale_attn_by_inverse_layer_idx=True")
    if not hf.get("scale_attn_weights", True):
        raise _unsupported(arch, "scale_attn_weights=False")
    if hf.get("add_cross_attention", False):
        raise _unsupported(arch, "add_cross_attention=True")
    E = hf["n_embd"]
    return LMConfig(
        flavor="gpt2", vocab_size=hf["vocab_size"], max_len=hf.get("n_positions", 1024),
        d_model=E, n_layers=hf["n_layer"], n_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * E,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), use_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), dropout=0.0, **_token_ids(hf))


def gpt2_hf_config(c: LMConfig) -> dict[str, Any]:
    arch = "GPT2LMHeadModel"
    if c.n_kv_heads != c.n_heads:
        raise _unsupported(arch, f"grouped-query attention (n_kv_heads={c.n_kv_heads})")
    if c.dim_per_head * c.n_heads != c.d_model:
        raise _unsupported(arch, f"head_dim={c.head_dim} != d_model / n_heads")
    if not c.use_bias:
        raise _unsupported(arch, "use_bias=False (GPT-2 always has biases)")
    return {
        "architectures": [arch], "model_type": "gpt2", "vocab_size": c.vocab_size,
        "n_positions": c.max_len, "n_embd": c.d_model, "n_layer": c.n_layers,
        "n_head": c.n_heads, "n_inner": c.d_ff, "activation_function": "gelu_new",
        "layer_norm_epsilon": c.norm_eps, "resid_pdrop": c.dropout, "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": c.tie_embeddings, "initializer_range": 0.02,
    }


def gpt2_rules(c: LMConfig) -> list[Rule]:
    E, F, V, P = c.d_model, c.d_ff, c.vocab_size, c.max_len
    rules = [Rule(("embed", "embedding"), "transformer.wte.weight", (V, E)),
             Rule(("pos_embed", "embedding"), "transformer.wpe.weight", (P, E)),
             Rule(("final_norm", "scale"), "transformer.ln_f.weight", (E,)),
             Rule(("final_norm", "bias"), "transformer.ln_f.bias", (E,))]
    if not c.tie_embeddings:
        rules.append(Rule(("lm_head", "kernel"), "lm_head.weight", (V, E), transpose=True))
    for i in range(c.n_layers):
        z, p = f"layers_{i}", f"transformer.h.{i}."
        for j, proj in enumerate(("query", "key", "value")):  # Conv1D: [in, out], no transpose
            rules.append(Rule((z, "attn", proj, "kernel"), p + "attn.c_attn.weight", (E, 3 * E),
                              part=(j, 3)))
            rules.append(Rule((z, "attn", proj, "bias"), p + "attn.c_attn.bias", (3 * E,),
                              part=(j, 3)))
        rules += [
            Rule((z, "attn", "out", "kernel"), p + "attn.c_proj.weight", (E, E)),
            Rule((z, "attn", "out", "bias"), p + "attn.c_proj.bias", (E,)),
            Rule((z, "mlp", "up", "kernel"), p + "mlp.c_fc.weight", (E, F)),
            Rule((z, "mlp", "up", "bias"), p + "mlp.c_fc.bias", (F,)),
            Rule((z, "mlp", "down", "kernel"), p + "mlp.c_proj.weight", (F, E)),
            Rule((z, "mlp", "down", "bias"), p + "mlp.c_proj.bias", (E,)),
        ]
        for zn, hn in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            rules += [Rule((z, zn, "scale"), f"{p}{hn}.weight", (E,)),
                      Rule((z, zn, "bias"), f"{p}{hn}.bias", (E,))]
    return rules


def gpt2_canonical(name: str) -> str | None:
    """GPT2Model checkpoints (the original `gpt2`) lack the `transformer.` prefix; old ones
    also store the causal-mask buffers `attn.bias` / `attn.masked_bias` (skipped: None)."""
    if name.endswith((".attn.bias", ".attn.masked_bias")):
        return None
    if name.startswith(("transformer.", "lm_head.")):
        return name
    return "transformer." + name


# ----------------------------------------------------------------------------- Llama


def _rope(hf: dict) -> tuple[float, tuple | None]:
    """(theta, scaling) from transformers v4 (rope_theta + rope_scaling) or v5 (rope_parameters)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta") or params.get("rope_theta") or 10000.0
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise _unsupported("LlamaForCausalLM", f"rope_type={kind!r} (supported: 'default', "
                                               "'llama3')")
    scaling = (float(params["factor"]), float(params["low_freq_factor"]),
               float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))
    return float(theta), scaling


def llama_config(hf: dict) -> LMConfig:
    arch = "LlamaForCausalLM"
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _unsupported(arch, f"hidden_act={act!r} (fmzoo's Llama MLP is SwiGLU, 'silu')")
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise _unsupported(arch, f"attention_bias={attn_bias} with mlp_bias={mlp_bias} "
                                 "(LMConfig has one use_bias flag for both)")
    E, H = hf["hidden_size"], hf["num_attention_heads"]
    D = hf.get("head_dim") or E // H
    theta, scaling = _rope(hf)
    return LMConfig(
        flavor="llama", vocab_size=hf["vocab_size"],
        max_len=hf.get("max_position_embeddings", 2048), d_model=E,
        n_layers=hf["num_hidden_layers"], n_heads=H,
        n_kv_heads=hf.get("num_key_value_heads") or H, head_dim=None if D * H == E else D,
        d_ff=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6), use_bias=attn_bias,
        tie_embeddings=hf.get("tie_word_embeddings", False), rope_theta=theta,
        rope_scaling=scaling, dropout=0.0, **_token_ids(hf))


def llama_hf_config(c: LMConfig) -> dict[str, Any]:
    out = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": c.vocab_size, "max_position_embeddings": c.max_len,
        "hidden_size": c.d_model, "intermediate_size": c.d_ff, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.dim_per_head, "hidden_act": "silu", "rms_norm_eps": c.norm_eps,
        "attention_bias": c.use_bias, "mlp_bias": c.use_bias, "attention_dropout": c.dropout,
        "tie_word_embeddings": c.tie_embeddings, "rope_theta": c.rope_theta,
        "rope_scaling": None, "pretraining_tp": 1, "initializer_range": 0.02,
    }
    if c.rope_scaling is not None:
        factor, low, high, orig = c.rope_scaling
        out["rope_scaling"] = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                               "high_freq_factor": high,
                               "original_max_position_embeddings": orig}
    return out


def llama_rules(c: LMConfig) -> list[Rule]:
    E, F, V = c.d_model, c.d_ff, c.vocab_size
    H, K, D = c.n_heads, c.n_kv_heads, c.dim_per_head
    rules = [Rule(("embed", "embedding"), "model.embed_tokens.weight", (V, E)),
             Rule(("final_norm", "scale"), "model.norm.weight", (E,))]
    if not c.tie_embeddings:
        rules.append(Rule(("lm_head", "kernel"), "lm_head.weight", (V, E), transpose=True))
    for i in range(c.n_layers):
        z, p = f"layers_{i}", f"model.layers.{i}."
        linears = [(("attn", "query"), "self_attn.q_proj", H * D, E),
                   (("attn", "key"), "self_attn.k_proj", K * D, E),
                   (("attn", "value"), "self_attn.v_proj", K * D, E),
                   (("attn", "out"), "self_attn.o_proj", E, H * D),
                   (("mlp", "gate"), "mlp.gate_proj", F, E),
                   (("mlp", "up"), "mlp.up_proj", F, E),
                   (("mlp", "down"), "mlp.down_proj", E, F)]
        for zoo, hf, n_out, n_in in linears:
            rules.append(Rule((z, *zoo, "kernel"), f"{p}{hf}.weight", (n_out, n_in), transpose=True))
            if c.use_bias:
                rules.append(Rule((z, *zoo, "bias"), f"{p}{hf}.bias", (n_out,)))
        rules += [Rule((z, "attn_norm", "scale"), p + "input_layernorm.weight", (E,)),
                  Rule((z, "mlp_norm", "scale"), p + "post_attention_layernorm.weight", (E,))]
    return rules


def llama_canonical(name: str) -> str | None:
    """Old Llama checkpoints store the rotary `inv_freq` buffers; they are recomputed."""
    return None if name.endswith("rotary_emb.inv_freq") else name


# ----------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    flavor: str
    config_from_hf: Callable[[dict], LMConfig]
    config_to_hf: Callable[[LMConfig], dict]
    rules: Callable[[LMConfig], list[Rule]]
    canonical: Callable[[str], str | None]


ARCHITECTURES = {
    "GPT2LMHeadModel": Architecture("GPT2LMHeadModel", "gpt2", gpt2_config, gpt2_hf_config,
                                    gpt2_rules, gpt2_canonical),
    "LlamaForCausalLM": Architecture("LlamaForCausalLM", "llama", llama_config,
                                     llama_hf_config, llama_rules, llama_canonical),
}
_BY_MODEL_TYPE = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def architecture_of(hf: dict, path: str) -> Architecture:
    names = hf.get("architectures") or [_BY_MODEL_TYPE.get(hf.get("model_type"), None)]
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    shown = [n for n in names if n] or [f"model_type={hf.get('model_type')!r}"]
    raise CheckpointError(
        f"{path}: unsupported architecture {', '.join(map(str, shown))}; fmzoo loads "
        f"{', '.join(ARCHITECTURES)}")


def architecture_for(config: LMConfig) -> Architecture:
    for arch in ARCHITECTURES.values():
        if arch.flavor == config.flavor:
            return arch
    raise CheckpointError(f"no Hugging Face architecture for flavor {config.flavor!r}")
