"""Training workdirs: orbax checkpoints plus the files that make a run reloadable.

    DIR/fmzoo_run.json        marks a training workdir: model config, training settings
    DIR/tokenizer/            the tokenizer (tokenizer.save)
    DIR/checkpoints/<step>/   orbax CheckpointManager steps, each with the items
        params                the model params (restorable alone, e.g. by fmzoo.load)
        train                 step, optimiser state, rng
        meta                  JSON: model config, data-iterator state of every process,
                              tokens seen
    DIR/metrics.jsonl, DIR/tb/  metrics (train/metrics.py)

Orbax writes each step into a temporary directory and renames it when complete, so an
interrupted save never looks like a checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, SingleDeviceSharding

from fmzoo.models import registry
from fmzoo.models.bundle import Loaded
from fmzoo.models.config import config_from_dict
from fmzoo.models.sharding import param_shardings

RUN_FILE = "fmzoo_run.json"  # fmzoo.api recognises a workdir by this file
RUN_FORMAT = "fmzoo-train-run/1"
CKPT_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"


class CheckpointError(ValueError):
    """A workdir or checkpoint that cannot be used as asked."""


def _handlers() -> dict:
    return {"params": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler()}


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def write_run_file(workdir: str, config: Any, settings: dict) -> None:
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, RUN_FILE), {
            "format": RUN_FORMAT, "model_config": config.to_dict(), "settings": settings})


def read_run_file(workdir: str) -> dict:
    path = os.path.join(workdir, RUN_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{workdir!r} is not a training workdir (no {RUN_FILE}); "
                              "pass a directory written by `fmzoo train`")
    try:
        with open(path) as f:
            run = json.load(f)
        run["config"] = config_from_dict(run["model_config"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e}); restore it from "
                              "a backup or start a new workdir") from None
    return run


def allgather_json(obj: Any) -> list:
    """Every process's `obj` (JSON-able), in process order; e.g. each one's data position."""
    if jax.process_count() == 1:
        return [obj]
    import numpy as np
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int32)).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:data.size] = data
    every = multihost_utils.process_allgather(buf).reshape(len(sizes), -1)
    return [json.loads(bytes(every[i, :n]).decode()) for i, n in enumerate(sizes)]


def _flat_shapes(tree: Any) -> dict[str, tuple]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def describe_mismatch(expected: Any, found: Any, limit: int = 6) -> str | None:
    """None when the two param trees agree in keys and shapes, else a readable diff."""
    want, have = _flat_shapes(expected), _flat_shapes(found)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    shapes = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    parts = []

    def cut(xs):
        return ", ".join(xs[:limit]) + (f" and {len(xs) - limit} more" if len(xs) > limit else "")
    if missing:
        parts.append(f"missing from the checkpoint: {cut(missing)}")
    if extra:
        parts.append(f"in the checkpoint but not in the model: {cut(extra)}")
    if shapes:
        parts.append("different shapes: " + cut([f"{k} {have[k]} vs model {want[k]}"
                                                 for k in shapes]))
    return "; ".join(parts) or None


def config_diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}={a.get(k)!r} (checkpoint) vs {b.get(k)!r}" for k in keys)


class Checkpointer:
    """The orbax CheckpointManager of one workdir (async saves, keep the last `keep`)."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, CKPT_DIR)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, item_handlers=_handlers(),
                                             options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: Any, meta: dict) -> None:
        """Starts an (async) save of `state` at its step; returns once the arrays are copied."""
        step = int(jax.device_get(state.step))
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state,
                                         "rng": state.rng}),
            meta=ocp.args.JsonSave(meta)), force=True)

    def check_params(self, step: int, expected_params: Any, config: Any = None) -> None:
        """Raises CheckpointError naming the mismatched keys if the architectures differ."""
        try:
            found = self.manager.item_metadata(step)["params"]
        except Exception as e:  # orbax raises several types for unreadable metadata
            raise self._corrupt(step, e) from None
        found = getattr(found, "tree", found)
        diff = describe_mismatch(expected_params, found)
        if diff:
            extra = ""
            if config is not None:
                meta = self._restore_meta(step)
                cd = config_diff(meta.get("model_config", {}), config.to_dict())
                extra = f" (config differences: {cd})" if cd else ""
            raise CheckpointError(
                f"the checkpoint at step {step} in {self.directory} is of another "
                f"architecture than the model being built{extra}: {diff}. Use the same "
                "--model and overrides as the run that wrote it, or a new workdir")

    def _corrupt(self, step: int, e: Exception) -> CheckpointError:
        return CheckpointError(
            f"the checkpoint at step {step} in {self.directory} cannot be read "
            f"({type(e).__name__}: {str(e)[:300]}); it is corrupt or incomplete. Delete "
            f"{os.path.join(self.directory, str(step))} to fall back to an earlier step, "
            "or start a new workdir")

    def _restore_meta(self, step: int) -> dict:
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return dict(out["meta"])
        except Exception as e:
            raise self._corrupt(step, e) from None

    def restore(self, step: int, target: Any, config: Any = None) -> tuple[Any, dict]:
        """(state, meta) at `step`, laid out like `target` (a TrainState of ShapeDtypeStructs
        carrying shardings, so the mesh may differ from the one that saved)."""
        self.check_params(step, target.params, config)
        train_target = {"step": target.step, "opt_state": target.opt_state, "rng": target.rng}
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target.params),
                train=ocp.args.StandardRestore(train_target), meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise self._corrupt(step, e) from None
        train = out["train"]
        state = target.replace(step=train["step"], params=out["params"],
                               opt_state=train["opt_state"], rng=train["rng"])
        return state, dict(out["meta"])

    def restore_params(self, step: int, target: Any) -> Any:
        self.check_params(step, target)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target)))
        except Exception as e:
            raise self._corrupt(step, e) from None
        return out["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(shapes: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
                        shapes, shardings)


def load_workdir(path: str, mesh: Mesh | None = None, step: int | None = None) -> Loaded:
    """The latest (or given) checkpoint's params with model, config and tokenizer.

    Params go onto `mesh` by the zoo's sharding rules, or onto the first local device.
    """
    from fmzoo.models.tokenizer import load_tokenizer

    path = os.path.abspath(os.path.expanduser(path))
    run = read_run_file(path)
    config = run["config"]
    ckpt = Checkpointer(path, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"the workdir {path} has no checkpoint yet (nothing in "
                                  f"{ckpt.directory}); train with --save-every or let a run finish")
        if step not in ckpt.manager.all_steps():
            raise CheckpointError(f"no checkpoint at step {step} in {ckpt.directory}; "
                                  f"available: {list(ckpt.manager.all_steps())}")
        shapes = registry.param_shapes(config)
        if mesh is None:
            shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.local_devices()[0]), shapes)
        else:
            shardings = param_shardings(registry.logical_axes(config), shapes, mesh)
        params = ckpt.restore_params(step, abstract_like(shapes, shardings))
    finally:
        ckpt.close()
    tok_dir = os.path.join(path, TOKENIZER_DIR)
    tokenizer = load_tokenizer(tok_dir) if os.path.isdir(tok_dir) else None
    return Loaded(registry.build(config), params, config, tokenizer, source=path)
