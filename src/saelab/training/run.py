"""The one way to train: ``train(configs)`` trains a list of dictionaries that share one data source (one
dictionary is a list of one), evaluates them together on held-out data and saves each in its run folder.

``saelab train`` (one SAE or comma lists), ``saelab sweep``, ``saelab.train(...)``, the SAELens-style runner
and torchrun all come here. The dictionaries read one shuffled stream of activations (one forward pass of
the model per batch, stopped after the deepest hook, or one read of a cache), step in lockstep, and each
gets an ordinary run folder: checkpoint, metrics.jsonl, training curves, eval.json and ``final/`` in the
SAELens format. With several dictionaries, ``multi.json`` in the common folder lists their runs, so
``saelab train --resume`` resumes them all.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from saelab.data.sources import TrainingData
from saelab.evals.held_out import evaluate_held_out
from saelab.evals.report import format_table
from saelab.distributed import DataParallel, data_parallel_from_env, round_robin
from saelab.files import folder_lock, read_json, write_json
from saelab.log import say
from saelab.models.hooks import split_hook_list
from saelab.sae import SAE
from saelab.storage import RemoteFolder, is_url, join
from saelab.training.config import TrainConfig, check_shared, list_fields, sparsity_label
from saelab.training.lockstep import MultiTrainer, SharedBuffer
from saelab.training.plots import plot_training_curves
from saelab.training.tracking import NullTracker, start_tracking
from saelab.training.trainer import (CHECKPOINT_FILE, METRICS_FILE, PREVIOUS_CHECKPOINT_FILE, Trainer, TrainResult,
                                    checkpoint_steps, has_checkpoint, read_checkpoint, training_buffer)

MULTI_FILE = "multi.json"


@dataclass
class RunSummary:
    run_dir: Path
    sae: SAE
    completed: bool
    metrics: dict           # held-out evaluation (empty when skipped, deferred or stopped early)
    training: dict          # train_tokens, train_seconds, dead_fraction


def train(configs: TrainConfig | list[TrainConfig], resume: bool = False, overwrite: bool = False, root=None,
          model_and_tokenizer=None, data: TrainingData | None = None, evaluate: bool = True,
          data_parallel: DataParallel | None = None) -> list[RunSummary]:
    """Train every config's dictionary at once and save each in its run folder (``cfg.out``).

    ``root``: also write ``multi.json`` there, so ``saelab train --resume root`` finds the runs.
    ``model_and_tokenizer``: an already loaded ``(model, tokenizer)`` (e.g. a TransformerLens HookedTransformer)
    instead of loading ``cfg.model``, which then only names it. ``data``: the training data, when the caller
    built it (a sweep holds activations in memory). ``evaluate=False``: save the dictionaries without the
    held-out evaluation (a sweep evaluates all its grid points together). Under torchrun every process trains
    every dictionary on its share of each batch, or (``distribute`` saes) its own share of the dictionaries.
    """
    configs = [configs] if isinstance(configs, TrainConfig) else list(configs)
    check_shared(configs)
    dp = data_parallel or data_parallel_from_env(configs[0].device)
    configs = [replace(cfg, device=dp.device) for cfg in configs] if dp.active else configs
    spread = dp.active and configs[0].distribute == "saes"  # each rank then locks the folders it trains
    configs, root, folders = _staged(configs, root, resume, overwrite)
    with ExitStack() as held:
        for cfg in configs if dp.is_main and not spread else []:
            held.enter_context(folder_lock(cfg.out, "training run"))
        summaries = _train(configs, dp, spread, resume, overwrite, root, model_and_tokenizer, data, evaluate, folders)
    if dp.is_main or spread:
        for folder in dict.fromkeys(folders.values()):
            folder.push_all()
            say(f"uploaded to {folder.url}")
    return summaries


def _staged(configs: list[TrainConfig], root, resume: bool, overwrite: bool):
    """Run folders at URLs (``s3://bucket/runs/x``, storage.py) are trained in local staging copies and
    uploaded as they are written: the configs pointed at those copies, the root likewise, and the
    RemoteFolder each staged run folder (and the root) uploads to. Resuming pulls the URL's run first."""
    root_folder = RemoteFolder(root) if root is not None and is_url(root) else None
    folders: dict[str, RemoteFolder] = {str(root_folder.local): root_folder} if root_folder else {}
    staged = []
    for cfg in configs:
        if not is_url(cfg.out):
            staged.append(cfg)
            continue
        if root_folder is not None and cfg.out.startswith(root_folder.url + "/"):
            folder, run = root_folder, cfg.out[len(root_folder.url) + 1:]
        else:
            folder, run = RemoteFolder(cfg.out), ""
        if not resume and not overwrite and any(folder.exists(join(run, name) if run else name)
                                                for name in (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE)):
            raise FileExistsError(f"{cfg.out} already holds a run. Continue it with `saelab train --resume "
                                  f"{root or cfg.out}`, start afresh with --overwrite, or choose another --out.")
        local = folder.local / run
        folders[str(local)] = folder
        staged.append(replace(cfg, out=str(local)))
    for folder in dict.fromkeys(folders.values()):
        folder.pull(skip=("final",)) if resume else folder.clear_staging()
    return staged, (str(root_folder.local) if root_folder else root), folders


def _train(configs: list[TrainConfig], dp: DataParallel, spread: bool, resume: bool, overwrite: bool, root,
           model_and_tokenizer, data: TrainingData | None, evaluate: bool,
           folders: dict[str, RemoteFolder]) -> list[RunSummary]:
    if not resume and not overwrite:
        for cfg in configs:
            if has_checkpoint(cfg.out):
                raise FileExistsError(f"{cfg.out} already holds a run. Continue it with `saelab train --resume "
                                      f"{root or cfg.out}`, start afresh with --overwrite, or choose another --out.")
    if root is not None and dp.is_main:
        Path(root).mkdir(parents=True, exist_ok=True)
        runs = [str(Path(cfg.out).resolve().relative_to(Path(root).resolve())) for cfg in configs]
        write_json(Path(root) / MULTI_FILE, {"runs": runs, "configs": [cfg.as_dict() for cfg in configs]})
        if str(root) in folders:
            folders[str(root)].push([Path(root) / MULTI_FILE])
    if spread:
        return _train_share_of_saes(configs, dp, resume, overwrite, evaluate)
    base = configs[0]
    torch.manual_seed(base.seed)
    group = Path(root).resolve().name if root is not None else None
    trackers = [start_tracking(cfg, cfg.out, resume, main_process=dp.is_main, group=group) for cfg in configs]
    data = data or TrainingData(base, [hook for cfg in configs for hook in cfg.hooks], model_and_tokenizer)
    configs = [data.fixed(cfg) for cfg in configs]  # what a cache fixes, from the cache
    device = torch.device(base.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shared = SharedBuffer(training_buffer(data.source, base, dp, device))
    trainers = []
    for cfg, tracker in zip(configs, trackers):
        whole = slice(0, data.source.d_in)
        read, written = split_hook_list(cfg.hook), cfg.target_hook and split_hook_list(cfg.target_hook)
        view = shared.view([data.columns.get(hook, whole) for hook in read],
                           [data.columns.get(hook, whole) for hook in written] if written else None)
        trainers.append(Trainer(cfg, view, cfg.out, metadata=data.metadata(read, cfg.target_hook), buffer=view,
                                data_parallel=dp, tracker=tracker))
        if cfg.out in folders:
            trainers[-1].on_checkpoint = _uploader(folders[cfg.out])
    say(_what_trains(configs, trainers, data))
    if resume:
        resume = _resume_at_a_common_step(trainers)
    results = MultiTrainer(trainers, progress=base.progress and dp.is_main).run(resume=resume)
    how = "read from the cache" if data.cache is not None else "generated" if data.synthetic is not None else \
        "run through the model"
    say((f"rank {dp.rank} of {dp.world_size}: " if dp.active else "") + f"{shared.buffer.units_read:,} forward "
        f"batches {how}")

    dp.barrier()
    if not dp.is_main:  # the others leave once the checkpoints are written; rank 0 evaluates and saves
        return [RunSummary(Path(cfg.out), r.sae, r.completed, {}, _training(r)) for cfg, r in zip(configs, results)]
    finished = [i for i, r in enumerate(results) if r.completed]
    held_out = data.held_out() if evaluate and finished else None
    evaluated = {}
    if held_out is not None:
        say(f"evaluating {len(finished)} SAE{'s' if len(finished) > 1 else ''} on {held_out.tokens:,} held-out "
            f"tokens of {held_out.description}")
        metrics = evaluate_held_out(held_out, [(results[i].sae, configs[i].hook) for i in finished],
                                    progress=base.progress)
        evaluated = dict(zip(finished, metrics))
    return [_finish(cfg, result, evaluated.get(i), tracker, evaluate)
            for i, (cfg, result, tracker) in enumerate(zip(configs, results, trackers))]


def _uploader(folder: RemoteFolder):
    """What a trainer calls after each checkpoint of a run folder at a URL: the checkpoint there becomes the
    previous one (renamed by the store, not uploaded again), then the new checkpoint and the log go up."""
    def upload(run_dir: Path) -> None:
        run = run_dir.relative_to(folder.local).as_posix()
        names = [join(run, name) if run != "." else name for name in (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE)]
        folder.move(*names)
        folder.push([run_dir / CHECKPOINT_FILE, run_dir / METRICS_FILE])
    return upload


def _resume_at_a_common_step(trainers: list[Trainer]) -> bool:
    """Point every trainer at the newest checkpoint step all of them have (a kill while they were writing
    their checkpoints one after another leaves them a checkpoint apart); False when one has none at all (the
    run was stopped before its first checkpoint): then all start afresh."""
    common = set.intersection(*(set(checkpoint_steps(trainer.run_dir)) for trainer in trainers))
    if not common:
        say("no checkpoint that every SAE of the run has: starting them afresh")
        return False
    for trainer in trainers:
        trainer.resume_step = max(common)
    return True


def _what_trains(configs: list[TrainConfig], trainers: list[Trainer], data: TrainingData) -> str:
    saes = ", ".join(f"{sparsity_label(cfg)}{' ' + cfg.kind if cfg.target_hook else ''} ({trainer.sae.cfg.shape})"
                     for cfg, trainer in zip(configs, trainers))
    hooks = ", ".join(dict.fromkeys(" -> ".join(cfg.hooks) for cfg in configs))
    return (f"training {saes} on {hooks}, {configs[0].tokens:,} tokens of {data.described}"
            f"{' each' if len(configs) > 1 else ''}, into " + ", ".join(cfg.out for cfg in configs))


def _training(result: TrainResult) -> dict:
    return {"train_tokens": result.tokens, "train_seconds": round(result.seconds, 1),
            "dead_fraction": result.dead_fraction}


def _finish(cfg: TrainConfig, result: TrainResult, metrics: dict | None, tracker: NullTracker,
            evaluate: bool) -> RunSummary:
    """The end of one run: training curves, then the SAE saved with its evaluation (when there is one)."""
    run_dir = Path(cfg.out)
    plot_training_curves(run_dir / METRICS_FILE, run_dir / "training_curves.png")
    training = _training(result)
    if not result.completed:
        say(f"stopped at step {result.steps}; checkpoint written. Resume: saelab train --resume {run_dir}")
        tracker.finish(completed=False)
        return RunSummary(run_dir, result.sae, False, {}, training)
    if not evaluate:
        result.sae.save(run_dir / "final", sparsity=torch.log10(result.firing_frequency + 1e-10),
                        runner_cfg=cfg.as_dict())
        tracker.finish()
        return RunSummary(run_dir, result.sae, True, {}, training)
    metrics = metrics or {}
    summary = save_evaluated(cfg, result.sae, metrics, training, result.firing_frequency)
    tracker.log_eval({**summary, "firing_frequency": metrics.get("firing_frequency", result.firing_frequency)})
    tracker.log_sae(run_dir / "final", metadata={**result.sae.cfg.metadata, **summary})
    tracker.finish()
    say(format_table(metrics, "held-out evaluation:") if metrics else "evaluation skipped (--eval-tokens 0)")
    say(f"SAE saved to {run_dir / 'final'} (SAELens format); curves in {run_dir / 'training_curves.png'}")
    return RunSummary(run_dir, result.sae, True, metrics, training)


def save_evaluated(cfg: TrainConfig, sae: SAE, metrics: dict, training: dict,
                   training_frequency: torch.Tensor | None = None) -> dict:
    """Write a run's ``final/`` SAE (its sparsity from the held-out firing frequencies, else from training's)
    and ``eval.json`` (the scalar metrics and the training figures); returns what eval.json holds."""
    run_dir = Path(cfg.out)
    metrics = dict(metrics)
    frequency = metrics.pop("firing_frequency", training_frequency)
    if frequency is not None:
        sae.save(run_dir / "final", sparsity=torch.log10(frequency + 1e-10), runner_cfg=cfg.as_dict())
    summary = {**metrics, "train_tokens": training["train_tokens"], "train_seconds": training["train_seconds"]}
    write_json(run_dir / "eval.json", summary)
    return summary


def _train_share_of_saes(configs: list[TrainConfig], dp: DataParallel, resume: bool, overwrite: bool,
                         evaluate: bool) -> list[RunSummary]:
    """``distribute`` saes under torchrun: rank r trains every world_size-th SAE from the r-th on, on whole
    batches, exactly as one process training just those would (its own model forward, to its own deepest
    hook; each SAE's run folder written by the rank that trains it)."""
    mine = round_robin(configs, dp.rank, dp.world_size)
    say(f"rank {dp.rank} of {dp.world_size}: training " + (", ".join(cfg.out for cfg in mine) or "no SAE "
        f"({len(configs)} SAEs for {dp.world_size} processes)"))
    summaries = train(mine, resume, overwrite, evaluate=evaluate, data_parallel=DataParallel(device=dp.device)) \
        if mine else []
    dp.barrier()  # every SAE finished before any process leaves
    return summaries


def load_run_config(run_dir) -> TrainConfig:
    """The config a run was started with, read from its newest checkpoint."""
    available = checkpoint_steps(run_dir)
    path = available[max(available)] if available else Path(run_dir) / CHECKPOINT_FILE
    if not available:
        raise FileNotFoundError(f"{path} does not exist: nothing to resume in {run_dir} (a run stopped before its "
                                "first checkpoint starts again: run its command again, without --resume)")
    return TrainConfig(**read_checkpoint(path)["config"])


def is_multi_run(folder) -> bool:
    """Whether ``folder`` holds several SAEs trained together (its multi.json lists their run folders)."""
    return (Path(folder) / MULTI_FILE).exists()


def resume_configs(root, **overrides) -> list[TrainConfig]:
    """The configs of a run's dictionaries, from their checkpoints (``overrides`` applied to each): the runs
    ``multi.json`` lists, or the run in ``root`` itself. ``root`` may be a URL (its files are fetched into
    the staging copy that ``train`` then resumes from; the configs keep the URL as their ``out``)."""
    if is_url(root):
        local = RemoteFolder(root).pull(skip=("final",))
        return [replace(cfg, out=join(str(root), Path(cfg.out).relative_to(local).as_posix())
                        if Path(cfg.out) != local else str(root)) for cfg in resume_configs(local, **overrides)]
    if not is_multi_run(root):
        return [replace(load_run_config(root), out=str(Path(root)), **overrides)]
    listed = read_json(Path(root) / MULTI_FILE, "It lists the runs trained together: resume each run folder on "
                       "its own (`saelab train --resume ROOT/RUN`).")
    runs = listed["runs"]
    allowed = {f.name for f in fields(TrainConfig)} - set(list_fields()) - {"out"}
    bad = set(overrides) - allowed
    if bad:
        raise ValueError(f"cannot change {', '.join(sorted(bad))} when resuming several SAEs")
    # The configs as the run started (written before any checkpoint, so a run killed before its first one
    # resumes too); older multi.json files hold only the run names: then from the checkpoints.
    started = [TrainConfig(**config) for config in listed["configs"]] if "configs" in listed else \
        [load_run_config(Path(root) / run) for run in runs]
    return [replace(cfg, out=str(Path(root) / run), **overrides) for cfg, run in zip(started, runs)]
