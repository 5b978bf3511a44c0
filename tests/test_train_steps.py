"""Step functions on 8 simulated devices: single-device jit == mesh-sharded jit == pmap,
params laid out by the rules, accumulation == one big batch, mesh errors, losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fmzoo.train.losses import masked_cross_entropy
from fmzoo.train.mesh import MeshError, make_mesh
from fmzoo.train.state import init_train_state, state_shardings, state_shapes
from fmzoo.train.step import make_pmap_step, replicate, shard_batch, unreplicate
from train_helpers import batches, local_numpy, setup, tiny_config, train_on_mesh

ATOL = 5e-5  # three AdamW steps at lr 1e-2; fp32 reductions in a different order


def assert_trees_close(a, b, atol=ATOL):
    a, b = local_numpy(a), local_numpy(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=atol, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def gpt_single():
    config = tiny_config("gpt")
    data = batches("gpt", 3)
    losses, state = train_on_mesh(config, data, "data=1", jax.devices()[:1])
    return config, data, losses, state


def test_mesh_sharded_equals_single_device_and_follows_rules(gpt_single):
    config, data, losses1, state1 = gpt_single
    losses, state = train_on_mesh(config, data, "data=2,fsdp=2,tensor=2")
    np.testing.assert_allclose(losses, losses1, rtol=1e-5)
    assert losses[-1] < losses[0]  # three steps on the same data distribution do something
    assert_trees_close(state.params, state1.params)
    layer = state.params["layers_0"]
    # rules: embed -> fsdp, vocab/heads/mlp -> tensor, norm -> replicated
    assert state.params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert layer["mlp"]["up"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert layer["mlp"]["down"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert layer["attn"]["query"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
    assert layer["attn_norm"]["scale"].sharding.spec == P(None)
    kernel = layer["mlp"]["up"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == (32 // 2, 64 // 2)
    # the AdamW moments are laid out exactly like their params
    adam = state.opt_state[1][0]
    assert adam.mu["layers_0"]["mlp"]["up"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert adam.nu["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert state.step.sharding.spec == P() and int(state.step) == 3


def test_pmap_equals_single_device(gpt_single):
    config, data, losses1, state1 = gpt_single
    loss_fn, tx = setup(config)
    state = replicate(init_train_state(config, tx))
    step = make_pmap_step(loss_fn, tx)
    losses = []
    for b in data:
        state, m = step(state, shard_batch(b, jax.local_device_count()))
        losses.append(float(m["loss"][0]))
    np.testing.assert_allclose(losses, losses1, rtol=1e-5)
    assert_trees_close(unreplicate(state).params, state1.params)


def test_accumulated_microbatches_equal_one_big_batch(gpt_single):
    config, data, losses1, state1 = gpt_single
    losses, state = train_on_mesh(config, data, "data=1", jax.devices()[:1], accum=4)
    np.testing.assert_allclose(losses, losses1, rtol=1e-5)
    assert_trees_close(state.params, state1.params)


@pytest.mark.parametrize("family", ["llama", "encdec", "rnn"])
def test_fsdp_and_tensor_parallel_for_every_family(family):
    config = tiny_config(family)
    data = batches(family, 2)
    l1, s1 = train_on_mesh(config, data, "data=1", jax.devices()[:1])
    l8, s8 = train_on_mesh(config, data, "data=2,fsdp=2,tensor=2")
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    assert_trees_close(s8.params, s1.params)
    specs = {s.spec for s in jax.tree.leaves(jax.tree.map(lambda a: a.sharding, s8.params))}
    flat = {name for spec in specs for e in spec if e for name in (e if isinstance(e, tuple) else (e,))}
    assert {"fsdp", "tensor"} <= flat, specs  # the model really is split both ways


def test_optimizer_state_shardings_mirror_params():
    config = tiny_config("llama")
    _, tx = setup(config)
    mesh = make_mesh("fsdp=4,tensor=2")
    sh = state_shardings(config, state_shapes(config, tx), mesh, tx)
    mu = sh.opt_state[1][0].mu
    assert jax.tree.map(lambda s: s.spec, mu) == jax.tree.map(lambda s: s.spec, sh.params)
    assert sh.opt_state[1][0].count.spec == P()


def test_mesh_errors_name_the_problem():
    with pytest.raises(MeshError, match=r"has 12 devices but 8 are available.*data=8"):
        make_mesh("data=3,fsdp=2,tensor=2")
    with pytest.raises(MeshError, match=r"unknown mesh axis 'model'.*data, fsdp, tensor"):
        make_mesh("data=4,model=2")
    with pytest.raises(MeshError, match="not an integer"):
        make_mesh("data=two")
    assert dict(make_mesh("tensor=2,data=-1").shape) == {"data": 4, "fsdp": 1, "tensor": 2}


def test_masked_cross_entropy_matches_manual():
    rs = np.random.RandomState(0)
    logits = rs.randn(2, 5, 7).astype(np.float32)
    targets = rs.randint(0, 7, (2, 5))
    mask = (rs.rand(2, 5) > 0.4).astype(np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    loss, m = masked_cross_entropy(logits, targets, mask)
    np.testing.assert_allclose(loss, (nll * mask).sum() / mask.sum(), rtol=1e-5)
    acc = ((logits.argmax(-1) == targets) * mask).sum() / mask.sum()
    np.testing.assert_allclose(m["accuracy"], acc, rtol=1e-6)
    assert float(m["tokens"]) == mask.sum()


def test_gradient_clipping_stops_a_spike_from_steering_later_steps():
    """A spike (gradient norm 1e4) then a normal gradient pointing back: clipped at norm 1,
    the spike leaves AdamW's momentum small and the second update turns round at once;
    unclipped, the spike's momentum keeps carrying the parameters the old way."""
    import optax
    from fmzoo.train.optim import make_optimizer
    g = {"w": jnp.arange(1.0, 17.0).reshape(4, 4), "b": jnp.ones(4)}
    unit = jax.tree.map(lambda x: x / optax.tree.norm(g), g)

    def second_update_direction(clip_norm):
        tx = make_optimizer(0.1, 10, warmup_steps=0, weight_decay=0.0, clip_norm=clip_norm)
        params = jax.tree.map(jnp.ones_like, g)
        state = tx.init(params)
        u1, state = tx.update(jax.tree.map(lambda x: 1e4 * x, unit), state, params)
        u2, _ = tx.update(jax.tree.map(lambda x: -x, unit), state, params)
        return sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)))

    assert second_update_direction(1.0) < 0  # clipped: follows the new gradient
    assert second_update_direction(None) > 0  # the same run without clipping does not


def test_step_reports_grad_and_param_norms(gpt_single):
    config, data, _, _ = gpt_single
    import optax
    from fmzoo.train.step import make_train_step
    from fmzoo.train.state import sharded_init
    from fmzoo.train.mesh import put_batch
    loss_fn, tx = setup(config)
    mesh = make_mesh("data=1", jax.devices()[:1])
    state, shardings = sharded_init(config, tx, mesh)
    new, m = make_train_step(loss_fn, tx, mesh, shardings, donate=False)(state, put_batch(data[0], mesh))
    np.testing.assert_allclose(m["param_norm"], optax.tree.norm(new.params), rtol=1e-6)
    grads = jax.grad(lambda p: loss_fn(p, put_batch(data[0], mesh), None)[0])(state.params)
    np.testing.assert_allclose(m["grad_norm"], optax.tree.norm(grads), rtol=1e-5)
    # the pmap step reports the same norms through the same reduction
    pstate = replicate(init_train_state(config, tx))
    _, pm = make_pmap_step(loss_fn, tx)(pstate, shard_batch(data[0], jax.local_device_count()))
    np.testing.assert_allclose(pm["param_norm"][0], m["param_norm"], rtol=1e-5)
    np.testing.assert_allclose(pm["grad_norm"][0], m["grad_norm"], rtol=1e-4)
