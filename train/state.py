"""TrainState (step, params, optax state, rng) and its shardings on a mesh.

The shardings come from flax's logical partitioning: a TrainState is built under
`jax.eval_shape` from params still boxed in `nn.Partitioned`, so optax's state (which maps
over the params) carries the same boxes: AdamW's mu/nu, accumulation buffers and the like
are laid out exactly as their parameters, counters and the rng are replicated.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from fmzoo.models import registry
from fmzoo.models.sharding import LOGICAL_AXIS_RULES, boxed_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimiser updates done
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2] raw key; folded with the step for per-step randomness


def create_train_state(params: Any, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))


def init_params(config: Any, rng: jax.Array, lora: Any = None, *, boxed: bool = False) -> Any:
    """The model's params; with a LoraSpec, {"base": params, "lora": adapters} (the adapters
    drawn from a key of their own, so the base is the same with or without LoRA)."""
    base = (registry.init_boxed if boxed else registry.init)(config, rng)
    if lora is None:
        return base
    from fmzoo.models import lora as lora_lib
    return {"base": base, "lora": lora_lib.init_adapters(base, lora, jax.random.fold_in(rng, 1),
                                                         boxed=boxed)}


def state_shapes(config: Any, tx: optax.GradientTransformation, seed: int = 0,
                 lora: Any = None) -> TrainState:
    """ShapeDtypeStructs of a fresh TrainState; nothing is allocated."""
    return jax.eval_shape(functools.partial(init_train_state, config, tx, seed=seed, lora=lora))


def init_train_state(config: Any, tx: optax.GradientTransformation, seed: int = 0,
                     lora: Any = None) -> TrainState:
    return create_train_state(init_params(config, jax.random.key(seed), lora), tx, seed)


def boxed_state_shapes(config: Any, tx: optax.GradientTransformation,
                       lora: Any = None) -> TrainState:
    """An abstract TrainState whose params and optimiser moments are `nn.Partitioned` boxes."""
    return jax.eval_shape(lambda: create_train_state(
        init_params(config, jax.random.key(0), lora, boxed=True), tx))


def state_shardings(config: Any, shapes: TrainState, mesh: Mesh,
                    tx: optax.GradientTransformation | None = None,
                    rules=LOGICAL_AXIS_RULES, lora: Any = None) -> TrainState:
    """NamedShardings for every leaf of a TrainState (`shapes`) made with optimiser `tx`.

    `nn.get_partition_spec` of the boxed state + `nn.logical_to_mesh_sharding` under the
    rules (see `models.sharding.boxed_shardings`)."""
    if tx is None:
        raise TypeError("state_shardings needs the optimiser that made the state: "
                        "state_shardings(config, shapes, mesh, tx=tx)")
    boxed = boxed_state_shapes(config, tx, lora)
    want, got = jax.tree.structure(nn.meta.unbox(boxed)), jax.tree.structure(shapes)
    if want != got:
        raise ValueError("the TrainState does not match the config and optimiser: its tree is "
                         f"{got}, expected {want}; build it with the same config and optimiser")
    return boxed_shardings(boxed, mesh, rules)


def sharded_init(config: Any, tx: optax.GradientTransformation, mesh: Mesh,
                 seed: int = 0, lora: Any = None) -> tuple[TrainState, TrainState]:
    """(state, shardings): the fresh state is created directly in its sharded layout."""
    shapes = state_shapes(config, tx, seed, lora)
    shardings = state_shardings(config, shapes, mesh, tx, lora=lora)
    init = jax.jit(functools.partial(init_train_state, config, tx, seed=seed, lora=lora),
                   out_shardings=shardings)
    return init(), shardings


def lora_optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` on the adapters only: the base of a {"base", "lora"} tree gets zero updates and
    no optimiser state (optax.set_to_zero keeps none), so AdamW's moments, clipping and
    weight decay see only the adapters."""
    def labels(params):
        return {"base": jax.tree.map(lambda _: "frozen", params["base"]),
                "lora": jax.tree.map(lambda _: "train", params["lora"])}
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def lora_loss(loss_fn: Callable, spec: Any, *, base_as_frozen: bool = False) -> Callable:
    """A model loss as a loss of {"base", "lora"} params: the frozen base (no gradient flows
    into it) merged with the adapters inside the step. With `base_as_frozen` the loss is
    `loss_fn(merged, batch, rng, base)`: the frozen base is also the reference model (TRL's
    DPO with PEFT adapters), so no second copy of the weights exists."""
    from fmzoo.models import lora as lora_lib

    def loss(params, batch, rng):
        base = jax.lax.stop_gradient(params["base"])
        merged = lora_lib.merge(base, params["lora"], spec)
        return loss_fn(merged, batch, rng, base) if base_as_frozen else \
            loss_fn(merged, batch, rng)
    return loss


def check_frozen(config: Any, lora: Any, frozen: Any, base_name: str) -> Any:
    """The Trainer's `frozen` argument checked before any work: None, `base_name` (with
    LoRA: the frozen base) or a tree of weights that fits the model."""
    if frozen is None:
        return None
    if isinstance(frozen, str):
        if frozen != base_name or lora is None:
            raise ValueError(f"frozen={frozen!r}: only frozen={base_name!r} (with LoRA: the "
                             "frozen base) or a tree of weights is accepted")
        return frozen
    if lora is not None:
        raise ValueError(f"with LoRA the frozen weights are the base: pass frozen="
                         f"{base_name!r}, not a second copy of the weights")
    from .checkpoint import CheckpointError, describe_mismatch
    diff = describe_mismatch(registry.param_shapes(config), frozen)
    if diff:
        raise CheckpointError(f"the frozen (reference) weights do not fit the model: {diff}; "
                              "give weights of the same architecture")
    return frozen
