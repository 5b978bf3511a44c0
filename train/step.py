"""One loss, two step factories: `jax.jit` on a mesh (data / fsdp / tensor) and `jax.pmap`.

Shape letters: N devices (pmap), M microbatches, B batch rows.

Gradients are token-weighted everywhere: a microbatch or a device shard counts in proportion
to the target tokens it holds, so k accumulated microbatches, n pmap shards and one big
batch all give the same update (up to float rounding).

A step may take a FROZEN input besides the state and the batch (DPO's reference weights):
`step(state, batch, frozen)` then calls `loss_fn(params, batch, rng, frozen)` with
`stop_gradient(frozen)`; it is laid out like the params (same shardings tree), never
trained, never in the optimizer or the checkpoint, and not donated.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmzoo.models.sharding import sharding_context, without_axis

from .losses import LossFn
from .mesh import BATCH_AXES
from .state import TrainState

StepFn = Callable[[TrainState, dict], tuple[TrainState, dict]]


def _grads_one(loss_fn: LossFn, params, batch, rng):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
    return grads, metrics


# The one token-weighted reduction, shared by microbatch accumulation (a scan) and the pmap
# step (a psum over devices): each part contributes tokens * (grads, metrics); the sum is
# divided by the total tokens. metrics["tokens"] is the weight and is summed, and so is every
# count named "num_*" (e.g. SFT's num_tokens, all real input tokens); every other metric is
# a per-token mean.


def is_count(name: str) -> bool:
    """A metric summed over parts (not averaged): 'tokens' and 'num_*'."""
    return name == "tokens" or name.startswith("num_")


def weigh(grads: Any, metrics: dict) -> tuple[Any, dict]:
    """One part's (grads, metrics) multiplied by its token count (tokens itself stays)."""
    n = metrics["tokens"]
    return (jax.tree.map(lambda g: n * g, grads),
            {k: v if is_count(k) else n * v for k, v in metrics.items()})


def normalise(grad_sum: Any, metric_sum: dict) -> tuple[Any, dict]:
    """Summed weighted parts -> token-mean grads and metrics (a part-free batch gives 0)."""
    denom = jnp.maximum(metric_sum["tokens"], 1.0)
    return (jax.tree.map(lambda g: g / denom, grad_sum),
            {k: v if is_count(k) else v / denom for k, v in metric_sum.items()})


def accumulate_gradients(loss_fn: LossFn, params: Any, batch: dict, rng: jax.Array,
                         accum_steps: int = 1, mesh: Mesh | None = None) -> tuple[Any, dict]:
    """Token-mean gradients and metrics over `accum_steps` microbatches (a lax.scan)."""
    if accum_steps == 1:
        return _grads_one(loss_fn, params, batch, rng)

    def split(x_B):
        B = x_B.shape[0]
        if B % accum_steps:
            raise ValueError(f"batch of {B} rows does not split into {accum_steps} microbatches;"
                             f" make the batch size a multiple of --accum")
        # Row b goes to microbatch b % M, so each device's rows stay on that device.
        x_MB = x_B.reshape(B // accum_steps, accum_steps, *x_B.shape[1:]).swapaxes(0, 1)
        if mesh is not None:
            spec = P(None, BATCH_AXES, *([None] * (x_B.ndim - 1)))
            x_MB = jax.lax.with_sharding_constraint(x_MB, NamedSharding(mesh, spec))
        return x_MB

    micro = jax.tree.map(split, batch)

    def part(i, mb):
        return weigh(*_grads_one(loss_fn, params, mb, jax.random.fold_in(rng, i)))

    first = jax.tree.map(lambda x_MB: x_MB[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(part, 0, first))

    def body(total, xs):
        return jax.tree.map(jnp.add, total, part(*xs)), None

    total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
    return normalise(*total)


def _key(state: TrainState) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def _global_norm(tree) -> jax.Array:
    norm = getattr(getattr(optax, "tree", None), "norm", None)  # optax >= 0.2.5
    return norm(tree) if norm is not None else optax.global_norm(tree)


def _apply(tx: optax.GradientTransformation, state: TrainState, grads, metrics) -> tuple:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # param_norm beside grad_norm: a finite loss can come with a non-finite update, and
    # the caller must be able to refuse to save such a state
    metrics = {**metrics, "grad_norm": _global_norm(grads), "param_norm": _global_norm(params)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, mesh: Mesh,
                    state_shardings: TrainState, *, accum_steps: int = 1,
                    donate: bool = True, frozen_shardings: Any = None) -> StepFn:
    """`step(state, batch) -> (state, metrics)` compiled with jit on `mesh`.

    The state keeps the layout of `state_shardings` (params and optimiser state by the
    logical-axis rules); the batch is split over ('data', 'fsdp') on its first axis; the
    metrics come back replicated. The incoming state is donated. With `frozen_shardings`
    the step is `step(state, batch, frozen)` (see the module docstring).
    """
    def train_step(state: TrainState, batch: dict, *frozen):
        loss = _fsdp_gathered(_with_frozen(loss_fn, frozen, frozen_shardings),
                              state_shardings.params)
        grads, metrics = accumulate_gradients(loss, state.params, batch, _key(state),
                                              accum_steps, mesh)
        return _apply(tx, state, grads, metrics)

    replicated = NamedSharding(mesh, P())
    ins = (state_shardings, NamedSharding(mesh, P(BATCH_AXES)))
    step = jax.jit(train_step, in_shardings=ins + _frozen_in(frozen_shardings),
                   out_shardings=(state_shardings, replicated),
                   donate_argnums=(0,) if donate else ())
    return _in_mesh(step, mesh)


def bind_frozen(step: Callable, frozen: Any) -> Callable:
    """step(state, batch) from step(state, batch, frozen) (`.lower` kept for inspection)."""
    if frozen is None:
        return step

    def call(state, batch):
        return step(state, batch, frozen)
    if hasattr(step, "lower"):
        call.lower = lambda state, batch: step.lower(state, batch, frozen)
    return call


def _frozen_in(frozen_shardings: Any) -> tuple:
    return () if frozen_shardings is None else (frozen_shardings,)


def _with_frozen(loss_fn: Callable, frozen: tuple, frozen_shardings: Any = None) -> LossFn:
    """`loss_fn(params, batch, rng, frozen)` as a loss of (params, batch, rng): the frozen
    input (gathered along 'fsdp' like the params) enters with stop_gradient."""
    if not frozen:
        return loss_fn
    (tree,) = frozen
    if frozen_shardings is not None:
        tree = jax.lax.with_sharding_constraint(tree, without_axis(frozen_shardings, "fsdp"))
    tree = jax.lax.stop_gradient(tree)
    return lambda params, batch, rng: loss_fn(params, batch, rng, tree)


def _fsdp_gathered(loss_fn: LossFn, param_shardings: Any) -> LossFn:
    """FSDP: params are stored split over 'fsdp' but computed with whole (all-gathered) along
    it, while the batch is split over it; the transpose reduce-scatters the gradients."""
    compute = without_axis(param_shardings, "fsdp")

    def loss(params, batch, rng):
        return loss_fn(jax.lax.with_sharding_constraint(params, compute), batch, rng)
    return loss


def _in_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """Calls (and so traces) `fn` with the mesh and rules in context, so that the models'
    activation constraints take effect inside the step."""
    def call(*args):
        with sharding_context(mesh):
            return fn(*args)

    def lower(*args):  # step.lower(state, batch).compile().as_text(): what really runs
        with sharding_context(mesh):
            return fn.lower(*args)
    call.lower = lower
    return call


def make_eval_step(loss_fn: LossFn, mesh: Mesh, param_shardings: Any, *,
                   frozen_shardings: Any = None) -> Callable:
    """`eval_step(params, batch) -> metrics` (no gradients, no dropout); with
    `frozen_shardings`, `eval_step(params, batch, frozen)`."""
    def metrics(params, batch, *frozen):
        loss = _fsdp_gathered(_with_frozen(loss_fn, frozen, frozen_shardings), param_shardings)
        return loss(params, batch, None)[1]

    ins = (param_shardings, NamedSharding(mesh, P(BATCH_AXES))) + _frozen_in(frozen_shardings)
    return _in_mesh(jax.jit(metrics, in_shardings=ins,
                            out_shardings=NamedSharding(mesh, P())), mesh)


# ----------------------------------------------------------------------------- pmap


def replicate(tree: Any, devices: list | None = None, axis_name: str = "batch") -> Any:
    """One copy per device, stacked on a new leading axis N and placed by pmap itself, so
    the step's inputs already have the layout of its outputs (on jax >= 0.8 that layout
    carries the axis name: give the step's, or the second step compiles again)."""
    devices = list(jax.local_devices() if devices is None else devices)

    def stack(x):
        x = np.asarray(jax.device_get(x))
        return np.broadcast_to(x[None], (len(devices),) + x.shape)
    return jax.pmap(lambda t: t, axis_name=axis_name, devices=devices)(jax.tree.map(stack, tree))


def unreplicate(tree: Any) -> Any:
    """The first device's copy of a replicated tree."""
    return jax.tree.map(lambda x: x[0], tree)


def shard_batch(batch: dict, n_devices: int) -> dict:
    """[B, ...] -> [N, B/N, ...] for pmap."""
    def one(x):
        x = np.asarray(x)
        if x.shape[0] % n_devices:
            raise ValueError(f"batch of {x.shape[0]} rows does not split over {n_devices} "
                             f"devices; choose a batch size that is a multiple of {n_devices}")
        return x.reshape(n_devices, x.shape[0] // n_devices, *x.shape[1:])
    return {k: one(v) for k, v in batch.items()}


def make_pmap_step(loss_fn: LossFn, tx: optax.GradientTransformation, *,
                   accum_steps: int = 1, axis_name: str = "batch",
                   devices: list | None = None, donate: bool = True,
                   frozen: bool = False) -> StepFn:
    """The classic data-parallel step: replicated state, per-device batch shard [N, B/N, ...],
    gradients and metrics combined across devices by the same token-weighted reduction as
    microbatches (`weigh`, a `lax.psum`, `normalise`). With `frozen`, the step is
    `step(state, batch, frozen)`, the frozen tree replicated like the state (`replicate`)."""
    def train_step(state: TrainState, batch: dict, *tree):
        if bool(tree) != frozen:
            raise TypeError(f"this pmap step was made with frozen={frozen}; call it as "
                            + ("step(state, batch, frozen)" if frozen else "step(state, batch)"))
        rng = jax.random.fold_in(_key(state), jax.lax.axis_index(axis_name))
        parts = weigh(*accumulate_gradients(_with_frozen(loss_fn, tree), state.params, batch,
                                            rng, accum_steps))
        grads, metrics = normalise(*jax.lax.psum(parts, axis_name))
        return _apply(tx, state, grads, metrics)

    return jax.pmap(train_step, axis_name=axis_name, devices=devices,
                    donate_argnums=(0,) if donate else ())
