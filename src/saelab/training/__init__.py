"""Training: config, the loop with checkpoints and exact resume, training curves."""

from saelab.training.config import TrainConfig
from saelab.training.plots import plot_training_curves
from saelab.training.trainer import Trainer, TrainResult

__all__ = ["TrainConfig", "TrainResult", "Trainer", "plot_training_curves"]
