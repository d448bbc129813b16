"""Optional experiment tracking with Weights & Biases (``--wandb``; ``pip install 'saelab[wandb]'``).

The run folder's metrics.jsonl and training_curves.png are written either way; a tracker mirrors them:
every metrics record the trainer writes, a histogram of log10 firing frequencies at the end of every
dead window, the final evaluation (run summary, ``eval/`` keys) and the final SAE folder as a ``model``
artifact. ``WANDB_MODE=offline`` logs to local files for a later ``wandb sync``. The W&B run id is kept
in the run folder, so ``saelab train --resume`` continues the same W&B run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from saelab.files import read_json, write_json

WANDB_RUN_FILE = "wandb_run.json"
FREQUENCY_FLOOR = 1e-10  # log10 of a never-firing latent's frequency: -10, as in the SAELens sparsity file


class NullTracker:
    """Tracks nothing: the default, and what every rank but 0 gets under torchrun."""

    def log_metrics(self, record: dict) -> None:
        pass

    def log_density(self, frequency: torch.Tensor, step: int) -> None:
        pass

    def log_eval(self, metrics: dict) -> None:
        pass

    def log_sae(self, folder, metadata: dict | None = None) -> None:
        pass

    def finish(self, completed: bool = True) -> None:
        pass


class WandbTracker(NullTracker):
    def __init__(self, run, wandb_module, artifact_name: str):
        self.run, self.wandb, self.artifact_name = run, wandb_module, artifact_name

    def log_metrics(self, record: dict) -> None:
        # Keyed by optimiser step. After a crash, a resumed run logs again the steps between its last
        # checkpoint and the crash; W&B ignores steps below the last it holds (their values were the same).
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def log_density(self, frequency: torch.Tensor, step: int) -> None:
        values = torch.log10(frequency.detach().float().cpu() + FREQUENCY_FLOOR).numpy()
        self.run.log({"density/log10_firing_frequency": self.wandb.Histogram(values)}, step=step)

    def log_eval(self, metrics: dict) -> None:
        frequency = metrics.get("firing_frequency")
        scalars = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        if isinstance(frequency, torch.Tensor):
            values = torch.log10(frequency.float().cpu() + FREQUENCY_FLOOR).numpy()
            scalars["eval/log10_firing_frequency"] = self.wandb.Histogram(values)
        self.run.summary.update(scalars)

    def log_sae(self, folder, metadata: dict | None = None) -> None:
        artifact = self.wandb.Artifact(self.artifact_name, type="model", metadata=metadata or {},
                                       description="SAE in the SAELens folder format (cfg.json, "
                                       "sae_weights.safetensors), written by saelab")
        artifact.add_dir(str(folder))
        self.run.log_artifact(artifact)

    def finish(self, completed: bool = True) -> None:
        self.run.finish(exit_code=0 if completed else 1)


def require_wandb():
    """The wandb module, or an error that says how to install it."""
    try:
        import wandb
    except ImportError:
        raise RuntimeError("--wandb needs the wandb package, which is not installed: "
                           "pip install 'saelab[wandb]' (or run without --wandb; metrics.jsonl and "
                           "training_curves.png are written either way)") from None
    return wandb


def start_tracking(cfg, run_dir, resume: bool = False, main_process: bool = True,
                   group: str | None = None) -> NullTracker:
    """A W&B tracker for the run in ``run_dir`` when ``cfg.wandb`` is on (on the main process only), else
    a ``NullTracker``. W&B files go to ``$WANDB_DIR`` when set, else into the run folder. Several SAEs
    trained together get a W&B run each, in one ``group``."""
    if not cfg.wandb:
        return NullTracker()
    wandb = require_wandb()  # on every rank: a missing package fails the same way everywhere
    if not main_process:
        return NullTracker()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = _stored_run_id(run_dir) if resume else None  # None: W&B makes a new one
    name = cfg.wandb_run_name or run_dir.resolve().name
    run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=name, id=run_id, resume="allow",
                     config=cfg.as_dict(), job_type="train", group=group, reinit="create_new",
                     dir=None if os.environ.get("WANDB_DIR") else str(run_dir))
    write_json(run_dir / WANDB_RUN_FILE, {"id": run.id, "project": cfg.wandb_project, "entity": cfg.wandb_entity})
    return WandbTracker(run, wandb, artifact_name=_artifact_name(f"sae-{name}"))


def _stored_run_id(run_dir: Path) -> str | None:
    path = run_dir / WANDB_RUN_FILE
    return read_json(path, "Delete it to start a new W&B run for this run folder.")["id"] if path.exists() else None


def _artifact_name(name: str) -> str:
    """W&B artifact names allow letters, digits, dashes, underscores and dots."""
    return re.sub(r"[^\w.-]", "-", name)
