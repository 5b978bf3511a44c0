"""fmzoo.train: run settings, the Trainer, input pipelines, losses, step functions, mesh,
checkpoints.

Everything loads on first use, so that `fmzoo.train.config` (the settings schema the CLI
is built from) imports without jax, and tensorflow-datasets / grain / orbax load only for
the commands that need them.
"""

_LAZY = {
    "lm_loss": "losses", "make_loss": "losses", "masked_cross_entropy": "losses",
    "seq2seq_loss": "losses",
    "MeshError": "mesh", "make_mesh": "mesh", "maybe_initialize_distributed": "mesh",
    "put_batch": "mesh",
    "lr_schedule": "optim", "make_optimizer": "optim",
    "TrainState": "state", "create_train_state": "state", "sharded_init": "state",
    "state_shardings": "state",
    "accumulate_gradients": "step", "make_eval_step": "step", "make_pmap_step": "step",
    "make_train_step": "step", "replicate": "step", "shard_batch": "step",
    "unreplicate": "step",
    "Settings": "config", "from_args": "config", "add_arguments": "config",
    "Trainer": "trainer", "Task": "trainer", "TrainingDiverged": "trainer",
    "train": "pretrain", "prepare": "pretrain",
    "Checkpointer": "checkpoint", "CheckpointError": "checkpoint", "load_workdir": "checkpoint",
    "dpo_loss": "dpo_losses", "prepare_dpo": "dpo", "DPOSettings": "dpo",
    "bt_loss": "reward", "reward_loss": "reward", "prepare_reward": "reward",
    "RewardSettings": "reward",
    "prepare_ppo": "ppo", "PPOSettings": "ppo",
    "lm_batches": "data", "seq2seq_batches": "data", "dataset_kind": "data",
    "LMJudge": "judges", "RewardModelJudge": "judges", "FunctionJudge": "judges",
    "PairwiseJudge": "judges", "load_judge": "judges", "JudgeError": "judges",
    "label_pairs": "label", "LabelError": "label",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = list(_LAZY)
