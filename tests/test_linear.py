"""models/linear.py: the dense projection's own backward pass gives JAX's gradients, in the
dtypes of its inputs, and compiles on CPU without the transposed copy JAX's rule costs."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmzoo.models.linear import dense_dot_general, project


def _reference(x, w, n_in):
    dims = ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
    return jax.lax.dot_general(x, w, dims)


@pytest.mark.parametrize("x_shape,w_shape,n_in", [
    ((2, 3, 5), (5, 4), 1),            # Dense [in, out]
    ((2, 3, 5), (5, 2, 3), 1),         # query/key/value [E, H, D]
    ((2, 3, 4, 5), (4, 5, 6), 2),      # attention output [H, D, E]
    ((7, 5), (5, 4), 1),               # one batch axis
])
def test_values_and_gradients_equal_the_plain_dot(x_shape, w_shape, n_in):
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(*x_shape), jnp.float32)
    w = jnp.asarray(rs.randn(*w_shape), jnp.float32)
    out_shape = x_shape[:len(x_shape) - n_in] + w_shape[n_in:]
    g = jnp.asarray(rs.randn(*out_shape), jnp.float32)

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w, n_in)) * g)
    np.testing.assert_allclose(project(x, w, n_in), _reference(x, w, n_in), rtol=1e-6)
    got = jax.jit(jax.grad(loss(project), argnums=(0, 1)))(x, w)
    want = jax.grad(loss(_reference), argnums=(0, 1))(x, w)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gradients_keep_the_input_dtypes():
    x = jnp.ones((2, 3, 4), jnp.bfloat16)
    w = jnp.ones((4, 5), jnp.bfloat16)
    dx, dw = jax.grad(lambda x, w: project(x, w).astype(jnp.float32).sum(), argnums=(0, 1))(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dw, np.float32), 6.0)  # 2 * 3 rows of ones


def test_bad_shapes_are_named():
    x = jnp.ones((2, 3, 4))
    with pytest.raises(ValueError, match="n_in=3 must be between 1 and"):
        project(x, jnp.ones((4, 5)), 3)
    with pytest.raises(ValueError, match=r"x's last 1 axes \(4,\) do not match W's first 1 \(6,\)"):
        project(x, jnp.ones((6, 5)))


def test_flax_dense_uses_it_and_other_contractions_pass_through():
    rs = np.random.RandomState(1)
    x = jnp.asarray(rs.randn(2, 3, 4), jnp.float32)
    plain, ours = nn.Dense(5), nn.Dense(5, dot_general=dense_dot_general)
    params = plain.init(jax.random.PRNGKey(0), x)

    def loss(m):
        return lambda p: jnp.sum(jnp.cos(m.apply(p, x)))
    np.testing.assert_allclose(ours.apply(params, x), plain.apply(params, x), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.grad(loss(ours))(params), jax.grad(loss(plain))(params))
    # a batched contraction is not a projection: it goes to lax.dot_general as it came
    a, b = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
    dims = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_array_equal(dense_dot_general(a, b, dims), jax.lax.dot_general(a, b, dims))
    jaxpr = str(jax.make_jaxpr(lambda a, b: dense_dot_general(a, b, dims))(a, b))
    assert "custom_vjp" not in jaxpr


def _entry(fn, *args) -> str:
    text = jax.jit(fn).lower(*args).compile().as_text()
    return text[text.index("ENTRY"):]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's layout choice")
def test_the_kernel_gradient_compiles_without_a_transposed_copy():
    # gpt-tiny's MLP up projection at 16 x 128 tokens; tanh stands for the activation that
    # produces the output gradient, as in a real backward pass
    x = jnp.ones((16, 128, 128))
    w = jnp.ones((128, 512))

    def kernel_grad(fn):
        return jax.grad(lambda w, x: jnp.sum(jnp.tanh(fn(x, w, 1))))
    copies = re.compile(r"%(copy|transpose)[\w.-]* = ")
    assert copies.search(_entry(kernel_grad(project), w, x)) is None
    # JAX's own rule writes the [2048, 512] output gradient out transposed first
    assert copies.search(_entry(kernel_grad(_reference), w, x)) is not None
