"""Logical axis names -> mesh axes: one rules table shards every model in the zoo.

Mesh axes: 'data' (batch), 'fsdp' (batch and parameter shards), 'tensor' (model parallel).
Everything goes through flax's logical partitioning: parameters carry names
(`nn.with_logical_partitioning`), `nn.get_partition_spec` reads them off a boxed tree (a
TrainState's optimiser moments included: optax maps over the boxes), and
`nn.logical_to_mesh_sharding` / `nn.with_logical_constraint` resolve them under the rules.
The one thing added on top is a post-pass that leaves a dimension whole when its mesh axes
do not divide it (e.g. 1 kv head on tensor=2).
"""

from __future__ import annotations

import contextlib
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
    ("layers", None),  # the leading axis of scan_layers' stacked params (models/scan.py)
)


# The residual stream [B, T, E]: batch split like the data, width whole on every device
# ('act_embed' has no rule, so it stays unsharded; 'embed' would use fsdp twice).
ACTIVATION_AXES_BTE = ("batch", "length", "act_embed")


def _entry_names(entry) -> tuple[str, ...]:
    return () if entry is None else (entry if isinstance(entry, tuple) else (entry,))


def _divides(size: int, entry, mesh_shape) -> bool:
    n = 1
    for name in _entry_names(entry):
        n *= mesh_shape.get(name, 1)
    return size % n == 0


def fit_spec(shape: tuple[int, ...], spec: P, mesh_shape) -> P:
    """Drops the mesh axes of a dimension they do not divide (it stays whole), and axes the
    mesh lacks. `mesh_shape` maps axis name -> size (`mesh.shape`)."""
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    out = []
    for size, entry in zip(shape, entries):
        names = tuple(n for n in _entry_names(entry) if n in mesh_shape)
        ok = names and _divides(size, names, mesh_shape)
        out.append((names[0] if len(names) == 1 else names) if ok else None)
    return P(*out)


def constrain_activations(x_BTE):
    """`nn.with_logical_constraint` of the residual stream by name. A no-op unless traced
    under `sharding_context(mesh)` (flax reads the rules, jax the mesh): generation and
    single-device code are untouched. A dimension the mesh does not divide stays whole."""
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x_BTE
    mesh_spec = nn.logical_to_mesh_axes(ACTIVATION_AXES_BTE, rules)
    names = tuple(name if _divides(size, entry, mesh.shape) else None
                  for name, size, entry in zip(ACTIVATION_AXES_BTE, x_BTE.shape, mesh_spec))
    return nn.with_logical_constraint(x_BTE, names, rules=rules)


def _use_mesh(mesh: Mesh):
    """The mesh as jax's context mesh: `jax.set_mesh` (jax >= 0.7), else `use_mesh`."""
    if hasattr(jax, "set_mesh"):
        return jax.set_mesh(mesh)
    return jax.sharding.use_mesh(mesh)


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """The mesh (jax's context mesh) and rules (`nn.logical_axis_rules`) that the models'
    activation constraints read while a step is traced. Both are read at trace time and are
    not part of jit's cache key: jit a function that is always called inside it (as the
    train steps do)."""
    with _use_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def without_axis(shardings: Any, axis: str) -> Any:
    """The same NamedShardings with one mesh axis dropped (FSDP: the layout a weight is
    all-gathered to for compute; its gradient is reduce-scattered back by the transpose)."""
    def drop(entry):
        kept = tuple(n for n in _entry_names(entry) if n != axis)
        return None if not kept else (kept[0] if len(kept) == 1 else kept)

    def one(sh):
        return NamedSharding(sh.mesh, P(*(drop(e) for e in sh.spec)))
    return jax.tree.map(one, shardings, is_leaf=lambda x: isinstance(x, NamedSharding))


def _is_spec(x) -> bool:
    """A logical PartitionSpec, or a plain tuple of names (not an optax NamedTuple state)."""
    return isinstance(x, P) or (type(x) is tuple and bool(x)
                                and all(e is None or isinstance(e, str) for e in x))


def logical_shardings(logical_specs: Any, shapes: Any, mesh: Mesh,
                      rules=LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings from a tree of logical PartitionSpecs (or name tuples) and the matching
    tree of shapes: `nn.logical_to_mesh_sharding`, then the divisibility post-pass."""
    specs = jax.tree.map(lambda a: P(*a), logical_specs, is_leaf=_is_spec)
    named = nn.logical_to_mesh_sharding(specs, mesh, rules)
    leaves, treedef = jax.tree.flatten(named, is_leaf=lambda x: isinstance(x, NamedSharding))
    shape_leaves = treedef.flatten_up_to(shapes)
    # an empty node (optax's MaskedNode: a NamedTuple, so flax took it for a spec) stays as
    # it is: it holds no array
    return treedef.unflatten([NamedSharding(mesh, fit_spec(tuple(s.shape), sh.spec, mesh.shape))
                              if hasattr(s, "shape") else s
                              for sh, s in zip(leaves, shape_leaves)])


def boxed_shardings(boxed: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for every leaf of a tree holding `nn.Partitioned` boxes (abstract or
    real), e.g. a TrainState made under `jax.eval_shape` from boxed params; unboxed leaves
    (step counters, rng) are replicated. The result has the structure of the unboxed tree."""
    return logical_shardings(nn.get_partition_spec(boxed), nn.meta.unbox(boxed), mesh, rules)


def param_shardings(logical_axes: Any, shapes: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a params pytree from its logical axes and shapes."""
    return logical_shardings(logical_axes, shapes, mesh, rules)
