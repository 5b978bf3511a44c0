"""Writing training workdirs: orbax checkpoints with checksums, the data-iterator position,
and a lock so that one run at a time writes a workdir. The layout and the reader live in
fmzoo.models.workdir (fmzoo.load must not import the training package).

Each save goes through orbax's CheckpointManager (async). Orbax writes the step into a
temporary directory and renames it when complete; just before the rename (orbax's
post-finalization hook, after every process has written) process 0 records the sha256 of
every file in it, so a committed step always carries its checksums and a damaged one is
found on resume (fall back to the previous intact step) and on load (a clear error).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from fmzoo.models.workdir import (  # noqa: F401  (re-exported: the training side's names)
    CKPT_DIR, RUN_FILE, RUN_FORMAT, TMP_SUFFIX, TOKENIZER_DIR, CheckpointError, abstract_like,
    committed_steps, config_diff, damaged_message, describe_mismatch, has_checkpoints,
    read_run_file, step_damage, unfinished_steps, write_json_atomic, write_manifest)
from fmzoo.models.workdir import load_workdir as _load_workdir

from .lock import LOCK_FILE, workdir_lock  # noqa: F401  (re-exported)

DAMAGED_DIR = "checkpoints_damaged"  # damaged steps are moved here on resume, never deleted


def load_workdir(path: str, mesh: Any = None, step: int | None = None, **kw):
    """Alias of fmzoo.models.workdir.load_workdir (kept for existing callers)."""
    return _load_workdir(path, mesh=mesh, step=step, **kw)


def write_run_file(workdir: str, config: Any, settings: dict) -> None:
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, RUN_FILE), {
            "format": RUN_FORMAT, "model_config": config.to_dict(), "settings": settings})


# ---------------------------------------------------------------------------- data state


class _IterState:
    """What grain's orbax handler saves and restores for a BatchIterator: its state as JSON
    bytes, captured when the save starts (the iterator moves on while orbax writes)."""

    def __init__(self, state: bytes | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return self.state

    def set_state(self, state: bytes) -> None:
        self.state = state

    def start_prefetch(self) -> None:  # grain's handler calls it after set_state
        pass


def _data_handler():
    try:
        import grain.checkpoint as grain_ckpt
    except ImportError:
        return None
    return grain_ckpt.CheckpointHandler()


# ---------------------------------------------------------------------------- Checkpointer


class _DropOrbaxErrors(logging.Filter):
    """Orbax logs a failed background save with a traceback per thread and then re-raises it
    in wait_until_finished, where the Checkpointer turns it into one CheckpointError."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


class Checkpointer:
    """The orbax CheckpointManager of one workdir (async saves, keep the last `keep`)."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise CheckpointError(f"keep must be >= 1 (got {keep}): it is how many "
                                  "checkpoints are kept, and 0 would delete every save")
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, CKPT_DIR)
        self.async_save = async_save
        self._saving: int | None = None
        self._checked: dict[int, str | None] = {}
        self._closed = False
        left = unfinished_steps(self.directory)
        if left and jax.process_index() == 0:
            warnings.warn(f"removing unfinished checkpoint director{'ies' if len(left) > 1 else 'y'}"
                          f" {', '.join(left)} in {self.directory} (a save was interrupted)",
                          UserWarning, stacklevel=2)
            for name in left:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        handlers = {"params": ocp.StandardCheckpointHandler(),
                    "train": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        data = _data_handler()
        if data is not None:
            handlers["data"] = data
        # Always async: the post-finalization hook that writes the checksums needs it.
        # Directories are made in save() itself: one that cannot be made then fails there,
        # instead of leaving orbax's writer threads waiting for it for 20 minutes.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_checksums,
                                           create_directories_asynchronously=False))
        self.manager = ocp.CheckpointManager(self.directory, item_handlers=handlers,
                                             options=options)
        self._quiet = _DropOrbaxErrors()
        logging.getLogger("absl").addFilter(self._quiet)  # removed in close()

    def _write_checksums(self) -> None:
        """Runs on process 0 after every process has written the step, before the rename."""
        tmp = os.path.join(self.directory, f"{self._saving}{TMP_SUFFIX}")
        final = os.path.join(self.directory, str(self._saving))
        write_manifest(tmp if os.path.isdir(tmp) else final)

    def _damage(self, step: int) -> str | None:
        if step not in self._checked:
            self._checked[step] = step_damage(os.path.join(self.directory, str(step)))
        return self._checked[step]

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        """The latest intact step (a damaged later one is reported with a warning); waits
        for a running save first, so that it is judged finished."""
        self._finish()
        for step in reversed(self.all_steps()):
            damage = self._damage(step)
            if damage is None:
                return step
            warnings.warn(f"the checkpoint at step {step} in {self.directory} is damaged "
                          f"({damage}); falling back to an earlier step", UserWarning,
                          stacklevel=2)
        return None

    def save(self, state: Any, meta: dict, data_iter: Any = None) -> None:
        """Starts an (async) save of `state` at its step, with `data_iter`'s position when
        given; returns once the arrays are copied (or, with async_save=False, once written).
        A failed save (this one or the previous, still running one) raises CheckpointError."""
        step = int(jax.device_get(state.step))
        self._finish()  # the checksum hook reads self._saving
        items = dict(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state,
                                         "rng": state.rng}),
            meta=ocp.args.JsonSave(meta))
        if data_iter is not None:
            if not callable(getattr(data_iter, "get_state", None)):
                raise TypeError(f"data_iter {type(data_iter).__name__} has no get_state(); pass "
                                "a BatchIterator (fmzoo.train.batching) or data_iter=None")
            import grain.checkpoint as grain_ckpt
            # encoded now: the iterator moves on while the save runs in the background
            snapshot = json.dumps(data_iter.get_state()).encode()
            items["data"] = grain_ckpt.CheckpointSave(_IterState(snapshot))
        self._saving = step
        self._checked.pop(step, None)
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            self._saving = None
            raise self._save_failed(step, e) from None
        if not self.async_save:
            self._finish()

    def _save_failed(self, step: int, e: Exception) -> CheckpointError:
        return CheckpointError(
            f"saving the checkpoint at step {step} in {self.directory} failed "
            f"({type(e).__name__}: {str(e)[:300]}); check that the directory is writable and "
            "the disk has space (the earlier checkpoints are intact)")

    def _finish(self) -> None:
        """Waits for the running save; its failure becomes one CheckpointError."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(self._saving, e) from None
        finally:
            self._saving = None

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def verify(self, step: int) -> None:
        """Raises CheckpointError naming the step and the file if `step` is damaged."""
        if step not in self.all_steps():
            raise CheckpointError(f"no checkpoint at step {step} in {self.directory}; "
                                  f"available: {self.all_steps()}")
        damage = self._damage(step)
        if damage:
            earlier = [s for s in self.all_steps() if s < step and self._damage(s) is None]
            raise CheckpointError(damaged_message(self.directory, step, damage,
                                                  earlier[-1] if earlier else None))

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
            f"{self._step_dir(step)} to fall back to an earlier step, or start a new workdir")

    def _restore_meta(self, step: int) -> dict:
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return dict(out["meta"])
        except Exception as e:
            raise self._corrupt(step, e) from None

    def _set_aside_damaged_after(self, step: int) -> None:
        """A resumed run will save the steps after `step` again: move damaged ones out of the
        way (kept for inspection in DIR/checkpoints_damaged)."""
        later = [s for s in self.all_steps() if s > step and self._damage(s)]
        if later and jax.process_index() == 0:
            dest = os.path.join(self.workdir, DAMAGED_DIR)
            os.makedirs(dest, exist_ok=True)
            for s in later:
                target = os.path.join(dest, f"{s}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
                shutil.move(self._step_dir(s), target)
                warnings.warn(f"moved the damaged checkpoint step {s} to {target}",
                              UserWarning, stacklevel=3)
        if later:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices("fmzoo_set_aside_damaged")
            self.manager.reload()

    def restore(self, step: int, target: Any, config: Any = None,
                data_iter: Any = None) -> tuple[Any, dict]:
        """(state, meta) at `step`, laid out like `target` (a TrainState of ShapeDtypeStructs
        carrying shardings, so the mesh may differ from the one that saved); `data_iter`
        continues from the saved position."""
        self.verify(step)
        self.check_params(step, target.params, config)
        train_target = {"step": target.step, "opt_state": target.opt_state, "rng": target.rng}
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target.params),
                train=ocp.args.StandardRestore(train_target), meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise self._corrupt(step, e) from None
        if data_iter is not None:
            self._restore_data(step, data_iter)
        self._set_aside_damaged_after(step)
        train = out["train"]
        state = target.replace(step=train["step"], params=out["params"],
                               opt_state=train["opt_state"], rng=train["rng"])
        return state, dict(out["meta"])

    def _restore_data(self, step: int, data_iter: Any) -> None:
        data_dir = os.path.join(self._step_dir(step), "data")
        saved = sorted(n for n in (os.listdir(data_dir) if os.path.isdir(data_dir) else [])
                       if n.startswith("process_") and n.endswith(".json"))
        if not saved:
            raise CheckpointError(f"the checkpoint at step {step} in {self.directory} holds no "
                                  "data-iterator position; start a new workdir")
        n = jax.process_count()
        if f"process_{jax.process_index()}-of-{n}.json" not in saved:
            was = saved[0].rsplit("-of-", 1)[-1].split(".")[0]
            raise CheckpointError(
                f"the checkpoint at step {step} was written by {was} process(es) but this run "
                f"has {n}; resume with {was} processes")
        import grain.checkpoint as grain_ckpt
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                data=grain_ckpt.CheckpointRestore(_IterState())))
            state = json.loads(out["data"].state)
        except Exception as e:
            raise self._corrupt(step, e) from None
        try:
            data_iter.set_state(state)
        except ValueError as e:  # e.g. --data or --seq-len changed since the checkpoint
            raise CheckpointError(f"--resume: cannot continue the data stream: {e}") from None

    def restore_params(self, step: int, target: Any) -> Any:
        self.verify(step)
        self.check_params(step, target)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target)))
        except Exception as e:
            raise self._corrupt(step, e) from None
        return out["params"]

    def wait(self) -> None:
        self._finish()

    def close(self) -> None:
        """Waits for the last save and closes the manager, once; a failed save raises its
        error here, after the manager is closed (no asyncio noise from a half-closed one)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._finish()
        finally:
            with contextlib.suppress(Exception):
                self.manager.close()  # after a failed save it may fail again: reported above
            logging.getLogger("absl").removeFilter(self._quiet)

