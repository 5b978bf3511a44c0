"""scan_layers: a decoder LM whose blocks run under one `nn.scan` (params stacked on a leading
[n_layers] axis) computes what the unscanned model computes with the same weights: logits,
cached decoding, gradients under remat, sharded init; layouts convert exactly and a wrong
layout is refused with one clear message."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import fmzoo
from fmzoo.infer import generate
from fmzoo.models import build, get_config, init, logical_axes
from fmzoo.models.cache import KVCache, StackedKVCache
from fmzoo.models.config import ConfigError
from fmzoo.models.scan import (ScanLayoutError, match_layout, stack_layers, unstack_layers,
                               with_scan_layers)

SMALL = {
    "gpt": ("gpt-tiny", dict(n_layers=2, d_model=32, n_heads=4, d_ff=64, max_len=32)),
    "llama": ("llama-tiny", dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
                                 max_len=32)),
}


def pair(flavor, **kw):
    """(unscanned config, scanned config, unscanned params, the same params stacked)."""
    name, small = SMALL[flavor]
    config = get_config(name, **small, **kw)
    params = init(config, 0)
    # perturbed: fresh norms and zero biases would hide a layer mixed up with another
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = tree.unflatten([x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                             for x, k in zip(leaves, keys)])
    scanned = config.replace(scan_layers=True)
    return config, scanned, params, stack_layers(params, config.n_layers)


def tokens(B=3, T=10, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, 256, (B, T)), jnp.int32)


@pytest.mark.parametrize("flavor", ["gpt", "llama"])
def test_scanned_logits_equal_unscanned_with_stacked_weights(flavor):
    config, scanned, params, stacked = pair(flavor)
    # the scanned model's own init has exactly the stacked layout
    own = init(scanned, 0)
    assert jax.tree.map(jnp.shape, own) == jax.tree.map(jnp.shape, stacked)
    assert set(own) == {k for k in params if not k.startswith("layers_")} | {"layers"}
    x = tokens()
    ref = jax.jit(build(config).apply)({"params": params}, x)
    out = jax.jit(build(scanned).apply)({"params": stacked}, x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert not np.allclose(ref[:, :, :5], 0)  # a real comparison, not two zero tensors


def test_stack_unstack_round_trip_is_exact():
    config, _, params, stacked = pair("llama")
    q = stacked["layers"]["attn"]["query"]["kernel"]
    assert q.shape == (2,) + params["layers_0"]["attn"]["query"]["kernel"].shape
    np.testing.assert_array_equal(q[1], params["layers_1"]["attn"]["query"]["kernel"])
    back = unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    # the layout check converts, both ways, or leaves a matching tree alone
    assert match_layout(params, config) is params
    assert set(match_layout(params, config.replace(scan_layers=True))) == set(stacked)


def test_boxed_names_get_the_layers_axis_and_it_is_unsharded():
    _, scanned, _, _ = pair("gpt")
    axes = logical_axes(scanned)
    assert axes["layers"]["attn"]["query"]["kernel"] == P("layers", "embed", "heads",
                                                          "head_dim")
    assert axes["layers"]["mlp_norm"]["scale"] == P("layers", "norm")
    from fmzoo.models.sharding import LOGICAL_AXIS_RULES
    assert ("layers", None) in LOGICAL_AXIS_RULES


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_and_scan_give_the_same_gradients(remat):
    config, scanned, params, stacked = pair("gpt", remat=remat)
    x = tokens(2, 8)

    def loss(model):
        return lambda p: jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, x))[..., 7])
    g_ref = jax.jit(jax.grad(loss(build(config.replace(remat="none")))))(params)
    g = jax.jit(jax.grad(loss(build(scanned))))(stacked)
    for a, b in zip(jax.tree.leaves(stack_layers(g_ref, 2)), jax.tree.leaves(g)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("flavor", ["gpt", "llama"])
def test_cached_generation_equals_unscanned(flavor):
    config, scanned, params, stacked = pair(flavor)
    prompts = [[5, 17, 42], [7, 1, 99, 3, 12, 250, 8], [200, 30]]
    ref = generate(build(config), params, prompts, max_new_tokens=6)
    out = generate(build(scanned), stacked, prompts, max_new_tokens=6)
    assert out == ref and len(set(map(tuple, ref))) > 1
    # the decode state: one stacked array per k/v, batch leading (beam search gathers rows)
    cache = build(scanned).init_cache(3, 12)
    assert isinstance(cache, StackedKVCache) and isinstance(cache, KVCache)
    assert cache.k.shape == (3, 2, 12, config.n_kv_heads, config.dim_per_head)
    assert cache.logical_axes().k == P("batch", "layers", "cache_len", "kv_heads", "head_dim")
    # prefill then one decode step: logits and the written cache match layer by layer
    def prefill_then_step(model, p, cache, x, mask):
        _, cache = model.apply({"params": p}, x, mask, cache, method=model.prefill)
        return model.apply({"params": p}, x[:, 0], cache, method=model.decode_step)
    m, ms = build(config), build(scanned)
    x, mask = tokens(3, 5), jnp.ones((3, 5), bool)
    run = jax.jit(prefill_then_step, static_argnums=0)
    a, c = run(m, params, m.init_cache(3, 12), x, mask)
    b, cs = run(ms, stacked, cache, x, mask)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cs.k, jnp.stack(c.k, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cs.lengths, c.lengths)


def test_beam_search_reorders_the_stacked_cache():
    config, scanned, params, stacked = pair("gpt")
    prompts = [[5, 17, 42], [7, 1, 99, 3]]
    kw = dict(max_new_tokens=5, num_beams=3)
    assert generate(build(scanned), stacked, prompts, **kw) == generate(
        build(config), params, prompts, **kw)


@pytest.mark.parametrize("spec", ["fsdp=8", "fsdp=4,tensor=2"])
def test_sharded_init_and_step_with_scan(spec):
    from fmzoo.train.mesh import make_mesh, put_batch
    from fmzoo.train.state import sharded_init
    from fmzoo.train.step import make_train_step
    from train_helpers import batches, setup
    from fmzoo.models.registry import param_shardings_for
    config, scanned, _, _ = pair("llama")
    config = config.replace(d_model=64, n_heads=4, n_kv_heads=2, d_ff=128)
    scanned = config.replace(scan_layers=True)
    loss_fn, tx = setup(scanned)
    mesh = make_mesh(spec)
    state, shardings = sharded_init(scanned, tx, mesh)
    flat = param_shardings_for(config, mesh)["layers_0"]
    # the layer axis stays whole; the rest is split exactly like an unscanned layer's
    for path in [("attn", "query", "kernel"), ("attn", "out", "kernel"), ("mlp", "up", "kernel")]:
        got, want = state.params["layers"], flat
        for k in path:
            got, want = got[k], want[k]
        assert got.sharding.spec == P(None, *want.spec), path
        assert got.addressable_shards[0].data.shape[0] == scanned.n_layers
    assert "fsdp" in str(flat["mlp"]["up"]["kernel"].spec)
    state, metrics = make_train_step(loss_fn, tx, mesh, shardings)(
        state, put_batch(batches("llama", 1)[0], mesh))
    assert np.isfinite(float(metrics["loss"]))


def test_bad_uses_give_one_clear_error():
    config, scanned, params, stacked = pair("gpt")
    with pytest.raises(ConfigError, match="has no field"):
        get_config("transformer-seq2seq").replace(scan_layers=True)
    with pytest.raises(ConfigError, match=r"scan_layers must be true or false"):
        config.replace(scan_layers="yes")
    with pytest.raises(ScanLayoutError, match=r"layers_0, layers_1, \.\.\.\) but the model is "
                       r"built with scan_layers=True; convert them with .*stack_layers"):
        match_layout(params, scanned, convert=False)
    with pytest.raises(ScanLayoutError, match="stacked for scan_layers=True .*unstack_layers"):
        match_layout(stacked, config, convert=False)
    with pytest.raises(ScanLayoutError, match="stack_layers expects layers_0..layers_2"):
        stack_layers(params, 3)
    from fmzoo.models.lora import LoraError, LoraSpec, check_spec
    with pytest.raises(LoraError, match="stacked for scan_layers=True"):
        check_spec(stacked, LoraSpec(2, 4.0))


def test_load_converts_a_preset_and_refuses_other_families():
    loaded = fmzoo.load("gpt-tiny", n_layers=2, d_model=32, d_ff=64, max_len=32)
    flat = loaded.params
    s = with_scan_layers(loaded, True)
    assert s.config.scan_layers and "layers" in s.params and "layers_0" not in s.params
    x = tokens(2, 6)
    np.testing.assert_allclose(s.model.apply({"params": s.params}, x),
                               loaded.model.apply({"params": flat}, x), rtol=1e-5, atol=1e-5)
    assert "layers_1" in with_scan_layers(s, False).params
    with pytest.raises(ScanLayoutError, match="option of decoder-only LMs"):
        with_scan_layers(fmzoo.load("transformer-seq2seq", d_model=32, d_ff=64), True)


def test_hf_export_and_load_convert_the_layout(tmp_path):
    from fmzoo.models.hf import to_hf
    config, scanned, params, stacked = pair("llama")
    to_hf(params, config, str(tmp_path / "flat"))
    to_hf(stacked, scanned, str(tmp_path / "scanned"))
    files = [(tmp_path / d / "model.safetensors").read_bytes() for d in ("flat", "scanned")]
    assert files[0] == files[1]  # the same Hugging Face checkpoint, one entry per layer
    loaded = fmzoo.load(str(tmp_path / "scanned"), scan_layers=True)
    assert loaded.config.scan_layers
    assert loaded.params["layers"]["mlp"]["up"]["kernel"].shape[0] == 2
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(stacked)):
        np.testing.assert_array_equal(a, b)
    from fmzoo.models.hf import from_hf
    with pytest.raises(ConfigError, match="scan_layers changes the stored params' layout.*"
                       "pass scan_layers to fmzoo.load, which converts"):
        from_hf(str(tmp_path / "flat"), overrides={"scan_layers": True})
