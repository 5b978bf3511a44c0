"""Sharding by name: parameter rules, activation constraints, the FSDP compute layout."""

import collections
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fmzoo.models import get_config, logical_axes, param_shapes
from fmzoo.models.lora import n_in_axes
from fmzoo.models.sharding import (constrain_activations, param_shardings, sharding_context,
                                   without_axis)
from fmzoo.train.mesh import make_mesh


def test_param_rules_and_indivisible_axes_stay_whole():
    mesh = make_mesh("data=1,fsdp=2,tensor=4")
    c = get_config("llama-tiny", n_kv_heads=2)
    sh = param_shardings(logical_axes(c), param_shapes(c), mesh)
    attn = sh["layers_0"]["attn"]
    assert attn["query"]["kernel"].spec == P("fsdp", "tensor", None)  # [embed, heads, head_dim]
    assert attn["key"]["kernel"].spec == P("fsdp", None, None)  # 2 kv heads do not split by 4
    assert sh["embed"]["embedding"].spec == P("tensor", "fsdp")  # [vocab, embed]


def test_without_fsdp_keeps_tensor_parallel_axes():
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    sh = {"a": NamedSharding(mesh, P("fsdp", "tensor")), "b": NamedSharding(mesh, P(("data", "fsdp")))}
    out = without_axis(sh, "fsdp")
    assert out["a"].spec == P(None, "tensor") and out["b"].spec == P("data")


def test_activation_constraint_only_inside_a_sharding_context():
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    x = jnp.arange(8 * 3 * 4, dtype=jnp.float32).reshape(8, 3, 4)
    # a fresh function per jit: jax caches traces by function, and the context is read at trace
    assert jax.jit(lambda a: constrain_activations(a))(x).sharding.is_fully_replicated
    with sharding_context(mesh):
        y = jax.jit(lambda a: constrain_activations(a))(x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None, None)), 3)
    assert not y.sharding.is_fully_replicated
    np.testing.assert_array_equal(y, x)
    with sharding_context(mesh):  # a batch that the mesh does not divide stays whole
        z = jax.jit(lambda a: constrain_activations(a))(x[:3])
    assert z.sharding.is_fully_replicated


# ------------------------------------------------------------- the compiled train step


def _shapes_in(hlo_line_result: str) -> list[tuple[int, ...]]:
    """Array shapes in an HLO result type, e.g. '(f32[4,16]{1,0}, f32[])' -> [(4, 16), ()]."""
    return [tuple(int(d) for d in dims.split(",") if d)
            for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", hlo_line_result)]


def _collective_results(hlo: str, op: str) -> list[tuple[int, ...]]:
    out = []
    for m in re.finditer(rf"= (.*?) {op}(?:-start)?\(", hlo):
        out += _shapes_in(m.group(1))
    return out


@pytest.fixture(scope="module")
def fsdp_step():
    """A gpt step on a pure FSDP mesh (fsdp=8): lowered (with the constraints as written) and
    compiled (what XLA really runs), with the state and the mesh it runs on."""
    from fmzoo.train.state import sharded_init
    from fmzoo.train.step import make_train_step
    from fmzoo.train.mesh import put_batch
    from train_helpers import batches, setup, tiny_config
    config = tiny_config("gpt").replace(d_model=64, d_ff=128)
    loss_fn, tx = setup(config)
    mesh = make_mesh("fsdp=8")
    state, shardings = sharded_init(config, tx, mesh)
    batch = put_batch(batches("gpt", 1)[0], mesh)
    lowered = make_train_step(loss_fn, tx, mesh, shardings).lower(state, batch)
    return config, state, batch, lowered, lowered.compile()


def test_fsdp_gathers_whole_weights_and_nothing_else(fsdp_step):
    config, state, _, _, compiled = fsdp_step
    hlo = compiled.as_text()
    split = {tuple(p.shape) for p in jax.tree.leaves(state.params)
             if "fsdp" in str(p.sharding.spec)}
    assert len(split) >= 5, split  # embeddings, attention and MLP kernels are all split
    gathered = set(_collective_results(hlo, "all-gather"))
    # every fsdp-split weight is all-gathered at its own (whole) shape for the compute ...
    assert split <= gathered, split - gathered
    # ... and nothing else is: activations stay split by batch (no batch-sized gathers)
    assert gathered <= {tuple(p.shape) for p in jax.tree.leaves(state.params)}, gathered


def test_gradients_are_reduced_across_the_batch_shards(fsdp_step):
    _, state, _, _, compiled = fsdp_step
    hlo = compiled.as_text()
    reduced = collections.Counter(_collective_results(hlo, "all-reduce")
                                  + _collective_results(hlo, "reduce-scatter"))
    # each weight's gradient is summed over the devices that hold different rows of the batch,
    # by a reduction of its own (CPU XLA reduces whole gradients; GPU/TPU may reduce-scatter to
    # the shard shape). A multi-axis kernel's gradient is computed as [in, out] with its input
    # axes grouped (models/linear.py) and reshaped after, so it may be reduced in that shape
    for path, p in jax.tree_util.tree_leaves_with_path(state.params):
        names = tuple(getattr(k, "key", str(k)) for k in path)
        shapes = [tuple(p.shape), tuple(p.sharding.shard_shape(p.shape))]
        if names[-1] == "kernel" and p.ndim > 2:
            n = n_in_axes(names[:-1], p.ndim)
            shapes.append((math.prod(p.shape[:n]), math.prod(p.shape[n:])))
        hit = next((s for s in shapes if reduced[s] > 0), None)
        assert hit is not None, (names, p.shape, shapes)
        reduced[hit] -= 1


def test_each_device_holds_an_eighth_of_the_state(fsdp_step):
    _, state, batch, _, compiled = fsdp_step
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    batch_bytes = sum(x.nbytes for x in jax.tree.leaves(batch)) // 8
    per_device = compiled.memory_analysis().argument_size_in_bytes
    # params and AdamW moments split 8 ways; only norms, biases and counters are whole
    assert per_device <= total / 8 * 1.2 + batch_bytes, (per_device, total)


def test_residual_stream_is_pinned_to_the_batch_axes(fsdp_step):
    config, _, batch, lowered, _ = fsdp_step
    B, T = batch["inputs"].shape
    text = lowered.as_text()
    residual = f"tensor<{B}x{T}x{config.d_model}xf32>"
    pinned = [line for line in text.splitlines()
              if residual in line and ("sharding_constraint" in line or "@Sharding" in line)
              and ('[{"data", "fsdp"}, {}, {}]' in line or "devices=[8,1,1]" in line)]
    # one constraint after the embedding and after every block (and their transposes)
    assert len(pinned) >= config.n_layers + 1, len(pinned)


def _state_per_device(config, tx, spec, batch):
    """(XLA's per-device bytes of the state, the layout's) for a train step compiled on mesh
    `spec` from abstract inputs (ShapeDtypeStructs with shardings: nothing is allocated)."""
    from fmzoo.train.mesh import batch_sharding
    from fmzoo.train.state import state_shapes, state_shardings
    from fmzoo.train.step import make_train_step
    from train_helpers import setup
    mesh = make_mesh(spec)
    shapes = state_shapes(config, tx)
    shardings = state_shardings(config, shapes, mesh, tx)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                         shapes, shardings)
    data = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh, v.ndim))
            for k, v in batch.items()}
    step = make_train_step(setup(config)[0], tx, mesh, shardings)
    m = step.lower(state, data).compile().memory_analysis()

    def per_device(tree):
        return sum(int(np.prod(s.sharding.shard_shape(s.shape))) * s.dtype.itemsize
                   for s in jax.tree.leaves(tree))
    # the donated state comes back in the same buffers: the output aliases all of it
    assert m.alias_size_in_bytes >= per_device(state), (m.alias_size_in_bytes, spec)
    return m.argument_size_in_bytes - per_device(data), per_device(state)


def test_fsdp_and_fsdp_tensor_divide_the_state_by_8_and_replication_does_not(fsdp_step):
    from train_helpers import batches, setup
    config, state, batch, _, compiled = fsdp_step
    tx = setup(config)[1]
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    fsdp8 = compiled.memory_analysis().argument_size_in_bytes - sum(
        x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(batch))
    host_batch = batches("gpt", 1)[0]
    replicated, replicated_layout = _state_per_device(config, tx, "data=8", host_batch)
    fsdp_tp, fsdp_tp_layout = _state_per_device(config, tx, "fsdp=4,tensor=2", host_batch)
    # XLA keeps exactly the layout the shardings ask for
    assert (replicated, fsdp_tp) == (replicated_layout, fsdp_tp_layout)
    assert replicated == total  # data parallel: every device holds the whole state
    # 4 x 2 splits the big matrices 8 ways like fsdp=8; norms, biases, counters stay whole
    for sharded in (fsdp8, fsdp_tp):
        assert total / 8 <= sharded <= total / 8 * 1.2, (sharded, total)
        assert replicated / sharded >= 8 / 1.2
