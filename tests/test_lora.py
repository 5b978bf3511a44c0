"""LoRA adapters (fmzoo.models.lora): merged == unmerged forward, the initial model is the
base model exactly, the update has rank <= R, boxed adapters shard like their kernels, the
spec's validation, and a LoRA workdir loading as merged weights."""

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmzoo.models import lora, registry
from fmzoo.models.lora import LoraError, LoraSpec
from fmzoo.models.sharding import boxed_shardings
from fmzoo.models.tokenizer import ByteTokenizer
from fmzoo.models.workdir import RUN_FILE, load_workdir, write_json_atomic
from fmzoo.train.checkpoint import Checkpointer, write_run_file
from fmzoo.train.mesh import make_mesh
from fmzoo.train.state import create_train_state

TOKENS = jnp.array([[5, 9, 200, 3, 17, 44, 2, 81], [1, 2, 3, 4, 5, 6, 7, 8]], jnp.int32)


def tiny(name, **kw):
    return registry.get_config(name, n_layers=1, **kw)


@functools.lru_cache(maxsize=None)
def init(config):
    """Random params of the config's shapes, drawn in numpy (a flax init compiles: seconds)."""
    rng = np.random.default_rng(0)

    def draw(path, s):  # norm scales near 1, as a trained model has them
        mean = 1.0 if getattr(path[-1], "key", None) == "scale" else 0.0
        return jnp.asarray(rng.normal(mean, 0.05, s.shape), s.dtype)
    return jax.tree_util.tree_map_with_path(draw, registry.param_shapes(config))


# compiled once per (spec, shapes) and shared by the tests
_init_adapters = jax.jit(lora.init_adapters, static_argnums=1)
merge = jax.jit(lora.merge, static_argnums=2)


def adapters_for(params, spec, seed=1):
    return _init_adapters(params, spec, jax.random.key(seed))


def adapted_paths(config, *targets):
    ad = jax.eval_shape(lambda p: lora.init_adapters(p, LoraSpec(2, 4.0, targets),
                                                     jax.random.key(0)),
                        registry.param_shapes(config))
    return sorted({k.rsplit("/", 1)[0] for k in flat(ad)})


def random_adapters(params, spec, seed=3, std=0.05):
    """Adapters of init_adapters' structure with every factor random (B != 0, so the update
    is not zero), drawn in numpy."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda p: lora.init_adapters(p, spec, jax.random.key(0)), params)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, std, s.shape), s.dtype), shapes)


def flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in p): v
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("name,kw", [("gpt-tiny", {}), ("llama-tiny", {}),
                                     ("llama-tiny", {"remat": "full"})])
def test_merged_forward_equals_the_unmerged_lora_forward(name, kw):
    config = tiny(name, **kw)
    model, params = registry.build(config), init(config)
    spec = LoraSpec(rank=4, alpha=8.0)
    adapters = random_adapters(params, spec)
    merged = merge(params, adapters, spec)
    apply = jax.jit(model.apply)
    out_merged, out_base = apply({"params": merged}, TOKENS), apply({"params": params}, TOKENS)
    out_unmerged = jax.jit(lambda p, a, x: lora.unmerged_apply(model, p, a, spec, x))(
        params, adapters, TOKENS)
    assert float(jnp.abs(out_merged - out_base).max()) > 1e-2  # the adapters do something
    np.testing.assert_allclose(out_merged, out_unmerged, atol=2e-5, rtol=1e-5)
    changed = {k for k, v in flat(merged).items()
               if not np.array_equal(v, flat(params)[k])}
    kernels = {"attn/query", "attn/key", "attn/value", "attn/out", "mlp/up", "mlp/down"}
    kernels |= {"mlp/gate"} if name.startswith("llama") else set()
    assert changed == {f"layers_0/{k}/kernel" for k in kernels}


def test_targets_select_modules_scopes_paths_and_hf_names():
    gpt = tiny("gpt-tiny")
    assert adapted_paths(gpt, "attn/out") == ["layers_0/attn/out"]
    assert adapted_paths(gpt, "q_proj", "v_proj") == ["layers_0/attn/query",
                                                      "layers_0/attn/value"]
    assert adapted_paths(gpt, "mlp") == ["layers_0/mlp/down", "layers_0/mlp/up"]
    assert adapted_paths(gpt, "out") == ["layers_0/attn/out"]  # the only `out` in a GPT
    assert adapted_paths(tiny("llama-tiny"), "layers_0/mlp", "lm_head") == [
        "layers_0/mlp/down", "layers_0/mlp/gate", "layers_0/mlp/up", "lm_head"]


def test_initial_merge_is_the_base_model_exactly_in_every_dtype():
    for dtype in ("float32", "bfloat16"):
        params = init(tiny("llama-tiny", param_dtype=dtype, dtype=dtype))
        adapters = adapters_for(params, LoraSpec(4, 8.0), 1)
        assert {x.dtype for x in jax.tree.leaves(adapters)} == {jnp.dtype(dtype)}
        b = [v for k, v in flat(adapters).items() if k.endswith("lora_b")]
        assert all(not np.any(np.asarray(x)) for x in b)
        merged = merge(params, adapters, LoraSpec(4, 8.0))
        assert jax.tree.structure(merged) == jax.tree.structure(params)
        for k, v in flat(params).items():
            assert flat(merged)[k].dtype == v.dtype
            np.testing.assert_array_equal(np.asarray(flat(merged)[k], np.float32),
                                          np.asarray(v, np.float32))


def test_a_is_kaiming_uniform_over_the_kernel_fan_in():
    params = init(tiny("llama-tiny"))
    a = adapters_for(params, LoraSpec(4, 8.0), 0)["layers_0"]["attn"]
    q, o = np.asarray(a["query"]["lora_a"]), np.asarray(a["out"]["lora_a"])
    assert q.shape == (128, 4) and o.shape == (4, 32, 4)  # out [H, D, E]: inputs H and D
    bound = 1 / np.sqrt(128)
    assert np.abs(q).max() <= bound and np.abs(q).max() > 0.9 * bound
    assert abs(q.std() - bound / np.sqrt(3)) < 0.1 * bound / np.sqrt(3)  # U(-b, b)
    assert np.abs(o).max() <= 1 / np.sqrt(4 * 32)


def test_delta_has_rank_at_most_r_and_is_what_merge_adds():
    config = tiny("llama-tiny")
    params = init(config)
    spec = LoraSpec(rank=4, alpha=8.0)
    adapters = random_adapters(params, spec, std=0.3)
    deltas = flat(jax.jit(lambda a: lora.delta(a, spec))(adapters))
    merged = flat(merge(params, adapters, spec))
    assert len(deltas) == 7
    for path, d in deltas.items():
        base = flat(params)[path]
        assert d.shape == base.shape and d.dtype == jnp.float32
        n_in = 2 if "/attn/out/" in path else 1
        matrix = d.reshape(int(np.prod(d.shape[:n_in])), -1)
        assert np.linalg.matrix_rank(np.asarray(matrix)) == 4  # random factors: exactly R
        np.testing.assert_allclose(merged[path], base + d, atol=1e-6)
    small = lora.delta(adapters_for(params, LoraSpec(1, 1.0, ("gate",)), 2), spec)
    assert not np.any(np.asarray(small["layers_0"]["mlp"]["gate"]["kernel"]))  # B = 0


def test_boxed_adapters_shard_like_their_kernels():
    config = tiny("llama-tiny")
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    spec = LoraSpec(4, 8.0)
    boxed = jax.eval_shape(lambda: lora.init_adapters(
        registry.init_boxed(config, jax.random.key(0)), spec, jax.random.key(1), boxed=True))
    assert isinstance(boxed["layers_0"]["attn"]["query"]["lora_a"], nn.Partitioned)
    shard = {k: v.spec for k, v in flat(boxed_shardings(boxed, mesh)).items()}
    P = jax.sharding.PartitionSpec
    attn = "layers_0/attn/"
    assert shard[attn + "query/lora_a"] == P("fsdp", None)
    assert shard[attn + "query/lora_b"] == P(None, "tensor", None)
    assert shard[attn + "out/lora_a"] == P("tensor", None, None)
    assert shard[attn + "out/lora_b"] == P(None, "fsdp")
    kernels = {k: v.spec for k, v in flat(registry.param_shardings_for(config, mesh)).items()}
    for path, s in shard.items():
        module, factor = path.rsplit("/", 1)
        k = tuple(kernels[module + "/kernel"])
        n_in = 2 if module.endswith("attn/out") else 1
        want = k[:n_in] + (None,) if factor == "lora_a" else (None,) + k[n_in:]
        assert tuple(s) + (None,) * (len(want) - len(s)) == want, path
    assert lora.tree_shardings(config, spec, mesh)["lora"]["layers_0"]["mlp"]["down"][
        "lora_b"].spec == P(None, "fsdp")
    # merging boxed params keeps every box and its names
    base = registry.boxed_shapes(config)
    merged = jax.eval_shape(lambda p, a: lora.merge(p, a, spec), base, boxed)
    assert nn.get_partition_spec(merged) == nn.get_partition_spec(base)


def test_spec_validation_and_json_round_trip():
    spec = LoraSpec(rank=8, alpha=16, targets=("q_proj", "attn/o_proj", "mlp"))
    assert spec.targets == ("query", "attn/out", "mlp") and spec.scale == 2.0
    assert LoraSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert LoraSpec(2, 1.0).targets == lora.DEFAULT_TARGETS == ("attn", "mlp")
    for bad, msg in [(dict(rank=0, alpha=1.0), "rank must be an integer >= 1, got 0"),
                     (dict(rank=True, alpha=1.0), "rank must be an integer >= 1, got True"),
                     (dict(rank=2, alpha=0.0), "alpha must be a number > 0, got 0.0"),
                     (dict(rank=2, alpha=1.0, targets=("query", "")), "non-empty module names")]:
        with pytest.raises(LoraError, match=msg):
            LoraSpec(**bad)
    with pytest.raises(LoraError, match="unknown: beta; missing: alpha"):
        LoraSpec.from_dict({"rank": 2, "beta": 1})
    llama = registry.param_shapes(tiny("llama-tiny"))
    with pytest.raises(LoraError, match=r"target\(s\) qkv, c_attn match no kernel of this model; "
                       r"it has modules down, gate, key, lm_head, out, query, up, value; "
                       r"scopes attn, mlp"):
        lora.check_spec(llama, LoraSpec(2, 1.0, ("qkv", "query", "c_attn")))
    # key/value of llama-tiny are [128, 2 kv heads, 32]: their smaller side is 64
    with pytest.raises(LoraError, match=r"rank 65 is larger than the smaller side of "
                       r"layers_0/attn/key \(64\), layers_0/attn/value \(64\); lower --lora-rank"):
        lora.check_spec(llama, LoraSpec(65, 1.0))
    lora.check_spec(llama, LoraSpec(64, 1.0))
    with pytest.raises(LoraError, match="match no kernel.*modules hn, hr, hz, in, ir, iz, out"):
        lora.check_spec(registry.param_shapes(registry.get_config("rnn-seq2seq")),
                        LoraSpec(2, 1.0))
    with pytest.raises(LoraError, match="boxed adapters need boxed params"):
        lora.init_adapters(llama, LoraSpec(2, 1.0), jax.random.key(0), boxed=True)


def test_merge_refuses_adapters_of_another_model():
    spec = LoraSpec(2, 1.0)

    def merge_abstract(model_config, adapters_config):  # shapes only: the checks run on trace
        ad = jax.eval_shape(lambda p: lora.init_adapters(p, spec, jax.random.key(0)),
                            registry.param_shapes(adapters_config))
        return jax.eval_shape(lambda p, a: lora.merge(p, a, spec),
                              registry.param_shapes(model_config), ad)
    gpt = tiny("gpt-tiny")
    with pytest.raises(LoraError, match="adapter at layers_0/attn/key makes an update of shape "
                       r"\(64, 4, 16\), but the kernel is \(128, 4, 32\)"):
        merge_abstract(gpt, tiny("gpt-tiny", d_model=64, d_ff=128))
    with pytest.raises(LoraError, match="adapters for layers_1/attn/key.* have no kernel"):
        merge_abstract(gpt, registry.get_config("gpt-tiny", n_layers=2))


@pytest.fixture(scope="module")
def lora_workdir(tmp_path_factory):
    """A workdir as a LoRA SFT run leaves it: the Trainer's Checkpointer saving a TrainState
    whose params are {"base", "lora"}, and the run file's top-level "lora" entry."""
    config = tiny("llama-tiny")
    spec = LoraSpec(rank=4, alpha=8.0, targets=("query", "value", "mlp"))
    params = init(config)
    tree = {"base": params,
            "lora": random_adapters(params, spec, std=0.1)}
    work = tmp_path_factory.mktemp("lora") / "w"
    work.mkdir()
    write_run_file(str(work), config, {})
    with open(work / RUN_FILE) as f:
        run = json.load(f)
    write_json_atomic(str(work / RUN_FILE), {**run, "lora": spec.to_dict()})
    ByteTokenizer().save(str(work / "tokenizer"))
    state = create_train_state(tree, optax.sgd(0.1))
    ckpt = Checkpointer(str(work), async_save=False)
    ckpt.save(state.replace(step=np.asarray(3, state.step.dtype)), {})
    ckpt.close()
    return work, config, lora.merge_tree(tree, spec)


def test_load_workdir_of_a_lora_run_gives_merged_weights(lora_workdir):
    import fmzoo

    work, config, merged = lora_workdir
    for loaded in (load_workdir(str(work)), fmzoo.load(str(work))):
        assert loaded.config == config
        assert jax.tree.structure(loaded.params) == jax.tree.structure(merged)
        for k, v in flat(merged).items():
            np.testing.assert_array_equal(np.asarray(flat(loaded.params)[k]), np.asarray(v))
    mesh = make_mesh("fsdp=4,tensor=2")
    sharded = load_workdir(str(work), mesh=mesh).params
    q = sharded["layers_0"]["attn"]["query"]["kernel"]
    assert q.sharding.spec == registry.param_shardings_for(config, mesh)[
        "layers_0"]["attn"]["query"]["kernel"].spec
    np.testing.assert_array_equal(np.asarray(q),
                                  np.asarray(merged["layers_0"]["attn"]["query"]["kernel"]))
    bf16 = flat(load_workdir(str(work), dtype="bfloat16").params)
    for k, v in flat(merged).items():  # merged at the stored fp32, then cast once
        assert bf16[k].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(bf16[k], np.float32),
                                      np.asarray(v.astype(jnp.bfloat16), np.float32))


def test_export_of_a_lora_workdir_writes_merged_weights(lora_workdir, tmp_path):
    import fmzoo
    from fmzoo.cli_export import export

    work, _, merged = lora_workdir
    out = export(str(work), str(tmp_path / "hf"))
    back = fmzoo.load(out)
    for k, v in flat(merged).items():
        np.testing.assert_allclose(np.asarray(flat(back.params)[k]), np.asarray(v), atol=1e-6)


def test_a_corrupt_lora_entry_is_named(lora_workdir, tmp_path):
    import shutil

    from fmzoo.models.workdir import CheckpointError

    work, _, _ = lora_workdir
    copy = tmp_path / "w"
    shutil.copytree(work, copy)
    with open(copy / RUN_FILE) as f:
        run = json.load(f)
    write_json_atomic(str(copy / RUN_FILE), {**run, "lora": {"rank": 0, "alpha": 1.0}})
    with pytest.raises(CheckpointError, match=r"the 'lora' entry of .*fmzoo_run.json is corrupt "
                       r"\(LoRA rank must be an integer >= 1, got 0"):
        load_workdir(str(copy))
    assert os.path.isdir(work / "checkpoints" / "3")
