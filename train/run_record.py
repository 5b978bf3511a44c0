"""The run record of a workdir: what a run checks against it before starting (same model,
optimizer state layout and adapters on --resume; no foreign checkpoints otherwise) and
DIR/fmzoo_run.json, written when it starts."""

from __future__ import annotations

import datetime
import os
from typing import Any

import jax

from . import checkpoint as ckpt_lib
from .config import check_resume, config_error


def check_workdir(settings: Any, config: Any, lora: Any, workdir: str) -> bool:
    """Whether the run resumes: every check of --workdir / --resume against what the
    workdir holds (read only: the Checkpointer tidies the directory under the lock)."""
    s = settings
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ckpt_lib.CheckpointError(f"--workdir {workdir} is a file; pass a directory")
    ckpt_dir = os.path.join(workdir, ckpt_lib.CKPT_DIR)
    if s.run.resume:
        run = ckpt_lib.read_run_file(workdir)
        if run["config"] != config:
            raise config_error(
                f"--resume: the model differs from the one in "
                f"{os.path.join(workdir, ckpt_lib.RUN_FILE)} ("
                f"{ckpt_lib.config_diff(run['model_config'], config.to_dict())}); "
                "use the same --model and overrides, or a new workdir")
        was = run.get("settings", {}).get("optim", {}).get("clip_norm")
        if was is not None and (was > 0) != (s.optim.clip_norm > 0):
            raise config_error(  # clipping adds a state to the optimizer
                f"--resume --clip-norm {s.optim.clip_norm:g}: the checkpoint's optimizer "
                f"{'clips' if was > 0 else 'does not clip'} (--clip-norm {was:g}); "
                "keep clipping on or off as the run started")
        now = lora.to_dict() if lora is not None else None
        if run.get("lora") != now:
            raise config_error(  # the adapters are part of the saved state
                f"--resume: the checkpoint was trained with LoRA {run.get('lora')} but "
                f"this run asks for {now}; resume with the same --lora-* options")
    elif ckpt_lib.has_checkpoints(workdir):
        raise ckpt_lib.CheckpointError(
            f"{workdir} already holds checkpoints; pass --resume to continue that run, "
            "or choose a new --workdir")
    # Read-only here: the Checkpointer (which tidies the directory) opens under the lock.
    steps = ckpt_lib.committed_steps(ckpt_dir)
    if s.run.resume and not steps:
        raise ckpt_lib.CheckpointError(
            f"--resume: no checkpoint in {ckpt_dir}; start without --resume")
    if s.run.resume:
        check_resume(s, steps[-1])
    return s.run.resume



def record_run(workdir: str, config: Any, settings: Any, lora: Any, init_info: dict,
               start: int) -> None:
    """DIR/fmzoo_run.json: model config, settings, starting weights, and one entry per
    invocation (a resumed run appends the settings it ran with)."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, ckpt_lib.RUN_FILE)
    history = []
    if start and os.path.exists(path):
        history = list(ckpt_lib.read_run_file(workdir).get("history", []))
    stored = settings.stored()
    history.append({"start_step": start, "settings": stored,
                    "time": datetime.datetime.now(datetime.timezone.utc).isoformat()})
    record = {"format": ckpt_lib.RUN_FORMAT, "model_config": config.to_dict(),
              "settings": stored, "history": history}
    if lora is not None:  # load_workdir merges the adapters into the base by it
        record["lora"] = lora.to_dict()
    if start:
        record["init"] = ckpt_lib.read_run_file(workdir).get("init", {})
    else:
        record["init"] = init_info
    ckpt_lib.write_json_atomic(path, record)

