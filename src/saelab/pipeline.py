"""What ``saelab train`` does, as one function a Python user can call: load the model, stream its
activations into the trainer, evaluate the result on held-out text, save it in the SAELens format."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from saelab import __version__
from saelab.data.activations import LMActivationSource
from saelab.data.cache import ActivationCache
from saelab.data.text import describe_source
from saelab.data.tokens import Packing
from saelab.evals.metrics import evaluate, evaluate_activations, evaluate_many
from saelab.evals.report import format_table
from saelab.models import load_model, resolve_hook
from saelab.sae import SAE
from saelab.training import TrainConfig, Trainer, plot_training_curves
from saelab.training.distributed import DataParallel, data_parallel_from_env
from saelab.training.tracking import NullTracker, start_tracking
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


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, model_and_tokenizer=None) -> RunSummary:
    """``model_and_tokenizer``: an already loaded ``(model, tokenizer)`` (e.g. a TransformerLens
    HookedTransformer and its tokenizer) used instead of loading ``cfg.model``, which then only names it."""
    run_dir = Path(cfg.out)
    if not resume and not overwrite and (run_dir / CHECKPOINT_FILE).exists():
        raise FileExistsError(f"{run_dir} already holds a run. Continue it with `saelab train --resume {run_dir}`, "
                              "start afresh with --overwrite, or choose another --out.")
    torch.manual_seed(cfg.seed)
    dp = data_parallel_from_env(cfg.device)  # torchrun's processes, or this one alone
    cfg = replace(cfg, device=dp.device) if dp.active else cfg
    tracker = start_tracking(cfg, run_dir, resume, main_process=dp.is_main)
    if cfg.activations is not None:
        return _train_from_cache(cfg, resume, dp, tracker)
    model, tokenizer = model_and_tokenizer or load_model(cfg.model, cfg.device)
    hook = resolve_hook(model, cfg.hook)
    eval_contexts = math.ceil(cfg.eval_tokens / cfg.context_size)
    holdout = eval_contexts if cfg.eval_dataset is None else 0  # held out from the training stream

    def source(dataset: str, **kwargs) -> LMActivationSource:
        return lm_source(cfg, model, tokenizer, hook, dataset, **kwargs)

    train_source = source(cfg.dataset, skip_contexts=holdout)
    trainer = Trainer(cfg, train_source, run_dir, metadata=sae_metadata(cfg, hook.module_path), data_parallel=dp,
                      tracker=tracker)
    _say(f"training a {cfg.architecture} SAE ({train_source.d_in} -> {trainer.sae.cfg.d_sae}) on {cfg.model} "
         f"{cfg.hook}, {cfg.tokens:,} tokens of {cfg.dataset}, into {run_dir}")
    result = trainer.run(resume=resume)

    def held_out_metrics(sae: SAE) -> dict:
        eval_dataset = cfg.eval_dataset or cfg.dataset
        _say(f"evaluating on {eval_contexts * cfg.context_size:,} held-out tokens of {eval_dataset}")
        held_out = source(eval_dataset, max_contexts=eval_contexts)
        return {**evaluate(model, sae, hook, held_out.token_batches(), held_out.keep_mask),
                "eval_dataset": eval_dataset}

    return _finish(cfg, result, held_out_metrics, dp, tracker)


def _finish(cfg: TrainConfig, result, held_out_metrics: Callable[[SAE], dict], dp: DataParallel | None = None,
            tracker: NullTracker | None = None) -> RunSummary:
    """The end of a run: training curves, the held-out evaluation, the SAE saved with eval.json (by rank 0
    alone under torchrun: the others leave once the checkpoint is written)."""
    run_dir = Path(cfg.out)
    dp, tracker = dp or DataParallel(), tracker or NullTracker()
    dp.barrier()
    if not dp.is_main:
        return RunSummary(run_dir, result.sae, result.completed, {})
    plot_training_curves(run_dir / METRICS_FILE, run_dir / "training_curves.png")
    if not result.completed:
        _say(f"stopped at step {result.steps}; checkpoint written. Resume: saelab train --resume {run_dir}")
        tracker.finish(completed=False)
        return RunSummary(run_dir, result.sae, False, {})

    metrics = held_out_metrics(result.sae) if cfg.eval_tokens > 0 else {}
    frequency = metrics.pop("firing_frequency", result.firing_frequency)
    result.sae.save(run_dir / "final", sparsity=torch.log10(frequency + 1e-10), runner_cfg=asdict(cfg))
    summary = {**metrics, "train_tokens": result.tokens, "train_seconds": round(result.seconds, 1)}
    (run_dir / "eval.json").write_text(json.dumps(summary, indent=2))
    tracker.log_eval({**summary, "firing_frequency": frequency})
    tracker.log_sae(run_dir / "final", metadata={**result.sae.cfg.metadata, **summary})
    tracker.finish()
    _say(format_table(metrics, "held-out evaluation:") if metrics else "evaluation skipped (--eval-tokens 0)")
    _say(f"SAE saved to {run_dir / 'final'} (SAELens format); curves in {run_dir / 'training_curves.png'}")
    return RunSummary(run_dir, result.sae, True, metrics)


def _train_from_cache(cfg: TrainConfig, resume: bool, dp: DataParallel | None = None,
                      tracker: NullTracker | None = None) -> RunSummary:
    data = CachedData(cfg)
    trainer = Trainer(data.cfg, data.train_source, data.cfg.out, metadata=data.metadata, data_parallel=dp,
                      tracker=tracker)
    _say(f"training a {data.cfg.architecture} SAE ({data.train_source.d_in} -> {trainer.sae.cfg.d_sae}) on "
         f"{data.cfg.hook} activations of {data.cfg.model} cached in {cfg.activations} (no model loaded), "
         f"{data.cfg.tokens:,} tokens, into {data.cfg.out}")
    return _finish(data.cfg, trainer.run(resume=resume), data.evaluate, dp, tracker)


class CachedData:
    """Training data from an activation cache (``cfg.activations``): the config with what the cache fixes
    taken from it, the rows to train on and the held-out evaluation. Without --eval-dataset the cache's last
    ``eval_tokens`` tokens (whole contexts) are held out and evaluated without the model; with it, the model
    is loaded for the evaluation alone (CE/KL too) and the whole cache is trained on."""

    def __init__(self, cfg: TrainConfig):
        self.cache = ActivationCache(cfg.activations)
        self.cfg = cfg = self.cache.configure(cfg)
        held_out = math.ceil(cfg.eval_tokens / cfg.context_size) if cfg.eval_dataset is None else 0
        self.eval_start = self.cache.n_contexts - held_out
        if self.eval_start <= 0:
            raise ValueError(f"activation cache {cfg.activations} holds {self.cache.n_contexts} contexts; holding out "
                             f"--eval-tokens {cfg.eval_tokens} would leave none to train on. Lower --eval-tokens, "
                             "pass --eval-dataset, or cache more tokens.")
        self.train_source = self.cache.source(cfg.hook, stop=self.eval_start)
        self.metadata = {**sae_metadata(cfg, self.cache.hook_info(cfg.hook)["module_path"]),
                         "dataset_path": self.cache.metadata["dataset_path"]}
        self._eval_model = None  # (model, hook, held-out token batches, keep mask), loaded on first use

    def evaluate(self, sae: SAE, downstream: bool = True) -> dict:
        return self.evaluate_many([sae], downstream)[0]

    def evaluate_many(self, saes: list[SAE], downstream: bool = True) -> list[dict]:
        cfg = self.cfg
        if cfg.eval_dataset is None:
            held_out = self.cache.n_contexts - self.eval_start
            _say(f"evaluating on the last {held_out * cfg.context_size:,} tokens of the cache (held out)")
            return [{**evaluate_activations(sae, self.cache.activations(cfg.hook, self.eval_start)),
                     "eval_dataset": f"{cfg.activations} (last {held_out} contexts, held out)"} for sae in saes]
        if self._eval_model is None:
            model, tokenizer = load_model(cfg.model, cfg.device)
            hook = resolve_hook(model, cfg.hook)
            held_out = lm_source(cfg, model, tokenizer, hook, cfg.eval_dataset,
                                 max_contexts=math.ceil(cfg.eval_tokens / cfg.context_size))
            self._eval_model = model, hook, list(held_out.token_batches()), held_out.keep_mask
        model, hook, batches, keep_mask = self._eval_model
        _say(f"evaluating on {sum(b.numel() for b in batches):,} tokens of {cfg.eval_dataset}")
        results = evaluate_many(model, [(sae, hook) for sae in saes], batches, keep_mask, downstream=downstream)
        return [{**metrics, "eval_dataset": cfg.eval_dataset} for metrics in results]


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
