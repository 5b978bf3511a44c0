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
