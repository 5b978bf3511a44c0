"""The Trainer every training command runs on: state, compiled step, evaluation, logging,
checkpoints and the run record of one workdir.

A command (pretraining, sft, dpo, ...) brings a `Task`: a pure loss
`(params, batch, rng) -> (loss, metrics)` whose metrics hold 'loss' and 'tokens' (the
token count it averaged over; steps and evaluation weight by it), a batch iterator with
get_state / set_state, a factory of held-out batches, and optional hooks for extra metrics
and a sample. Everything that can be checked (mesh, batch split, workdir, resume step) is
checked when the Trainer is made, before anything is written; `run()` then holds the
workdir lock for the whole run.

A state is saved only after its loss, gradient norm and params were seen finite, so the
latest checkpoint is always one a run can continue from.

A command may hand the Trainer FROZEN weights (DPO's reference model): `frozen=params` (a
tree like the model's params) or, with LoRA, `frozen=FROZEN_BASE` (the frozen base itself).
The task's losses are then `(params, batch, rng, frozen)`; the frozen weights are laid out
like the params, given to every compiled step and evaluation, never trained, never saved.

Online RL brings an on-policy batch source (train/onpolicy.py): the Trainer hands it the
current policy, and the frozen weights go to its rollouts instead of the step
(`Task.frozen_in_step=False`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint as ckpt_lib
from .config import Settings, config_error
from .divergence import divergence_message
from .losses import LossFn
from .mesh import check_batch_size, make_mesh, put_batch
from .metrics import MetricsWriter, truncate_metrics
from .optim import lr_schedule, make_optimizer
from .state import (check_frozen, create_train_state, lora_loss, lora_optimizer, sharded_init,
                    state_shapes, state_shardings)
from .step import (bind_frozen, make_eval_step, make_pmap_step, make_train_step, replicate,
                   shard_batch, unreplicate)


FROZEN_BASE = "lora_base"  # Trainer(frozen=...): with LoRA, the frozen base is the frozen input


class TrainingDiverged(RuntimeError):
    """The loss, the gradients or the updated params became NaN or Inf."""


@dataclasses.dataclass
class Task:
    """What a training command brings to the Trainer."""
    loss_fn: LossFn  # training loss (dropout on)
    batches: Any  # iterator of host batches (this process's rows), with get_state/set_state
    eval_loss_fn: LossFn | None = None  # deterministic loss; None: loss_fn with rng=None
    eval_batches: Callable[[], Iterable[dict]] | None = None  # fresh GLOBAL held-out batches
    metrics: Callable[[dict], dict] | None = None  # extra values for a logged train row
    eval_metrics: Callable[[dict], dict] | None = None  # extra values for an eval row
    sample: Callable[[Any, dict], str | None] | None = None  # (params, first eval batch)
    # metrics only generation can give (exact match, ...) and a text to show: (params) ->
    # ({"eval_exact_match": ...}, "samples" or None); run at each evaluation on process 0's
    # params after the held-out loss
    generate_eval: Callable[[Any], tuple[dict, str | None]] | None = None
    no_eval_reason: str = "no held-out split"
    # the frozen weights go to the step (DPO) or only to an on-policy batch source's
    # rollouts (PPO / GRPO reference log-probs; train/onpolicy.py)
    frozen_in_step: bool = True


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def _place(x, sharding) -> jax.Array:
    """A host copy laid out by `sharding`; every process holds the same loaded weights, so
    each fills in its own shards (device_put cannot cross processes)."""
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


class Trainer:
    """Runs `task` under `settings` for model `config`; see the module docstring. `task` may
    be a function returning the Task, called once the settings passed every check here (so a
    bad flag never waits for a dataset to be prepared)."""

    def __init__(self, settings: Settings, config: Any, task: Task | Callable[[], Task], *,
                 init_params: Any = None, init_info: dict | None = None,
                 tokenizer: Any = None, stop_after: int | None = None, lora: Any = None,
                 frozen: Any = None):
        self.settings, self.config, self.task = settings, config, task
        self.lora = lora  # a LoraSpec: params are {"base" (frozen), "lora" (trained)}
        self.frozen = check_frozen(config, lora, frozen, FROZEN_BASE)
        self.tokenizer, self.stop_after = tokenizer, stop_after
        self.init_params, self.init_info = init_params, init_info or {}
        s = settings
        self.workdir = os.path.abspath(os.path.expanduser(s.run.workdir))
        self.mesh = self._mesh()
        # the commands resolve the recipe first; a direct caller's None gets the family's
        from fmzoo.models.recipes import recipe_for

        from .config import with_recipe
        s = self.settings = with_recipe(s, recipe_for(config))
        o = s.optim
        self.schedule = lr_schedule(o.lr, s.run.steps, o.warmup, kind=o.schedule)
        self.tx = make_optimizer(o.lr, s.run.steps, warmup_steps=o.warmup, schedule=o.schedule,
                                 weight_decay=o.weight_decay, clip_norm=o.clip_norm)
        if lora is not None:
            self.tx = lora_optimizer(self.tx)
        self.resume = self._open_workdir()
        self.ckpt: ckpt_lib.Checkpointer | None = None
        if not isinstance(task, Task):  # a factory: build the data only once all else is valid
            self.task = task()
        self.tokens_seen = 0
        self.counts: dict[str, float] = {}  # cumulative num_* metrics (TRL's num_tokens)
        self.pending: list[tuple[int, dict]] = []
        self.summary: dict[str, Any] = {"workdir": self.workdir}

    # ------------------------------------------------------------------ checks

    def _mesh(self):
        s, batch, accum = self.settings, self.settings.data.batch_size, self.settings.optim.accum
        if s.mesh.pmap:
            n = jax.local_device_count()
            if batch % (n * accum * jax.process_count()):
                raise config_error(f"--pmap: the batch size {batch} must be a multiple of "
                                   f"{n * jax.process_count()} devices x --accum {accum}")
            return make_mesh("data=1", jax.local_devices()[:1])  # eval runs on one device
        mesh = make_mesh(s.mesh.spec)
        check_batch_size(batch, mesh)
        per_shard = batch // (mesh.shape["data"] * mesh.shape["fsdp"])
        if per_shard % accum:
            raise config_error(f"--accum {accum} must divide the per-shard batch {per_shard}")
        return mesh

    def _open_workdir(self) -> bool:
        from .run_record import check_workdir
        return check_workdir(self.settings, self.config, self.lora, self.workdir)

    def _checkpointer(self) -> ckpt_lib.Checkpointer:
        c = self.settings.checkpoint
        return ckpt_lib.Checkpointer(self.workdir, keep=c.keep, async_save=c.async_save)

    # ------------------------------------------------------------------ the run

    def run(self) -> dict:
        """Trains (or resumes) to settings.run.steps; returns a summary of the last values."""
        import tqdm
        s = self.settings
        with ckpt_lib.workdir_lock(self.workdir):  # a second live run is refused here
            os.makedirs(self.workdir, exist_ok=True)
            self.ckpt = self._checkpointer()
            start = self.ckpt.latest_step() if self.resume else None  # latest intact step
            if self.resume and start is None:
                self.ckpt.close()
                raise ckpt_lib.CheckpointError(f"--resume: no intact checkpoint in "
                                               f"{self.ckpt.directory}; start a new workdir")
            self.writer = MetricsWriter(self.workdir)
            self.bar = tqdm.tqdm(total=s.run.steps, initial=start or 0, desc="train",
                                 unit="step", dynamic_ncols=True,
                                 disable=not s.run.progress or jax.process_index() != 0)
            try:
                self._loop(self._start(start))
            finally:
                self.bar.close()
                self.writer.close()
                self.ckpt.close()
        self.summary["tokens_seen"] = self.tokens_seen
        return self.summary

    def _loop(self, state) -> None:
        s = self.settings
        if self.summary["start_step"] == 0 and getattr(s.eval, "at_start", False):
            self._evaluate_state(0, state)  # the base model
        for step in range(self.summary["start_step"] + 1, s.run.steps + 1):
            state, metrics = self.step_fn(state, self.feed(self._next_batch(state)))
            if step == self.summary["start_step"] + 1:  # compile time is not throughput
                jax.block_until_ready(metrics)
                self.clock = time.perf_counter()
            self.pending.append((step, metrics))
            self.bar.update(1)
            last = step == s.run.steps or step == self.stop_after
            save = step == s.run.steps or step % s.checkpoint.save_every == 0
            evaluate = step == s.run.steps or (s.eval.every and step % s.eval.every == 0)
            if last or save or evaluate or step % s.run.log_every == 0:
                self.log(step)  # raises TrainingDiverged before a bad state can be saved
            if save:
                self.save(state, step)
            if evaluate:
                self._evaluate_state(step, state)
            if last:
                break

    # ------------------------------------------------------------------ pieces

    def _next_batch(self, state) -> dict:
        batches = self.task.batches
        if not hasattr(batches, "next_batch"):
            return next(batches)
        from .onpolicy import PolicyView  # on-policy: rollouts from the current params

        def policy() -> PolicyView:
            params = self.host(state).params
            return PolicyView(self.model_params(params), self._reference(params), self.mesh)
        return batches.next_batch(policy)

    def _reference(self, params):
        """The frozen weights as laid out for the model (None without)."""
        return None if self.frozen is None else \
            params["base"] if isinstance(self.frozen, str) else self._frozen

    def _start(self, start: int | None):
        """The state to train from (fresh, from given weights, or the latest checkpoint),
        the compiled step for it, and the run record."""
        s, config = self.settings, self.config
        shapes = state_shapes(config, self.tx, s.run.seed, self.lora)
        if start is None:
            if self.init_params is None:
                state, shardings = sharded_init(config, self.tx, self.mesh, s.run.seed,
                                                self.lora)
            else:
                shardings = state_shardings(config, shapes, self.mesh, self.tx, lora=self.lora)
                state = self._init_from(self.init_params, shapes, shardings)
            self.init_params = None  # the state owns them now
            if self.tokenizer is not None and jax.process_index() == 0:
                self.tokenizer.save(os.path.join(self.workdir, ckpt_lib.TOKENIZER_DIR))
            start = 0
        else:
            shardings = state_shardings(config, shapes, self.mesh, self.tx, lora=self.lora)
            state = self._restore(start, ckpt_lib.abstract_like(shapes, shardings))
        truncate_metrics(self.workdir, start)  # a resumed run logs those steps again
        self._record_run(start)
        self.summary["start_step"] = start
        state = self._compile(state, shardings)
        self.clock = time.perf_counter()
        return state

    def _init_from(self, params, shapes, shardings):
        """A fresh optimizer state around given weights (continued pretraining, SFT); with
        LoRA the weights are the frozen base and the adapters start fresh (B = 0)."""
        if self.lora is not None:
            from fmzoo.models import lora as lora_lib
            key = jax.random.fold_in(jax.random.key(self.settings.run.seed), 1)
            params = {"base": params,
                      "lora": lora_lib.init_adapters(params, self.lora, key)}
        diff = ckpt_lib.describe_mismatch(shapes.params, params)
        if diff:
            raise ckpt_lib.CheckpointError(f"the starting weights do not fit the model: {diff}")
        finite = jax.device_get(jax.tree.map(lambda x: jnp.isfinite(x).all(), params))
        bad = [jax.tree_util.keystr(k) for k, ok in
               jax.tree_util.tree_flatten_with_path(finite)[0] if not ok]
        if bad:
            raise ckpt_lib.CheckpointError(
                f"the starting weights ({self.init_info.get('source', 'given')}) hold NaN or "
                f"Inf in {', '.join(bad[:4])}; start from another checkpoint or a preset")
        dtypes = jax.tree.map(lambda x: x.dtype, shapes.params)
        make = lambda p: create_train_state(  # noqa: E731
            jax.tree.map(lambda x, d: x.astype(d), p, dtypes), self.tx, self.settings.run.seed)
        params = jax.tree.map(_place, params, shardings.params)
        return jax.jit(make, out_shardings=shardings)(params)

    def _restore(self, step: int, target):
        # the checkpointer also moves the batch iterator to its saved position
        state, meta = self.ckpt.restore(step, target, self.config, data_iter=self.task.batches)
        self.tokens_seen = int(meta.get("tokens_seen", 0))
        self.counts = {k: float(v) for k, v in meta.get("counts", {}).items()}
        return state

    def _record_run(self, start: int) -> None:
        from .run_record import record_run
        record_run(self.workdir, self.config, self.settings, self.lora, self.init_info, start)

    def _compile(self, state, shardings):
        s = self.settings
        loss_fn = self._on_params(self.task.loss_fn)
        eval_loss = self.task.eval_loss_fn or (
            lambda p, b, rng, *frozen: self.task.loss_fn(p, b, None, *frozen))
        # evaluation sees the model's params (with LoRA: merged, laid out like the base)
        model_shardings = shardings.params if self.lora is None else shardings.params["base"]
        if self.lora is not None:
            from fmzoo.models import lora as lora_lib
            spec = self.lora
            self._merge = jax.jit(lambda p: lora_lib.merge(p["base"], p["lora"], spec),
                                  out_shardings=model_shardings)
        tree = self.frozen is not None and not isinstance(self.frozen, str)
        if tree:  # placed once, like the params; the host copy is released
            from fmzoo.models import registry
            dtypes = jax.tree.map(lambda x: x.dtype, registry.param_shapes(self.config))
            self._frozen = jax.tree.map(lambda x, sh, d: _place(np.asarray(
                jax.device_get(x)).astype(d), sh), self.frozen, model_shardings, dtypes)
            self.frozen = self._frozen
        in_step = self.frozen is not None and self.task.frozen_in_step
        tree = tree and in_step  # a step input
        self.eval_step = make_eval_step(eval_loss, self.mesh, model_shardings,
                                        frozen_shardings=model_shardings if in_step else None)
        if s.mesh.pmap:
            n_dev = jax.local_device_count()
            step = make_pmap_step(loss_fn, self.tx, accum_steps=s.optim.accum, frozen=tree)
            self.step_fn = bind_frozen(step, replicate(self._frozen) if tree else None)
            self.feed = lambda b: shard_batch(b, n_dev)
            self.host = lambda st: jax.device_put(unreplicate(st), shardings)
            return replicate(state)
        step = make_train_step(loss_fn, self.tx, self.mesh, shardings, accum_steps=s.optim.accum,
                               frozen_shardings=model_shardings if tree else None)
        self.step_fn = bind_frozen(step, self._frozen if tree else None)
        self.feed = lambda b: put_batch(b, self.mesh)
        self.host = lambda st: st
        return state

    def _on_params(self, loss_fn: LossFn) -> LossFn:
        """The task's loss on the model's params: with LoRA, the base (frozen: no gradient
        flows into it) merged with the adapters inside the step."""
        if self.lora is None:
            return loss_fn
        return lora_loss(loss_fn, self.lora, base_as_frozen=isinstance(self.frozen, str)
                         and self.task.frozen_in_step)

    def _evaluate_state(self, step: int, state) -> None:
        params = self.host(state).params
        frozen = self._reference(params) if self.task.frozen_in_step else None
        self.evaluate(step, self.model_params(params), frozen)

    def model_params(self, params):
        """The params a model call takes (LoRA merged), for evaluation and samples."""
        return params if self.lora is None else self._merge(params)

    def log(self, step: int) -> None:
        """Writes the pending train rows, each checked for divergence, with throughput."""
        rows = [(s, {k: float(np.asarray(v).reshape(-1)[0]) for k, v in m.items()})
                for s, m in jax.device_get(self.pending)]
        self.pending.clear()
        elapsed = time.perf_counter() - self.clock
        timed = [m["tokens"] for s, m in rows if s > self.summary["start_step"] + 1]
        speed = {"tokens_per_s": sum(timed) / elapsed} if timed and elapsed > 0 else {}
        for s, m in rows:
            self._check_finite(s, m)
            self.tokens_seen += int(m.pop("tokens"))
            for k in [k for k in m if k.startswith("num_")]:  # per step -> cumulative
                self.counts[k] = self.counts.get(k, 0.0) + m[k]
                m[k] = self.counts[k]
            m.update(tokens_seen=self.tokens_seen, lr=float(self.schedule(s - 1)), **speed)
            m.update(self.task.metrics(m) if self.task.metrics else {})
            self.writer.write(s, m)
            self.summary.update(step=s, loss=m["loss"], **speed)
        if rows:
            self.bar.set_postfix(loss=f"{self.summary['loss']:.3f}",
                                 tok_s=f"{self.summary.get('tokens_per_s', 0):.0f}")
        self.clock = time.perf_counter()

    def _check_finite(self, step: int, m: dict) -> None:
        bad = {k: m[k] for k in ("loss", "grad_norm", "param_norm")
               if k in m and not math.isfinite(m[k])}
        if bad:
            raise TrainingDiverged(self._divergence_message(step, bad))

    def _divergence_message(self, step: int, bad: dict) -> str:
        return divergence_message(step, bad, self.settings.optim, self.ckpt.latest_step(),
                                  self.ckpt.directory, self.init_info, self.config)

    def save(self, state, step: int) -> None:
        """Saves `state` after checking its params are finite (a NaN never reaches disk)."""
        host = self.host(state)
        if not bool(_all_finite(host.params)):
            raise TrainingDiverged(self._divergence_message(step, {"params": float("nan")}))
        meta = {"model_config": self.config.to_dict(), "tokens_seen": self.tokens_seen,
                "counts": self.counts,
                "step": step}
        self.ckpt.save(host, meta, data_iter=self.task.batches)
        self.clock = time.perf_counter()

    def evaluate(self, step: int, params, frozen: Any = None) -> None:
        """Token-weighted means of the eval loss's metrics over settings.eval.batches global
        batches; every process feeds its own rows, so the result does not depend on the
        number of processes. `frozen`: the frozen weights, when the Trainer has them."""
        import tqdm
        s, task = self.settings, self.task
        if task.eval_batches is None and task.generate_eval is None:
            tqdm.tqdm.write(f"step {step}: no eval ({task.no_eval_reason})")
            return
        rows = s.data.batch_size // jax.process_count()
        mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
        sums: dict[str, float] = {}
        tokens, first = 0.0, None
        for batch in itertools.islice(task.eval_batches() if task.eval_batches else (),
                                      s.eval.batches):
            first = batch if first is None else first
            part = put_batch({k: v[mine] for k, v in batch.items()}, self.mesh)
            out = self.eval_step(params, part, *(() if frozen is None else (frozen,)))
            m = {k: float(v) for k, v in jax.device_get(out).items()}
            n = m.pop("tokens")
            tokens += n
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + (v if k.startswith("num_") else v * n)
        out = {f"eval_{k}": v if k.startswith("num_") else v / max(tokens, 1.0)
               for k, v in sums.items()}
        out.update(task.eval_metrics(out) if task.eval_metrics else {})
        shown = None
        if task.generate_eval is not None:
            extra, shown = task.generate_eval(params)
            out.update(extra)
        self.writer.write(step, out)
        self.summary.update(out)
        sample = task.sample(params, first) if task.sample and first is not None else None
        sample = "\n".join(x for x in (sample, shown) if x) or None
        if jax.process_index() == 0:
            shown_metrics = ", ".join(  # the loss first, when there is one
                f"{k[5:]} {out[k]:.4f}" for k in sorted(out, key=lambda k: k != "eval_loss")
                if k.startswith("eval_") and "/" not in k)
            tqdm.tqdm.write(f"step {step}: eval {shown_metrics}"
                            + (f"\n  sample: {sample!r}" if sample else ""))
        if sample:
            self.writer.text(step, "sample", sample)
            self.summary["sample"] = sample
        self.clock = time.perf_counter()
