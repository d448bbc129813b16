"""What ``saelab eval`` does: load an SAE folder and its model, evaluate it on text, write a report."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from saelab.data.text import BUILTIN_CORPORA, describe_source
from saelab.evals.loading import corpus_source, load_sae_and_model
from saelab.evals.metrics import evaluate
from saelab.evals.options import CorpusOptions, SAEOptions
from saelab.evals.report import write_report
from saelab.options import option
from saelab.sae.neuronpedia import neuronpedia_url


@dataclass
class EvalConfig(SAEOptions, CorpusOptions):
    tokens: int = option(16384, "Tokens of text to evaluate on, rounded up to whole contexts; 200_000 is accepted.",
                         positive=True)
    prepend_bos: bool | None = option(None, "Start every context with BOS (default: the SAE's metadata prepend_bos, "
                                      "else on).")
    downstream: bool = option(True, "Also measure CE/KL with the SAE spliced in (--no-downstream: reconstruction "
                              "metrics only, the model run only as far as the hook; faster).")
    out: str | None = option(None, "Report folder (default: <run>/eval-<dataset> for a run's final/ SAE, else "
                             "<SAE_FOLDER>-eval-<dataset> beside the SAE folder).", metavar="REPORT_DIR")


@dataclass
class EvalResult:
    metrics: dict                       # what evaluate() returned (tensors included)
    info: dict                          # what was evaluated, as written to the report
    report_dir: Path
    files: dict


def dataset_stem(dataset: str) -> str:
    """A short file-name-safe name for a dataset: builtin name, file stem, folder name or hub id's last part."""
    if dataset in BUILTIN_CORPORA:
        stem = dataset
    else:
        path = Path(dataset.rstrip("/\\"))
        stem = path.stem if path.suffix else path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "dataset"


def default_report_dir(sae_folder, dataset: str) -> Path:
    """Next to the SAE folder, never inside it: ``<run>/eval-<dataset>`` for a run's ``final/`` SAE,
    else ``<parent>/<sae folder name>-eval-<dataset>`` (SAEs sharing a parent folder do not collide)."""
    folder = Path(sae_folder).resolve()
    stem = dataset_stem(dataset)
    if folder.name == "final":
        return folder.parent / f"eval-{stem}"
    return folder.parent / f"{folder.name}-eval-{stem}"


def run_eval(cfg: EvalConfig, progress: bool = False, say=None) -> EvalResult:
    """Evaluate the SAE folder ``cfg.sae`` and write the report; raises ValueError & co on bad input."""
    say = say or (lambda message: None)
    loaded = load_sae_and_model(cfg.sae, cfg.model, cfg.hook, cfg.device)
    sae, model, folder = loaded.sae, loaded.model, loaded.folder
    model_name, hook_name = loaded.model_name, loaded.hook.name
    prepend_bos = cfg.prepend_bos if cfg.prepend_bos is not None else loaded.prepend_bos
    source = corpus_source(loaded, cfg, cfg.tokens, prepend_bos=prepend_bos)
    context_size, contexts = source.packing.context_size, source.max_contexts

    model_device = next(model.parameters()).device
    say(f"evaluating {folder} ({sae.cfg.architecture}, {sae.cfg.d_in} -> {sae.cfg.d_sae}) on {model_name} "
        f"{hook_name}, {contexts * context_size:,} tokens of {cfg.dataset} on {model_device}")
    seen = {"contexts": 0}

    def batches():
        for tokens in source.token_batches():
            seen["contexts"] += len(tokens)
            yield tokens

    token_batches = batches()
    if progress:
        from tqdm.auto import tqdm

        token_batches = tqdm(token_batches, total=math.ceil(contexts / cfg.batch_contexts), desc="evaluating",
                             unit="batch", leave=False)
    metrics = evaluate(model, sae, loaded.hook, token_batches, source.keep_mask, downstream=cfg.downstream)
    if seen["contexts"] == 0:
        raise ValueError(f"dataset {cfg.dataset!r} gave no complete context of {context_size} tokens; use more "
                         "text, a smaller --context-size, or check --dataset-split / --text-column")
    if seen["contexts"] < contexts:
        say(f"the dataset held only {seen['contexts']} contexts of {context_size} tokens "
            f"({seen['contexts'] * context_size:,} tokens, fewer than the {cfg.tokens:,} asked for)")

    info = {
        "sae": str(folder.resolve()), "architecture": sae.cfg.architecture, "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae, "model": model_name, "hook": hook_name, "dataset": describe_source(cfg.dataset),
        "dataset_split": None if cfg.dataset in BUILTIN_CORPORA or Path(cfg.dataset).expanduser().is_file()
        else cfg.dataset_split,
        "context_size": context_size, "prepend_bos": prepend_bos, "tokens_requested": cfg.tokens,
        "contexts": seen["contexts"],
        "special_tokens": "included" if cfg.include_special_tokens else "excluded",
        "downstream": cfg.downstream, "device": str(model_device),
        "neuronpedia": neuronpedia_url(sae.cfg.metadata["neuronpedia_id"])
        if sae.cfg.metadata.get("neuronpedia_id") else None,
    }
    report_dir = Path(cfg.out).expanduser() if cfg.out else default_report_dir(folder, cfg.dataset)
    files = write_report(report_dir, metrics, info)
    return EvalResult(metrics, info, report_dir, files)

