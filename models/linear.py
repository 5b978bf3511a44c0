"""The projection every dense layer runs: x [batch..., in...] . W [in..., out...], with a
backward pass that asks for each gradient in a layout XLA:CPU can use without copying.

JAX's rule for `dot_general` computes the kernel gradient as dy^T . x, which comes out
[out..., in...], and transposes it into W's [in..., out...]. XLA:CPU folds that transpose
into an operand: it writes the output gradient dy out transposed (for the MLP's up
projection a [2048, 512] array at gpt-tiny's 16 x 128 tokens) before the dot. Here the
kernel gradient is x^T . dy over 2-d views of x and dy (rows x in, rows x out), which is
already in W's order and needs no copy. Isolated, the up projection's kernel gradient with
its producer takes 3.6 ms instead of 7.0 ms; in gpt-tiny's training step the step is 12%
shorter (bench/RESULTS.md, 2026-11-28). The values are the same products, summed in
another order.
"""

from __future__ import annotations

import math
from functools import partial

import jax

Array = jax.Array

# False only in bench/attention_step.py, to time JAX's own rule beside this one; read when
# a model is traced.
ENABLED = True


def _contract(x: Array, w: Array, n_in: int) -> Array:
    dims = ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
    return jax.lax.dot_general(x, w, dims)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _project(x: Array, w: Array, n_in: int) -> Array:
    return _contract(x, w, n_in)


def _project_fwd(x, w, n_in):
    return _contract(x, w, n_in), (x, w)


def _project_bwd(n_in, res, dy):
    x, w = res
    n_batch, n_out = x.ndim - n_in, w.ndim - n_in
    # dx [batch..., in...]: dy's out axes against W's out axes
    dx = jax.lax.dot_general(dy, w, ((tuple(range(n_batch, n_batch + n_out)),
                                      tuple(range(n_in, n_in + n_out))), ((), ())))
    # dW [in..., out...]: x's batch axes against dy's, so the result is in W's order
    rows = math.prod(x.shape[:n_batch])
    x2, dy2 = x.reshape(rows, -1), dy.reshape(rows, -1)
    dw = jax.lax.dot_general(x2, dy2, (((0,), (0,)), ((), ()))).reshape(w.shape)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_project.defvjp(_project_fwd, _project_bwd)


def project(x: Array, w: Array, n_in: int = 1) -> Array:
    """x's trailing `n_in` axes contracted with W's leading `n_in` axes: [batch..., out...]."""
    if not 0 < n_in <= min(x.ndim, w.ndim):
        raise ValueError(f"n_in={n_in} must be between 1 and min(x.ndim, w.ndim) = "
                         f"{min(x.ndim, w.ndim)} (x {x.shape}, W {w.shape})")
    if x.shape[x.ndim - n_in:] != w.shape[:n_in]:
        raise ValueError(f"x's last {n_in} axes {x.shape[x.ndim - n_in:]} do not match W's "
                         f"first {n_in} {w.shape[:n_in]}")
    return _project(x, w, n_in) if ENABLED else _contract(x, w, n_in)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """A drop-in `dot_general` for `flax.linen.Dense`: its contraction (lhs's last axis with
    rhs's first, no batch axes, default precision) goes through `project`; anything else is
    passed to `jax.lax.dot_general` unchanged."""
    (lc, rc), (lb, rb) = dimension_numbers
    if (tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb
            and precision is None and preferred_element_type is None):
        return project(lhs, rhs, 1)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
