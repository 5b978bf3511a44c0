"""TrainState (step, params, optax state, rng) and its shardings on a mesh.

The optimiser state is laid out like the params: every leaf of the optax state whose key
path ends with a parameter's key path (and has that parameter's shape) gets the parameter's
sharding; counters and other scalars are replicated. This covers AdamW's mu/nu, clipping,
masks and accumulation buffers without knowing optax's internal classes.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmzoo.models import registry
from fmzoo.models.sharding import param_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimiser updates done
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2] raw key; folded with the step for per-step randomness


def create_train_state(params: Any, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))


def _path_key(path) -> tuple:
    return tuple(str(p) for p in path)


def like_params(tree: Any, params: Any, param_values: Any, default: Any) -> Any:
    """Maps each leaf of `tree` to the `param_values` entry of the parameter it mirrors.

    A leaf mirrors a parameter when its key path ends with that parameter's key path and
    their shapes agree; leaves that mirror nothing get `default`.
    """
    values = jax.tree.leaves(param_values,
                             is_leaf=lambda x: x is None or isinstance(x, NamedSharding))
    by_path = {}
    for (path, p), v in zip(jax.tree_util.tree_flatten_with_path(params)[0], values):
        by_path[_path_key(path)] = (tuple(p.shape), v)
    lengths = sorted({len(k) for k in by_path}, reverse=True)

    def one(path, leaf):
        key = _path_key(path)
        for n in lengths:
            hit = by_path.get(key[-n:]) if len(key) >= n else None
            if hit is not None and hit[0] == tuple(getattr(leaf, "shape", ())):
                return hit[1]
        return default
    return jax.tree_util.tree_map_with_path(one, tree)


def state_shapes(config: Any, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
    """ShapeDtypeStructs of a fresh TrainState; nothing is allocated."""
    return jax.eval_shape(functools.partial(init_train_state, config, tx, seed=seed))


def init_train_state(config: Any, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
    params = registry.init(config, jax.random.key(seed))
    return create_train_state(params, tx, seed)


def state_shardings(config: Any, shapes: TrainState, mesh: Mesh) -> TrainState:
    """NamedShardings for every leaf of a TrainState, from the config's logical axes."""
    p_shard = param_shardings(registry.logical_axes(config), shapes.params, mesh)
    replicated = NamedSharding(mesh, P())
    opt = like_params(shapes.opt_state, shapes.params, p_shard, replicated)
    return TrainState(step=replicated, params=p_shard, opt_state=opt, rng=replicated)


def sharded_init(config: Any, tx: optax.GradientTransformation, mesh: Mesh,
                 seed: int = 0) -> tuple[TrainState, TrainState]:
    """(state, shardings): the fresh state is created directly in its sharded layout."""
    shapes = state_shapes(config, tx, seed)
    shardings = state_shardings(config, shapes, mesh)
    init = jax.jit(functools.partial(init_train_state, config, tx, seed=seed),
                   out_shardings=shardings)
    return init(), shardings
