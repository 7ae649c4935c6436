"""Recording the training trajectory from a transformers Trainer: the Trainer subclass (:mod:`.trainer`), the
callback that writes each step (:mod:`.recorder`) and the run's manifest (:mod:`.manifest`)."""

from .recorder import TrajectoryRecorder
from .trainer import AccInfTrainer

__all__ = ["AccInfTrainer", "TrajectoryRecorder"]
