"""Recording the training trajectory from a transformers Trainer."""

from .trainer import AccInfTrainer, TrajectoryRecorder

__all__ = ["AccInfTrainer", "TrajectoryRecorder"]
