"""Sharding by name: parameter rules, activation constraints, the FSDP compute layout."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fmzoo.models import get_config, logical_axes, param_shapes
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
