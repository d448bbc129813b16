"""What ``saelab train`` does with several SAEs: one run trains an SAE per combination of the listed values
(hook points, architectures, k, ...), all fed by one forward pass of the model per batch that stops after
the deepest hook. Each SAE gets an ordinary run folder under the common ``--out`` (checkpoint,
metrics.jsonl, training curves, eval.json, ``final/``); ``multi.json`` there lists them, so
``saelab train --resume OUT`` resumes them all.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields, replace
from itertools import product
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saelab.data.activations import ActivationBuffer
from saelab.evals.metrics import evaluate_many
from saelab.models import load_model, resolve_hook
from saelab.pipeline import CachedData, RunSummary, _finish, _say, lm_source, load_run_config, sae_metadata
from saelab.training import TrainConfig, Trainer
from saelab.training.config import TOPK_FAMILY
from saelab.training.distributed import DataParallel, data_parallel_from_env, round_robin
from saelab.training.multi import LIST_FIELDS, SHARED_FIELDS, MultiTrainer, SharedBuffer
from saelab.training.tracking import start_tracking
from saelab.training.trainer import CHECKPOINT_FILE

MULTI_FILE = "multi.json"


def parse_list(text: str, kind=str) -> list:
    """``"16,32"`` -> ``[16, 32]`` (``kind`` converts each item; underscores allowed in numbers)."""
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise ValueError(f"no value in {text!r}")
    try:
        return [item if kind is str else kind(item.replace("_", "")) for item in items]
    except ValueError:
        raise ValueError(f"cannot read {text!r} as comma-separated {kind.__name__} values") from None


def expand(base: TrainConfig, lists: dict[str, list]) -> list[TrainConfig]:
    """One config per combination of the listed values, each with its run folder under ``base.out``, named
    ``<hook>-<architecture>-<sparsity>`` (plus any other field that varies), e.g.
    ``blocks.6.hook_resid_post-topk-k32``."""
    unknown = set(lists) - set(LIST_FIELDS)
    if unknown:
        raise ValueError(f"{', '.join(sorted(unknown))} cannot take several values (those that can: "
                         f"{', '.join(LIST_FIELDS)})")
    names = list(lists)
    configs = []
    for values in product(*(lists[name] for name in names)):
        cfg = replace(base, **dict(zip(names, values)))
        varied = [name for name in ("expansion", "d_sae", "lr") if len(lists.get(name, ())) > 1]
        configs.append(replace(cfg, out=str(Path(base.out) / run_name(cfg, varied))))
    folders = [cfg.out for cfg in configs]
    if len(set(folders)) < len(folders):
        raise ValueError("the listed values repeat a combination: " + ", ".join(sorted(
            {Path(f).name for f in folders if folders.count(f) > 1})))
    return configs


def run_name(cfg: TrainConfig, varied=()) -> str:
    parts = [cfg.hook.replace("/", "_"), cfg.architecture]
    if cfg.architecture in TOPK_FAMILY:
        parts.append(f"k{cfg.k}")
    elif cfg.architecture == "jumprelu" and cfg.target_l0 is not None:
        parts.append(f"target_l0_{cfg.target_l0:g}")
    elif cfg.architecture in ("standard", "gated"):
        parts.append(f"l1_{cfg.l1_coefficient:g}")
    labels = {"expansion": "x{}", "d_sae": "d{}", "lr": "lr{:g}"}
    parts += [labels[name].format(getattr(cfg, name)) for name in varied]
    return "-".join(parts)


def check_shared(configs: list[TrainConfig]) -> None:
    """SAEs trained together must agree on the data and the step schedule; name the first difference."""
    if not configs:
        raise ValueError("no SAE to train")
    first = configs[0]
    for cfg in configs[1:]:
        for name in SHARED_FIELDS:
            if getattr(cfg, name) != getattr(first, name):
                raise ValueError(f"SAEs trained together must share {name} (got {getattr(first, name)!r} and "
                                 f"{getattr(cfg, name)!r}); they read one stream of batches. Train them in "
                                 "separate runs instead.")
    folders = [str(Path(cfg.out).resolve()) for cfg in configs]
    if len(set(folders)) < len(folders):
        raise ValueError("SAEs trained together need a run folder (out) each")


def train_many(configs: list[TrainConfig], resume: bool = False, overwrite: bool = False,
               root=None, data_parallel: DataParallel | None = None) -> list[RunSummary]:
    """Train every config's SAE at once, from one forward pass of the model per batch (or from one
    activation cache), then evaluate and save each in its run folder (``cfg.out``). ``root``: also write
    ``multi.json`` there, so ``saelab train --resume root`` finds the runs. Under torchrun every process
    trains every SAE on its share of each batch, or (``distribute`` saes) its own share of the SAEs."""
    check_shared(configs)
    dp = data_parallel or data_parallel_from_env(configs[0].device)
    configs = [replace(cfg, device=dp.device) for cfg in configs] if dp.active else configs
    if not resume and not overwrite:
        for cfg in configs:
            if (Path(cfg.out) / CHECKPOINT_FILE).exists():
                raise FileExistsError(f"{cfg.out} already holds a run. Continue with `saelab train --resume "
                                      f"{root or cfg.out}`, start afresh with --overwrite, or choose another --out.")
    if root is not None and dp.is_main:
        Path(root).mkdir(parents=True, exist_ok=True)
        runs = [str(Path(cfg.out).resolve().relative_to(Path(root).resolve())) for cfg in configs]
        (Path(root) / MULTI_FILE).write_text(json.dumps({"runs": runs}, indent=2))
    if dp.active and configs[0].distribute == "saes":
        return _train_share_of_saes(configs, dp, resume, overwrite)
    base = configs[0]
    torch.manual_seed(base.seed)
    group = Path(root).resolve().name if root is not None else None
    trackers = [start_tracking(cfg, cfg.out, resume, main_process=dp.is_main, group=group) for cfg in configs]
    if base.activations is not None:
        return _train_many_from_cache(configs, resume, dp, trackers)

    model, tokenizer = load_model(base.model, base.device)
    hooks = [resolve_hook(model, cfg.hook) for cfg in configs]
    eval_contexts = math.ceil(base.eval_tokens / base.context_size)
    holdout = eval_contexts if base.eval_dataset is None else 0  # held out from the training stream
    source = lm_source(base, model, tokenizer, hooks, base.dataset, skip_contexts=holdout)
    device = torch.device(base.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shared = SharedBuffer(ActivationBuffer(source, base.block_tokens, base.batch_size, base.seed,
                                           progress=base.progress, device=device))
    trainers = []
    for cfg, hook, tracker in zip(configs, hooks, trackers):
        view = shared.view(source.columns[hook.name])
        trainers.append(Trainer(cfg, view, cfg.out, metadata=sae_metadata(cfg, hook.module_path), buffer=view,
                                data_parallel=dp, tracker=tracker))
    _say(f"training {len(configs)} SAEs on {base.model} ({', '.join(h.name for h in source.hooks)}: one forward "
         f"pass per batch, stopped after the deepest), {base.tokens:,} tokens of {base.dataset} each, into "
         + ", ".join(cfg.out for cfg in configs))
    results = MultiTrainer(trainers, progress=base.progress and dp.is_main).run(resume=resume)

    metrics = _held_out_metrics(base, model, tokenizer, hooks, results) if dp.is_main else {}
    return [_finish(cfg, result, lambda sae, i=i: metrics[i], dp, tracker)
            for i, (cfg, result, tracker) in enumerate(zip(configs, results, trackers))]


def _held_out_metrics(base: TrainConfig, model, tokenizer, hooks: list, results: list) -> dict[int, dict]:
    """Every finished SAE evaluated on the held-out text together: the model's clean pass runs once per
    batch for all of them (evaluate_many), not once per SAE."""
    finished = [i for i, result in enumerate(results) if result.completed]
    if base.eval_tokens <= 0 or not finished:
        return {}
    eval_contexts = math.ceil(base.eval_tokens / base.context_size)
    eval_dataset = base.eval_dataset or base.dataset
    held_out = lm_source(base, model, tokenizer, hooks[0], eval_dataset, max_contexts=eval_contexts)
    _say(f"evaluating {len(finished)} SAEs on {eval_contexts * base.context_size:,} held-out tokens of {eval_dataset}")
    batches = tqdm(held_out.token_batches(), total=math.ceil(eval_contexts / base.lm_batch_size), unit="batch",
                   desc=f"evaluating {len(finished)} SAEs", leave=False, disable=not base.progress)
    evaluated = evaluate_many(model, [(results[i].sae, hooks[i]) for i in finished], batches, held_out.keep_mask)
    return {i: {**metrics, "eval_dataset": eval_dataset} for i, metrics in zip(finished, evaluated)}


def _train_share_of_saes(configs: list[TrainConfig], dp: DataParallel, resume: bool,
                         overwrite: bool) -> list[RunSummary]:
    """``distribute`` saes under torchrun: rank r trains every world_size-th SAE from the r-th on, on whole
    batches, exactly as one process training just those would (its own model forward, to its own deepest
    hook; each SAE's run folder written by the rank that trains it)."""
    mine = round_robin(configs, dp.rank, dp.world_size)
    _say(f"rank {dp.rank} of {dp.world_size}: training " + (", ".join(cfg.out for cfg in mine) or "no SAE "
         f"({len(configs)} SAEs for {dp.world_size} processes)"))
    summaries = train_many(mine, resume, overwrite, data_parallel=DataParallel(device=dp.device)) if mine else []
    dp.barrier()  # every SAE finished before any process leaves
    return summaries


def _train_many_from_cache(configs: list[TrainConfig], resume: bool, dp: DataParallel,
                           trackers: list) -> list[RunSummary]:
    """From an activation cache no forward pass is shared: each SAE reads its hook's rows from disk."""
    data = [CachedData(cfg) for cfg in configs]
    trainers = [Trainer(d.cfg, d.train_source, d.cfg.out, metadata=d.metadata, data_parallel=dp, tracker=tracker)
                for d, tracker in zip(data, trackers)]
    _say(f"training {len(configs)} SAEs on activations cached in {configs[0].activations} (no model loaded), into "
         + ", ".join(cfg.out for cfg in configs))
    results = MultiTrainer(trainers, progress=configs[0].progress and dp.is_main).run(resume=resume)
    return [_finish(d.cfg, result, d.evaluate, dp, tracker) for d, result, tracker in zip(data, results, trackers)]


def is_multi_run(folder) -> bool:
    """Whether ``folder`` holds several SAEs trained together (its multi.json lists their run folders)."""
    return (Path(folder) / MULTI_FILE).exists()


def resume_configs(root, **overrides) -> list[TrainConfig]:
    """The configs of a multi-SAE run's SAEs, from their checkpoints (``overrides`` applied to each)."""
    runs = json.loads((Path(root) / MULTI_FILE).read_text())["runs"]
    allowed = {f.name for f in fields(TrainConfig)} - set(LIST_FIELDS) - {"out"}
    bad = set(overrides) - allowed
    if bad:
        raise ValueError(f"cannot change {', '.join(sorted(bad))} when resuming several SAEs")
    return [replace(load_run_config(Path(root) / run), out=str(Path(root) / run), **overrides) for run in runs]

