"""What ``saelab train`` does, as one function a Python user can call: load the model, stream its
activations into the trainer, evaluate the result on held-out text, save it in the SAELens format."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from saelab import __version__
from saelab.data.activations import LMActivationSource
from saelab.data.text import describe_source
from saelab.data.tokens import Packing
from saelab.evals.metrics import evaluate
from saelab.evals.report import format_table
from saelab.models import load_model, resolve_hook
from saelab.sae import SAE
from saelab.training import TrainConfig, Trainer, plot_training_curves
from saelab.training.trainer import CHECKPOINT_FILE, METRICS_FILE



@dataclass
class RunSummary:
    run_dir: Path
    sae: SAE
    completed: bool
    metrics: dict           # held-out evaluation (empty when skipped or stopped early)


def load_run_config(run_dir) -> TrainConfig:
    """The config a run was started with, read from its checkpoint."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: nothing to resume in {run_dir}")
    return TrainConfig(**torch.load(path, map_location="cpu", weights_only=False)["config"])


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> RunSummary:
    run_dir = Path(cfg.out)
    if not resume and not overwrite and (run_dir / CHECKPOINT_FILE).exists():
        raise FileExistsError(f"{run_dir} already holds a run. Continue it with `saelab train --resume {run_dir}`, "
                              "start afresh with --overwrite, or choose another --out.")
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, cfg.device)
    hook = resolve_hook(model, cfg.hook)
    eval_contexts = math.ceil(cfg.eval_tokens / cfg.context_size)
    holdout = eval_contexts if cfg.eval_dataset is None else 0  # held out from the training stream

    def source(dataset: str, **kwargs) -> LMActivationSource:
        return lm_source(cfg, model, tokenizer, hook, dataset, **kwargs)

    train_source = source(cfg.dataset, skip_contexts=holdout)
    trainer = Trainer(cfg, train_source, run_dir, metadata=sae_metadata(cfg, hook.module_path))
    _say(f"training a {cfg.architecture} SAE ({train_source.d_in} -> {trainer.sae.cfg.d_sae}) on {cfg.model} "
         f"{cfg.hook}, {cfg.tokens:,} tokens of {cfg.dataset}, into {run_dir}")
    result = trainer.run(resume=resume)
    plot_training_curves(run_dir / METRICS_FILE, run_dir / "training_curves.png")
    if not result.completed:
        _say(f"stopped at step {result.steps}; checkpoint written. Resume: saelab train --resume {run_dir}")
        return RunSummary(run_dir, result.sae, False, {})

    metrics: dict = {}
    if cfg.eval_tokens > 0:
        eval_dataset = cfg.eval_dataset or cfg.dataset
        _say(f"evaluating on {eval_contexts * cfg.context_size:,} held-out tokens of {eval_dataset}")
        held_out = source(eval_dataset, max_contexts=eval_contexts)
        metrics = evaluate(model, result.sae, hook, held_out.token_batches(), held_out.keep_mask)
        metrics["eval_dataset"] = eval_dataset
    frequency = metrics.pop("firing_frequency", result.firing_frequency)
    result.sae.save(run_dir / "final", sparsity=torch.log10(frequency + 1e-10), runner_cfg=asdict(cfg))
    summary = {**metrics, "train_tokens": result.tokens, "train_seconds": round(result.seconds, 1)}
    (run_dir / "eval.json").write_text(json.dumps(summary, indent=2))
    _say(format_table(metrics, "held-out evaluation:") if metrics else "evaluation skipped (--eval-tokens 0)")
    _say(f"SAE saved to {run_dir / 'final'} (SAELens format); curves in {run_dir / 'training_curves.png'}")
    return RunSummary(run_dir, result.sae, True, metrics)


def lm_source(cfg: TrainConfig, model, tokenizer, hook, dataset: str, **kwargs) -> LMActivationSource:
    """The activations of ``hook`` over ``dataset``, tokenised and packed as ``cfg`` says."""
    return LMActivationSource(model, tokenizer, hook, dataset, Packing(cfg.context_size, cfg.prepend_bos),
                              split=cfg.dataset_split, text_column=cfg.text_column,
                              batch_contexts=cfg.lm_batch_size, exclude_special_tokens=cfg.exclude_special_tokens,
                              **kwargs)


def sae_metadata(cfg: TrainConfig, module_path: str) -> dict:
    """What an SAE trained with ``cfg`` records about its training data (SAELens metadata keys)."""
    return {"model_name": cfg.model, "hook_name": cfg.hook, "hook_module_path": module_path,
            "context_size": cfg.context_size, "prepend_bos": cfg.prepend_bos,
            "dataset_path": describe_source(cfg.dataset), "exclude_special_tokens": cfg.exclude_special_tokens,
            "sequence_separator_token": "bos", "sae_lens_training_version": None,
            "saelab_version": __version__}


def _say(message: str) -> None:
    print(f"saelab: {message}", file=sys.stderr, flush=True)
