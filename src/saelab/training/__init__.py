"""Training: the config, the one entry point (``train``: a list of dictionaries on one data source), the loop
with checkpoints and exact resume, lockstep stepping of several trainers, the sweep, training curves."""

from saelab.training.config import TrainConfig
from saelab.training.plots import plot_training_curves
from saelab.training.run import RunSummary, train
from saelab.training.trainer import Trainer, TrainResult

__all__ = ["RunSummary", "TrainConfig", "TrainResult", "Trainer", "plot_training_curves", "train"]
