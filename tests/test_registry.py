"""The zoo's registry: real parameter counts, logical axes everywhere, validated configs."""

import json

import flax.linen as nn
import jax
import pytest

from fmzoo.models import (ConfigError, EncDecConfig, LMConfig, RNNConfig, config_from_json,
                          count_params, get_config, list_models, logical_axes, param_shapes)
from fmzoo.models.registry import init_boxed

REQUIRED = ["rnn-seq2seq", "rnn-seq2seq-attn", "transformer-seq2seq", "transformer-base",
            "gpt-tiny", "gpt2-124m", "gpt2-355m", "llama-tiny", "llama-3.2-1b"]


def test_presets_present():
    assert set(REQUIRED) <= set(list_models())


def test_real_parameter_counts():
    assert count_params(get_config("gpt2-124m")) == 124_439_808
    assert count_params(get_config("llama-3.2-1b")) == 1_235_814_400
    assert count_params(get_config("gpt2-355m")) == 354_823_168


def test_transformer_base_has_the_paper_shape():
    c = get_config("transformer-base")
    assert (c.n_encoder_layers, c.n_decoder_layers, c.d_model, c.n_heads, c.d_ff) == (6, 6, 512, 8, 2048)


@pytest.mark.parametrize("name", REQUIRED)
def test_every_parameter_has_logical_axis_names(name):
    c = get_config(name)
    boxed = jax.eval_shape(lambda k: init_boxed(c, k), jax.random.key(0))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim and all(isinstance(n, str) for n in leaf.names)
    axes = logical_axes(c)
    shapes = param_shapes(c)
    assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple)) == jax.tree.structure(shapes)


def test_validation_errors_name_the_problem():
    with pytest.raises(ConfigError, match=r"n_heads=5 does not divide d_model=128"):
        LMConfig(d_model=128, n_heads=5)
    with pytest.raises(ConfigError, match=r"n_kv_heads=3 does not divide n_heads=4.*\[1, 2, 4\]"):
        LMConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ConfigError, match=r"unknown dtype 'float8'.*bfloat16"):
        LMConfig(dtype="float8")
    with pytest.raises(ConfigError, match=r"unknown dtype 'fp16'"):
        get_config("gpt-tiny", param_dtype="fp16")
    with pytest.raises(ConfigError, match=r"unknown model preset 'gpt2-124'.*did you mean gpt2-124m"):
        get_config("gpt2-124")
    with pytest.raises(ConfigError, match=r"no field\(s\) \['n_layer'\]"):
        get_config("gpt-tiny", n_layer=3)
    with pytest.raises(ConfigError, match="cell must be"):
        RNNConfig(cell="transformer")
    with pytest.raises(ConfigError, match="n_heads=3 does not divide d_model=128"):
        EncDecConfig(n_heads=3)
    with pytest.raises(ConfigError, match="share_embeddings needs"):
        EncDecConfig(src_vocab_size=100, tgt_vocab_size=200)


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-3.2-1b", "transformer-base", "rnn-seq2seq-attn"])
def test_config_json_round_trip_and_hashable(name):
    c = get_config(name)
    back = config_from_json(c.to_json())
    assert back == c and hash(back) == hash(c)
    assert json.loads(c.to_json())["family"] == c.family
    with pytest.raises(ConfigError, match="unknown config family"):
        config_from_json(json.dumps({"family": "cnn"}))


def test_overrides_revalidate():
    c = get_config("llama-tiny", n_layers=1, n_kv_heads=1)
    assert c.n_layers == 1 and c.n_kv_heads == 1 and get_config("llama-tiny").n_layers == 4
    with pytest.raises(ConfigError):
        get_config("llama-tiny", n_kv_heads=3)


@pytest.mark.parametrize("preset,override,message", [
    ("gpt-tiny", dict(eos_id=264), r"eos_id=264 is outside the vocabulary \(vocab_size=264\)"),
    ("gpt-tiny", dict(bos_id=-1), r"bos_id must be >= 0"),
    ("gpt-tiny", dict(vocab_size=100), r"pad_id=256 is outside the vocabulary \(vocab_size=100\)"),
    ("transformer-seq2seq", dict(share_embeddings=False, src_vocab_size=200),
     r"pad_id=256 is outside the vocabulary \(src_vocab_size=200\)"),
    ("rnn-seq2seq", dict(tgt_vocab_size=258), r"eos_id=258 is outside .*tgt_vocab_size=258"),
    ("gpt-tiny", dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    ("transformer-seq2seq", dict(dropout=-0.1), r"dropout must be in \[0, 1\), got -0.1"),
    ("llama-tiny", dict(head_dim=0), r"head_dim must be positive"),
    ("gpt-tiny", dict(d_ff=0), r"d_ff must be positive, got 0"),
    ("transformer-seq2seq", dict(d_ff=0), r"d_ff must be positive, got 0"),
    ("gpt-tiny", dict(n_layers=0), r"n_layers must be positive, got 0"),
    ("transformer-seq2seq", dict(n_encoder_layers=0), r"n_encoder_layers must be positive"),
    ("gpt-tiny", dict(d_model=True), r"LMConfig.d_model must be an integer, got True "
                                     r"\(bool\); a boolean is not a size"),
    ("rnn-seq2seq", dict(d_hidden=False), r"d_hidden must be an integer, got False"),
    ("gpt-tiny", dict(d_model="128"), r"d_model must be an integer, got '128' \(str\); "
                                      r"write the number without quotes \(d_model=128\)"),
    ("gpt-tiny", dict(dropout="0.1"), r"dropout must be a number, got '0.1'"),
    ("gpt-tiny", dict(use_bias=1), r"use_bias must be true or false, got 1"),
    ("gpt-tiny", dict(max_len=None), r"max_len must be an integer, got None"),
    ("llama-tiny", dict(norm_eps=-1e-5), r"norm_eps must be >= 0"),
    ("llama-tiny", dict(rope_theta=0.0), r"rope_theta must be positive"),
    ("llama-tiny", dict(rope_theta=-5), r"rope_theta must be positive"),
    ("gpt-tiny", dict(remat="partial"), r"remat must be one of \('none', 'full', 'dots'\)"),
])
def test_config_ranges_and_types_are_checked(preset, override, message):
    with pytest.raises(ConfigError, match=message):
        get_config(preset, **override)


def test_config_numbers_are_normalised_and_valid_edges_pass():
    import numpy as np
    c = get_config("gpt-tiny", d_model=np.int64(64), dropout=np.float32(0.5), norm_eps=0.0,
                   eos_id=263, remat="dots")
    assert type(c.d_model) is int and type(c.dropout) is float and c.to_json()
    assert get_config("llama-tiny", head_dim=None).dim_per_head == 32
