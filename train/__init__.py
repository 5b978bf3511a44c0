"""fmzoo.train: input pipelines, losses, step functions, mesh, loop, checkpoints.

The step-level pieces import eagerly; the loop, checkpoints (orbax) and data pipeline
(grain, tensorflow-datasets) load on first use.
"""

from .losses import lm_loss, make_loss, masked_cross_entropy, seq2seq_loss
from .mesh import MeshError, make_mesh, maybe_initialize_distributed, put_batch
from .optim import lr_schedule, make_optimizer
from .state import TrainState, create_train_state, sharded_init, state_shardings
from .step import (accumulate_gradients, make_eval_step, make_pmap_step, make_train_step,
                   replicate, shard_batch, unreplicate)

_LAZY = {
    "TrainConfig": "loop", "train": "loop", "TrainingDiverged": "loop",
    "Checkpointer": "checkpoint", "CheckpointError": "checkpoint", "load_workdir": "checkpoint",
    "lm_batches": "data", "seq2seq_batches": "data", "dataset_kind": "data",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "lm_loss", "make_loss", "masked_cross_entropy", "seq2seq_loss", "MeshError", "make_mesh",
    "maybe_initialize_distributed", "put_batch", "lr_schedule", "make_optimizer", "TrainState",
    "create_train_state", "sharded_init", "state_shardings", "accumulate_gradients",
    "make_eval_step", "make_pmap_step", "make_train_step", "replicate", "shard_batch",
    "unreplicate", *_LAZY,
]
