"""On-policy batches: the Trainer's batch source for online RL (fmzoo grpo, fmzoo ppo).

Every `updates_per_rollout` steps the source takes the next `prompts_per_rollout` prompts,
asks the command's `make(view, prompts)` for a rollout with the CURRENT policy (sampling,
rewards, advantages, reference log-probs) and gets back the update batches of the coming
steps: one optimizer step each, fixed shapes, so neither generation nor the step compiles
again. The Trainer calls `next_batch(policy)` instead of `next()`; `policy()` builds the
PolicyView (params as the model takes them, the frozen reference, the mesh) only when a
rollout is due.

Resume: the state is the prompt position and the rollout count, saved only between
rollouts (the commands check that --save-every and --steps are multiples of the updates per
rollout), so a resumed run draws the same prompts and the same sampling keys as an
uninterrupted one. Prompts are visited in a seeded permutation per epoch.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import jax
import numpy as np

STATE_FORMAT = "fmzoo-onpolicy/1"


@dataclasses.dataclass
class PolicyView:
    """What a rollout needs from the Trainer: the policy's params (as the model takes them:
    LoRA merged), the frozen reference (None when the run has none), the mesh, and this
    rollout's index and PRNG key."""
    params: Any
    reference: Any
    mesh: Any
    rollout_index: int = 0
    key: Any = None


MakeFn = Callable[[PolicyView, list], tuple[list, dict]]


def check_rollout_steps(steps: int, save_every: int, updates: int, what: str) -> None:
    """Checkpoints fall between rollouts: --steps and --save-every are multiples of the
    updates each rollout feeds."""
    from .config import config_error
    for flag, value in (("--steps", steps), ("--save-every", save_every)):
        if value % updates:
            raise config_error(f"{flag} {value} is not a multiple of the {updates} updates per "
                               f"rollout ({what}); checkpoints fall between rollouts, so pass "
                               f"{flag} {max(updates, value // updates * updates)}")


class OnPolicyBatches:
    """See the module notes. `prompts`: load_prompts' dicts; `make(view, prompts)` ->
    (exactly `updates_per_rollout` update batches, rollout metrics)."""

    def __init__(self, prompts: list, make: MakeFn, *, prompts_per_rollout: int,
                 updates_per_rollout: int, seed: int):
        if not prompts:
            raise ValueError("no prompts to roll out")
        self.prompts, self.make = prompts, make
        self.per_rollout, self.updates, self.seed = prompts_per_rollout, updates_per_rollout, seed
        self.position = 0  # prompts drawn so far, over epochs
        self.rollouts = 0
        self._queue: collections.deque = collections.deque()
        self._metrics: collections.deque = collections.deque()  # one per step, in order

    def _order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of the prompts (drawn once per epoch, not per prompt)."""
        if getattr(self, "_epoch", None) != epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(
                len(self.prompts))
        return self._perm

    def _draw(self) -> list:
        n, out = len(self.prompts), []
        while len(out) < self.per_rollout:
            epoch, i = divmod(self.position, n)
            out.append(self.prompts[int(self._order(epoch)[i])])
            self.position += 1
        return out

    def next_batch(self, policy: Callable[[], PolicyView]) -> dict:
        if not self._queue:
            view = policy()
            view.rollout_index = self.rollouts
            view.key = jax.random.fold_in(jax.random.key(self.seed), self.rollouts)
            batches, metrics = self.make(view, self._draw())
            if len(batches) != self.updates:
                raise RuntimeError(f"make() returned {len(batches)} update batches, "
                                   f"expected {self.updates}")
            self.rollouts += 1
            self._queue.extend((b, metrics) for b in batches)
        batch, metrics = self._queue.popleft()
        self._metrics.append(metrics)
        return batch

    def __next__(self):
        raise TypeError("OnPolicyBatches needs the current policy: the Trainer calls "
                        "next_batch(policy)")

    def pop_metrics(self) -> dict:
        """The rollout metrics of the oldest step not yet logged (Task.metrics)."""
        return self._metrics.popleft() if self._metrics else {}

    def get_state(self) -> dict:
        if self._queue:
            raise RuntimeError(f"a checkpoint inside a rollout ({len(self._queue)} updates "
                               "left); --save-every and --steps must be multiples of the "
                               "updates per rollout")
        return {"format": STATE_FORMAT, "position": self.position, "rollouts": self.rollouts,
                "seed": self.seed, "num_prompts": len(self.prompts)}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not an on-policy data state of format {STATE_FORMAT!r}: "
                             f"{str(state)[:200]}")
        if (state["seed"], state["num_prompts"]) != (self.seed, len(self.prompts)):
            raise ValueError(f"the checkpoint's prompts (seed {state['seed']}, "
                             f"{state['num_prompts']} prompts) differ from this run's (seed "
                             f"{self.seed}, {len(self.prompts)}); resume with the same --data "
                             "and --seed")
        self.position, self.rollouts = int(state["position"]), int(state["rollouts"])
        self._queue.clear()
        self._metrics.clear()


def minibatches(arrays: dict, batch_size: int, epochs: int, key: Any) -> list[dict]:
    """`epochs` passes over a rollout's rows [N, ...], each in a fresh permutation (drawn
    from `key`), cut into N / batch_size update batches of batch_size rows: the update
    batches of one rollout (GRPO's num_iterations, PPO's num_ppo_epochs x minibatches)."""
    n = len(next(iter(arrays.values())))
    if n % batch_size:
        raise ValueError(f"a rollout of {n} rows does not split into batches of {batch_size}")
    out = []
    for e in range(epochs):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, e), n))
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            out.append({k: np.asarray(v)[rows] for k, v in arrays.items()})
    return out
