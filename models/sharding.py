"""Logical axis names -> mesh axes: one rules table shards every model in the zoo.

Mesh axes: 'data' (batch), 'fsdp' (batch and parameter shards), 'tensor' (model parallel).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("hidden", "tensor"),
    ("hidden_in", "fsdp"),
    ("norm", None),
)


# The residual stream [B, T, E]: batch split like the data, width whole on every device
# ('act_embed' has no rule, so it stays unsharded; 'embed' would use fsdp twice).
ACTIVATION_AXES_BTE = ("batch", "length", "act_embed")
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("fmzoo_sharding", default=None)


def constrain_activations(x_BTE):
    """Pins the residual stream's layout by name. A no-op unless a step is traced under
    `sharding_context(mesh)`: generation and single-device code are untouched."""
    active = _ACTIVE.get()
    if active is None:
        return x_BTE
    mesh, rules = active
    spec = _fits(x_BTE.shape, logical_to_spec(ACTIVATION_AXES_BTE, rules), mesh)
    return jax.lax.with_sharding_constraint(x_BTE, NamedSharding(mesh, spec))


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """The mesh and rules that `constrain_activations` reads while a step is traced.

    Our own context variable rather than `jax.set_mesh` + flax's rules context: under those,
    flax re-checks DenseGeneral kernels at their flattened init shape against their 3-d
    logical names and fails. The context is read while tracing and is not part of jit's
    cache key: jit a function that is always called inside it (as the train steps do)."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def without_axis(shardings: Any, axis: str) -> Any:
    """The same NamedShardings with one mesh axis dropped (FSDP: the layout a weight is
    all-gathered to for compute; its gradient is reduce-scattered back by the transpose)."""
    def drop(entry):
        names = entry if isinstance(entry, tuple) else (entry,)
        kept = tuple(n for n in names if n is not None and n != axis)
        return None if not kept else (kept[0] if len(kept) == 1 else kept)

    def one(sh):
        return NamedSharding(sh.mesh, P(*(drop(e) for e in sh.spec)))
    return jax.tree.map(one, shardings, is_leaf=lambda x: isinstance(x, NamedSharding))


def logical_to_spec(axes: tuple[str | None, ...], rules=LOGICAL_AXIS_RULES) -> P:
    """PartitionSpec for a tuple of logical names (unknown names stay unsharded)."""
    table = dict(rules)
    return P(*(table.get(a) if a is not None else None for a in axes))


def _fits(shape, spec: P, mesh: Mesh) -> P:
    """Drops a mesh axis from a dimension it does not divide (e.g. 1 kv head on tensor=2)."""
    out = []
    for size, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        names = tuple(n for n in names if n in mesh.shape)
        n = 1
        for name in names:
            n *= mesh.shape[name]
        out.append(names if names and size % n == 0 else None)
    return P(*[(e[0] if len(e) == 1 else e) if e else None for e in out])


def param_shardings(logical_axes: Any, shapes: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a params pytree from its logical axes and shapes."""
    def one(axes, shape):
        return NamedSharding(mesh, _fits(shape.shape, logical_to_spec(axes, rules), mesh))
    return jax.tree.map(one, logical_axes, shapes, is_leaf=lambda x: isinstance(x, tuple))


def logical_axes_of(boxed_params: Any) -> Any:
    """Pytree of logical-axis tuples from params boxed by `nn.with_logical_partitioning`."""
    return jax.tree.map(lambda p: tuple(p.names), boxed_params,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


def place_params(params: Any, config: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """Puts a params pytree onto `mesh` following the config's logical axes."""
    from .registry import logical_axes
    shardings = param_shardings(logical_axes(config), params, mesh, rules)
    return jax.device_put(params, shardings)
