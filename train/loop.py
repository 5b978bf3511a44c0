"""Compatibility names for the pretraining command, now in train/pretrain.py (built on the
Trainer of train/trainer.py, with settings from train/config.py)."""

from .config import Settings
from .pretrain import prepare, train
from .trainer import TrainingDiverged

TrainConfig = Settings  # the settings are nested now: Settings(model=..., data=..., ...)

__all__ = ["Settings", "TrainConfig", "TrainingDiverged", "prepare", "train"]
