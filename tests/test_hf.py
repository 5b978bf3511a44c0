"""Hugging Face import/export: logits and greedy tokens equal to transformers', errors.

Tiny random GPT2LMHeadModel / LlamaForCausalLM checkpoints are built offline with
transformers + torch and saved with save_pretrained(safe_serialization=True).
"""

import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # the test extra installs torch and transformers: a missing one must fail, not skip
import transformers as tr

from fmzoo.models import build, get_config, init
from fmzoo.models.bundle import Loaded
from fmzoo.models.hf import CheckpointError, from_hf, to_hf

V = 96  # vocab of every tiny model
BOS, EOS = 1, 2
# a wide init makes attention far from uniform, so a rope or mask error moves the logits
COMMON = dict(vocab_size=V, initializer_range=0.2, bos_token_id=BOS, eos_token_id=EOS,
              pad_token_id=0)
HF_CONFIGS = {
    "gpt2-tied-sharded": lambda: tr.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=48,
                                               **COMMON),
    "gpt2-untied": lambda: tr.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=48,
                                         n_inner=48, tie_word_embeddings=False, **COMMON),
    "llama-gqa-untied": lambda: tr.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, **COMMON),
    "llama3-rope-tied": lambda: tr.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=128, rope_theta=500.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        tie_word_embeddings=True, **COMMON),
}


def _hf_class(config):
    return tr.GPT2LMHeadModel if config.model_type == "gpt2" else tr.LlamaForCausalLM


def _save_hf(name, directory):
    torch.manual_seed(sorted(HF_CONFIGS).index(name))
    hf_config = HF_CONFIGS[name]()
    model = _hf_class(hf_config)(hf_config).eval()
    shard = {"max_shard_size": "40KB"} if "sharded" in name else {}
    model.save_pretrained(directory, safe_serialization=True, **shard)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (directory, transformers model) for every tiny checkpoint."""
    out = {}
    for name in HF_CONFIGS:
        d = str(tmp_path_factory.mktemp(name))
        out[name] = (d, _save_hf(name, d))
    return out


def _batch(seed=0, B=3, T=12):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, V, (B, T))
    lengths = np.array([T, 7, 3])[:B]
    mask = np.arange(T)[None] < lengths[:, None]  # right padding
    return tokens, mask


def _hf_logits(model, tokens, mask):
    with torch.no_grad():
        out = model(torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)))
    return out.logits.float().numpy()


def _zoo_logits(loaded, tokens, mask, model=None):
    model = model or loaded.model
    fn = jax.jit(lambda p, t, m: model.apply({"params": p}, t, padding_mask_BT=m))
    return np.asarray(fn(loaded.params, jnp.asarray(tokens), jnp.asarray(mask)))


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_match_transformers(saved, name):
    directory, hf_model = saved[name]
    if "sharded" in name:
        assert os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
    loaded = from_hf(directory)
    c = loaded.config
    assert (c.bos_id, c.eos_id, c.pad_id) == (BOS, EOS, 0)
    assert c.tie_embeddings == ("tied" in name and "untied" not in name)
    if name.startswith("llama3"):
        assert c.rope_scaling == (8.0, 1.0, 4.0, 32) and c.rope_theta == 500.0
        assert c.n_kv_heads == 1 and c.dim_per_head == 16
    tokens, mask = _batch()
    want, got = _hf_logits(hf_model, tokens, mask), _zoo_logits(loaded, tokens, mask)
    assert np.abs(want[mask]).max() > 1.0  # the comparison is not between near-zero numbers
    np.testing.assert_allclose(got[mask], want[mask], atol=1e-4, rtol=0)


def test_llama3_rope_scaling_matters(saved):
    """Guards the parity test: dropping the scaling must break it."""
    directory, hf_model = saved["llama3-rope-tied"]
    loaded = from_hf(directory)
    plain = loaded.model.clone(config=loaded.config.replace(rope_scaling=None))
    tokens, mask = _batch(T=40, B=1)
    want = _hf_logits(hf_model, tokens, mask)
    got = _zoo_logits(loaded, tokens, mask, model=plain)
    assert np.abs(got - want).max() > 1e-2


def _hf_generate(model, prompt, eos_token_id=None, **kw):
    """transformers' greedy continuation, EOS included when it stops at one; with
    eos_token_id None it runs every step, as fmzoo does with eos_id=None."""
    model.generation_config.eos_token_id = eos_token_id
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(
            1, len(prompt), dtype=torch.long), do_sample=False, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["gpt2-tied-sharded", "llama3-rope-tied"])
def test_greedy_generation_matches_transformers(saved, name):
    from fmzoo.infer import generate
    directory, hf_model = saved[name]
    loaded = from_hf(directory)
    rng = np.random.RandomState(1)
    prompts = [rng.randint(3, V, n).tolist() for n in (5, 9, 3)]
    got = generate(loaded.model, loaded.params, prompts, max_new_tokens=32, temperature=0.0,
                   eos_id=None)
    for prompt, tokens in zip(prompts, got):
        assert list(tokens) == _hf_generate(hf_model, prompt, max_new_tokens=32)


@pytest.mark.parametrize("name", ["gpt2-untied", "llama-gqa-untied"])
def test_history_processors_and_eos_lists_match_transformers(saved, name):
    """repetition_penalty, min_new_tokens and a two-id EOS list, greedy, against generate()."""
    from fmzoo.infer import generate
    directory, hf_model = saved[name]
    loaded = from_hf(directory)
    rng = np.random.RandomState(3)
    prompts = [rng.randint(3, V, n).tolist() for n in (6, 11)]
    run = lambda **kw: generate(loaded.model, loaded.params, prompts, max_new_tokens=20,  # noqa
                                **kw)
    free = run()
    rep = run(repetition_penalty=1.8)
    assert rep != free  # the penalty bites on these models
    for prompt, tokens in zip(prompts, rep):
        assert tokens == _hf_generate(hf_model, prompt, max_new_tokens=20, repetition_penalty=1.8)
    # two EOS ids taken from the free continuations: each row stops at whichever comes first
    eos = [free[0][7], free[1][4]]
    stopped = run(eos_id=eos)
    assert any(len(t) < 20 for t in stopped)
    for prompt, tokens in zip(prompts, stopped):
        assert tokens == _hf_generate(hf_model, prompt, max_new_tokens=20, eos_token_id=eos)
    late = run(eos_id=eos, min_new_tokens=9)
    for prompt, tokens in zip(prompts, late):
        assert tokens == _hf_generate(hf_model, prompt, max_new_tokens=20, eos_token_id=eos,
                                      min_new_tokens=9)
        assert not set(tokens[:9]) & set(eos)


def test_generation_up_to_the_context_limit_matches_transformers(saved):
    """GPT-2 (learned positions, 48): prompt + new = max_len + 1, the last token never fed.
    Llama (rotary, 64 positions): past max_position_embeddings, with a warning."""
    from fmzoo.infer import generate
    rng = np.random.RandomState(4)
    for name, n_prompt, n_new in (("gpt2-untied", 40, 9), ("llama-gqa-untied", 60, 12)):
        directory, hf_model = saved[name]
        loaded = from_hf(directory)
        prompt = rng.randint(3, V, n_prompt).tolist()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = generate(loaded.model, loaded.params, [prompt], max_new_tokens=n_new)[0]
        beyond = [w for w in caught if "not trained at these lengths" in str(w.message)]
        assert bool(beyond) == name.startswith("llama")
        assert got == _hf_generate(hf_model, prompt, max_new_tokens=n_new)


@pytest.mark.parametrize("name", ["gpt2-untied", "llama3-rope-tied"])
def test_round_trip_to_transformers(saved, name, tmp_path):
    directory, hf_model = saved[name]
    loaded = from_hf(directory)
    to_hf(loaded.params, loaded.config, str(tmp_path))
    back = _hf_class(hf_model.config).from_pretrained(str(tmp_path)).eval()
    tokens, mask = _batch(seed=3)
    np.testing.assert_array_equal(_hf_logits(back, tokens, mask)[mask],
                                  _hf_logits(hf_model, tokens, mask)[mask])
    again = from_hf(str(tmp_path))
    assert again.config == loaded.config
    jax.tree.map(np.testing.assert_array_equal, again.params, loaded.params)


@pytest.mark.parametrize("preset,extra", [
    ("gpt-tiny", {}),
    ("llama-tiny", dict(use_bias=True, head_dim=16, rope_scaling=(4.0, 1.0, 4.0, 16))),
])
def test_fmzoo_model_exports_to_transformers(preset, extra, tmp_path):
    """A model made by fmzoo (not imported) loads in transformers with the same logits."""
    config = get_config(preset, vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=48,
                        max_len=48, bos_id=BOS, eos_id=EOS, pad_id=0, **extra)
    rng = np.random.RandomState(0)
    # 0.1 std: attention far from uniform; the noise makes biases and norm scales non-trivial
    params = jax.tree.map(lambda x: np.asarray(x) * 5.0 + 0.05 * rng.standard_normal(x.shape)
                          .astype(np.float32), init(config, 0))
    to_hf(params, config, str(tmp_path))
    hf_config = json.load(open(tmp_path / "config.json"))
    hf_model = tr.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(hf_model).__name__ == hf_config["architectures"][0]
    tokens, mask = _batch(seed=4)
    got = _zoo_logits(Loaded(build(config), params, config), tokens, mask)
    want = _hf_logits(hf_model, tokens, mask)[mask]
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(got[mask], want, atol=1e-4, rtol=0)


def test_bfloat16_load(saved):
    directory, hf_model = saved["llama-gqa-untied"]
    loaded = from_hf(directory, dtype="bfloat16")
    assert loaded.config.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(loaded.params)} == {jnp.dtype(jnp.bfloat16)}
    tokens, mask = _batch()
    want, got = _hf_logits(hf_model, tokens, mask)[mask], _zoo_logits(loaded, tokens, mask)[mask]
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


def test_mesh_load_shards_each_tensor(saved):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    directory, _ = saved["llama-gqa-untied"]
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 2, 4), ("data", "fsdp", "tensor"))
    sharded, plain = from_hf(directory, mesh=mesh), from_hf(directory)
    layer = sharded.params["layers_0"]
    expect = {  # kv heads (2) do not divide tensor=4, so that axis stays whole
        ("embed", "embedding"): (sharded.params["embed"]["embedding"], P("tensor", "fsdp")),
        ("query",): (layer["attn"]["query"]["kernel"], P("fsdp", "tensor", None)),
        ("key",): (layer["attn"]["key"]["kernel"], P("fsdp", None, None)),
        ("out",): (layer["attn"]["out"]["kernel"], P("tensor", None, "fsdp")),
        ("down",): (layer["mlp"]["down"]["kernel"], P("tensor", "fsdp")),
        ("lm_head",): (sharded.params["lm_head"]["kernel"], P("fsdp", "tensor")),
    }
    for key, (x, spec) in expect.items():
        assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim), key
    for x in jax.tree.leaves(sharded.params):
        assert isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
        assert len(x.sharding.device_set) == 8
    jax.tree.map(np.testing.assert_array_equal, sharded.params, plain.params)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def copy_of(saved, tmp_path):
    def make(name):
        d = tmp_path / name
        shutil.copytree(saved[name][0], d)
        return d
    return make


def _edit_json(path, **kw):
    data = json.load(open(path))
    data.update(kw)
    json.dump(data, open(path, "w"))


def test_unknown_architecture(copy_of):
    d = copy_of("gpt2-untied")
    _edit_json(d / "config.json", architectures=["BertForMaskedLM"], model_type="bert")
    with pytest.raises(CheckpointError, match="BertForMaskedLM.*GPT2LMHeadModel, LlamaForCausalLM"):
        from_hf(str(d))


def test_missing_tensor(copy_of):
    from safetensors.numpy import load_file, save_file
    d = copy_of("llama-gqa-untied")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"], tensors["lm_head.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError,
                       match=r"missing tensor\(s\) lm_head.weight, model.layers.1.self_attn.k_proj"):
        from_hf(str(d))


def test_shape_mismatch(copy_of):
    d = copy_of("llama-gqa-untied")
    _edit_json(d / "config.json", intermediate_size=80)
    with pytest.raises(CheckpointError,
                       match=r"model.layers.0.mlp.gate_proj.weight has shape \(64, 32\).*\(80, 32\)"):
        from_hf(str(d))


def test_pickle_weights_refused(tmp_path, saved):
    _, hf_model = saved["gpt2-untied"]
    hf_model.config.save_pretrained(tmp_path)
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*safetensors only.*arbitrary "
                                              r"code.*safe_serialization=True"):
        from_hf(str(tmp_path))


def test_no_config_json(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        from_hf(str(tmp_path))


def test_unsupported_llama_variant(copy_of):
    d = copy_of("llama-gqa-untied")
    _edit_json(d / "config.json", attention_bias=True, mlp_bias=False)
    with pytest.raises(CheckpointError, match="attention_bias=True with mlp_bias=False"):
        from_hf(str(d))
    _edit_json(d / "config.json", attention_bias=False, rope_parameters={
        "rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(CheckpointError, match="rope_type='yarn'"):
        from_hf(str(d))


def test_export_checks_params_first(tmp_path):
    config = get_config("gpt-tiny", n_layers=1, d_model=32, d_ff=64, vocab_size=V,
                        bos_id=BOS, eos_id=EOS, pad_id=0)
    params = init(config, 0)
    params["layers_0"]["mlp"]["up"]["kernel"] = jnp.zeros((32, 7))
    with pytest.raises(CheckpointError, match=r"layers_0/mlp/up/kernel has shape \(32, 7\).*"
                                              r"\(32, 64\)"):
        to_hf(params, config, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="grouped-query attention"):
        to_hf(params, config.replace(n_kv_heads=2), str(tmp_path / "out"))


# ----------------------------------------------------------------------------- tokenizer


def _word_tokenizer(directory):
    """A WordLevel tokenizer whose V words cover the model's whole vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = "hello world from the tiny zoo cat sat on mat a dog ran to park".split()
    names = ["<unk>", "<s>", "</s>"] + words
    names += [f"w{i}" for i in range(V - len(names))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(names[:3])
    tok.save(os.path.join(directory, "tokenizer.json"))


@pytest.fixture
def with_tokenizer(copy_of):
    d = copy_of("llama3-rope-tied")
    _word_tokenizer(str(d))
    return d


def test_tokenizer_loaded_with_checkpoint_ids(with_tokenizer):
    loaded = from_hf(str(with_tokenizer))
    tok = loaded.tokenizer
    assert (tok.bos_id, tok.eos_id) == (BOS, EOS)
    ids = tok.encode("the cat ran to the park")
    assert tok.decode(ids) == "the cat ran to the park" and 2 < min(ids) and max(ids) < V
    assert tok.encode("the cat", add_bos=True)[0] == BOS


def test_cli_generate_with_checkpoint_tokenizer(with_tokenizer, saved, capsys):
    from fmzoo.cli import main
    tok = from_hf(str(with_tokenizer)).tokenizer
    prompt = "hello world from the"
    _, hf_model = saved["llama3-rope-tied"]
    want = tok.decode(_hf_generate(hf_model, tok.encode(prompt, add_bos=True), max_new_tokens=4))
    assert len(want.split()) >= 2
    assert main(["generate", "--model", str(with_tokenizer), "--prompt", prompt,
                 "--max-new-tokens", "4", "--temperature", "0", "--no-eos"]) == 0
    assert want in capsys.readouterr().out


# ----------------------------------------------------------------------------- one-line errors


def _cli_error(directory, capsys):
    """What `fmzoo generate --model DIR` prints: exactly one 'error: ...' line, exit 2."""
    from fmzoo.cli import main
    assert main(["generate", "--model", str(directory), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_garbage_and_truncated_safetensors_are_one_line_errors(copy_of, capsys):
    d = copy_of("llama-gqa-untied")
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    err = _cli_error(d, capsys)
    assert f"{weights} is not a readable safetensors file" in err and "truncated" in err
    weights.write_bytes(b"\x00garbage" * 10)
    assert f"{weights} is not a readable safetensors file" in _cli_error(d, capsys)


def test_bad_config_json_is_a_one_line_error(copy_of, capsys):
    d = copy_of("gpt2-untied")
    cfg = d / "config.json"
    original = json.load(open(cfg))
    json.dump({k: v for k, v in original.items() if k != "n_embd"}, open(cfg, "w"))
    assert _cli_error(d, capsys) == (f"error: {cfg}: missing key 'n_embd', which "
                                     "GPT2LMHeadModel needs; the file is incomplete: download "
                                     "or save it again")
    json.dump({**original, "n_layer": "2"}, open(cfg, "w"))
    assert _cli_error(d, capsys) == (f"error: {cfg}: n_layer must be an integer, got '2' (a "
                                     "str); fix that value in config.json")
    json.dump([original], open(cfg, "w"))
    assert _cli_error(d, capsys) == (f"error: {cfg} holds a JSON list, not an object; it "
                                     "should map config keys to values (download it again)")
    cfg.write_text('{"n_embd": 3')
    assert _cli_error(d, capsys).startswith(f"error: {cfg} is not valid JSON (")


def test_corrupt_tokenizer_json_names_the_file(copy_of, capsys):
    d = copy_of("gpt2-untied")
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    err = _cli_error(d, capsys)
    assert err.startswith(f"error: {d / 'tokenizer.json'} is not a readable tokenizer")


# ----------------------------------------------------------------------------- fmzoo.load


def test_load_honours_dtype_and_overrides_for_an_hf_dir(saved):
    import fmzoo
    from fmzoo.models.config import ConfigError
    directory, _ = saved["llama-gqa-untied"]
    loaded = fmzoo.load(directory, dtype="bfloat16", attention_impl="reference")
    assert loaded.config.dtype == loaded.config.param_dtype == "bfloat16"
    assert loaded.config.attention_impl == "reference"
    assert {x.dtype for x in jax.tree.leaves(loaded.params)} == {jnp.dtype(jnp.bfloat16)}
    tokens, mask = _batch()
    bf16, fp32 = _zoo_logits(loaded, tokens, mask), _zoo_logits(fmzoo.load(directory), tokens, mask)
    assert not np.array_equal(bf16, fp32)  # the model really ran in bf16 ...
    np.testing.assert_allclose(bf16, fp32, atol=0.15)  # ... on the same weights
    with pytest.raises(ConfigError, match=r"override\(s\) d_ff would change the shapes"):
        fmzoo.load(directory, d_ff=128)
    with pytest.raises(ConfigError, match=r"LMConfig has no field 'n_hedas'; did you mean "
                                          r"n_heads"):
        fmzoo.load(directory, n_hedas=2)
