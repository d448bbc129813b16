"""What ``saelab eval`` does: load an SAE folder and its model, evaluate it on text, write a report."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from saelab.data.text import BUILTIN_CORPORA, describe_source
from saelab.data.synthetic import SyntheticConfig, SyntheticFeatures
from saelab.evals.absorption import DEFAULT_WORDS as ABSORPTION_WORDS, absorption_metrics, letter_probes, spelling_set
from saelab.evals.geometry import geometry_metrics
from saelab.evals.ground_truth import ground_truth_metrics
from saelab.evals.loading import corpus_source, find_sae_folder, load_sae_and_model, run_folder
from saelab.evals.metrics import evaluate
from saelab.evals.options import CorpusOptions, SAEOptions
from saelab.evals.probing import BUILTIN_TASKS, DEFAULT_EXAMPLES as PROBE_EXAMPLES, RANKINGS, probing_metrics
from saelab.evals.report import write_report
from saelab.models.hooks import capture
from saelab.options import option
from saelab.sae import load_sae
from saelab.sae.format import read_sae_config
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
    suite: str = option("core", lambda: "Evaluations to run, comma-separated: " + "; ".join(
        f"{name} = {meaning}" for name, meaning in SUITES.items()) + ".")
    synthetic: str | None = option(None, "synthetic suite: the synthetic-data config to score against (default: "
                                   "the one the SAE's metadata records, for an SAE trained with --synthetic).")
    probe_tasks: str = option(",".join(BUILTIN_TASKS), lambda: "probing suite: built-in tasks, comma-separated (none: only "
                              "--probe-dataset): " + "; ".join(f"{name} = {what}" for name, what in
                                                                BUILTIN_TASKS.items()) + ".")
    probe_dataset: str | None = option(None, "probing suite: also a labelled dataset (.jsonl/.parquet file, saved "
                                       "dataset or hub id) with a text column (--text-column) and --probe-label-"
                                       "column; each label is probed against the rest.")
    probe_label_column: str = option("label", "probing suite: the label column of --probe-dataset.")
    probe_examples: int = option(PROBE_EXAMPLES, "probing suite: examples per task (half of each class for the built-in "
                                 "ones), 80% to fit the probes, 20% to test them.", positive=True)
    probe_ranking: str = option("difference", lambda: "probing suite: how the top-k latents are chosen: " + "; ".join(
        f"{name} = {what}" for name, what in RANKINGS.items()) + ".", choices=tuple(RANKINGS))
    absorption_words: int = option(ABSORPTION_WORDS, "absorption suite: words drawn from the model's vocabulary (one prompt "
                                   "each, 80% to fit the probes, 20% on which absorption is measured); more words "
                                   "score rare letters too, at ~90 tokens of model time each.", positive=True)
    seed: int = option(0, "Seed of the probing and absorption suites' draws (train/test splits, balanced "
                       "examples, which words and which solved examples precede them).")

    def __post_init__(self):
        unknown = [name for name in self.suites if name not in SUITES]
        if unknown:
            raise ValueError(f"--suite: unknown suite {', '.join(unknown)}; choose from {', '.join(SUITES)}")
        unknown = [name for name in self.probe_task_names if name not in BUILTIN_TASKS]
        if unknown:
            raise ValueError(f"--probe-tasks: unknown task {', '.join(unknown)}; choose from "
                             f"{', '.join(BUILTIN_TASKS)} (or none, with --probe-dataset)")

    @property
    def probe_task_names(self) -> list[str]:
        return [name.strip() for name in self.probe_tasks.split(",") if name.strip() and name.strip() != "none"]

    @property
    def suites(self) -> list[str]:
        return list(dict.fromkeys(name.strip() for name in self.suite.split(",") if name.strip())) or ["core"]


# What each suite measures (the --suite help). The core metrics are always measured: they come from the pass
# over the text (or the synthetic samples) that the others read too.
SUITES = {
    "core": "reconstruction (L0, FVU, cosine), CE/KL with the SAE spliced in, dead and dense latents",
    "geometry": "decoder-row cosines (near-duplicates), encoder/decoder alignment, firing-frequency buckets, "
                "latents that fire on one token id only",
    "absorption": "feature absorption on first-letter spelling (SAEBench's): letter probes on vocabulary words, "
                  "each letter's main latents by k-sparse probing, how often another latent takes the letter's "
                  "direction (absorption fraction, full absorption rate) and feature splitting",
    "probing": "sparse probing: logistic-regression probes on the top 1-20 latents (by class-mean difference) "
               "against a probe on the full activation, on built-in tasks and --probe-dataset",
    "synthetic": "for an SAE trained on synthetic data: MCC, F1, uniqueness and shrinkage against the true "
                 "features (no model or text needed)",
}


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
    run, folder, stem = run_folder(sae_folder), Path(sae_folder).resolve(), dataset_stem(dataset)
    return run / f"eval-{stem}" if run else folder.parent / f"{folder.name}-eval-{stem}"


def run_eval(cfg: EvalConfig, progress: bool = False, say=None) -> EvalResult:
    """Evaluate the SAE folder ``cfg.sae`` and write the report; raises ValueError & co on bad input."""
    say = say or (lambda message: None)
    folder = find_sae_folder(cfg.sae)
    trained_on = read_sae_config(folder).metadata.get("synthetic_config")
    if "synthetic" in cfg.suites or trained_on is not None:
        return _run_synthetic_eval(cfg, folder, trained_on, say)
    if "absorption" in cfg.suites and read_sae_config(folder).separate_output:
        raise ValueError(f"--suite absorption is for SAEs: it compares decoder rows with probes of the hook the "
                         f"dictionary reads, and a {read_sae_config(folder).kind}'s decoder writes another hook; "
                         "leave absorption out of --suite")
    crosscoder = read_sae_config(folder).n_hooks > 1
    if crosscoder and set(cfg.suites) - {"core"}:
        raise ValueError(f"{folder} is a crosscoder: `saelab eval` gives it the core suite (FVU and CE/KL with all "
                         "its hooks replaced and each in turn); leave the other suites out of --suite")
    loaded = load_sae_and_model(cfg.sae, cfg.model, cfg.hook, cfg.device)
    sae, model, folder = loaded.sae, loaded.model, loaded.folder
    model_name = loaded.model_name
    hook_name = "+".join(h.name for h in loaded.hooks) if loaded.hooks else loaded.hook.name
    prepend_bos = cfg.prepend_bos if cfg.prepend_bos is not None else loaded.prepend_bos
    source = corpus_source(loaded, cfg, cfg.tokens, prepend_bos=prepend_bos)
    context_size, contexts = source.packing.context_size, source.max_contexts

    model_device = next(model.parameters()).device
    hook_out = sae.cfg.metadata.get("hook_name_out") if sae.cfg.separate_output else None
    say(f"evaluating {folder} ({sae.cfg.describe()}) on {model_name} {hook_name}"
        f"{f' -> {hook_out}' if hook_out else ''}, {contexts * context_size:,} tokens of {cfg.dataset} on {model_device}")
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
    metrics = evaluate(model, sae, hook_name if loaded.hooks else loaded.hook, token_batches, source.keep_mask,
                       downstream=cfg.downstream)
    if seen["contexts"] == 0:
        raise ValueError(f"dataset {cfg.dataset!r} gave no complete context of {context_size} tokens; use more "
                         "text, a smaller --context-size, or check --dataset-split / --text-column")
    if seen["contexts"] < contexts:
        say(f"the dataset held only {seen['contexts']} contexts of {context_size} tokens "
            f"({seen['contexts'] * context_size:,} tokens, fewer than the {cfg.tokens:,} asked for)")

    info = {
        "sae": str(folder.resolve()), "architecture": sae.cfg.architecture, "kind": sae.cfg.kind,
        "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, **({"d_out": sae.cfg.output_size, "hook_out": hook_out}
                                                         if hook_out else {}),
        "model": model_name, "hook": hook_name, "dataset": describe_source(cfg.dataset),
        "dataset_split": None if cfg.dataset in BUILTIN_CORPORA or Path(cfg.dataset).expanduser().is_file()
        else cfg.dataset_split,
        "context_size": context_size, "prepend_bos": prepend_bos, "tokens_requested": cfg.tokens,
        "contexts": seen["contexts"],
        "special_tokens": "included" if cfg.include_special_tokens else "excluded",
        "downstream": cfg.downstream, "device": str(model_device),
        "neuronpedia": neuronpedia_url(sae.cfg.metadata["neuronpedia_id"])
        if sae.cfg.metadata.get("neuronpedia_id") else None,
    }
    if "geometry" in cfg.suites:
        say("geometry: decoder cosines, and which latents fire on one token id (a second pass to the hook)")
        metrics["geometry"] = geometry_metrics(sae, metrics["firing_frequency"], _hook_rows(loaded, source))
    if "probing" in cfg.suites:
        metrics["probing"] = probing_metrics(
            loaded.model, loaded.tokenizer, loaded.hook, [sae], cfg.probe_task_names, cfg.probe_examples,
            cfg.probe_dataset, cfg.dataset_split, cfg.text_column, cfg.probe_label_column, prepend_bos, say,
            cfg.seed, cfg.probe_ranking)[0]
    if "absorption" in cfg.suites:
        say(f"absorption: first-letter prompts for {cfg.absorption_words:,} vocabulary words, letter probes, "
            "k-sparse probes on the latents")
        spelling = spelling_set(model, loaded.tokenizer, loaded.hook, cfg.absorption_words, cfg.seed,
                                prepend_bos=prepend_bos, progress=progress)
        metrics["absorption"] = absorption_metrics(sae, spelling, letter_probes(spelling))
    report_dir = Path(cfg.out).expanduser() if cfg.out else default_report_dir(folder, cfg.dataset)
    files = write_report(report_dir, metrics, info)
    return EvalResult(metrics, info, report_dir, files)


def _hook_rows(loaded, source):
    """``(activations, token ids)`` at the SAE's hook over the corpus, kept positions only."""
    device = next(loaded.model.parameters()).device
    for tokens in source.token_batches():
        acts = capture(loaded.model, tokens.to(device), [loaded.hook])[loaded.hook.name]
        keep = source.keep_mask(tokens)
        yield acts[keep.to(acts.device)].float().cpu(), tokens[keep]


def _run_synthetic_eval(cfg: EvalConfig, folder: Path, trained_on: dict | None, say) -> EvalResult:
    """An SAE scored on synthetic data: its evaluation samples take the place of text (no model loaded)."""
    sae = load_sae(folder)
    if cfg.synthetic is not None:
        synthetic, described = SyntheticConfig.load(cfg.synthetic), cfg.synthetic
    elif trained_on is not None:
        synthetic, described = SyntheticConfig(**trained_on), "the synthetic data it was trained on (its metadata)"
    else:
        raise ValueError(f"{folder} was not trained on synthetic data: give the config to score it against with "
                         "--synthetic CONFIG.json, or leave out --suite synthetic")
    if synthetic.d_in != sae.cfg.d_in:
        raise ValueError(f"--synthetic {cfg.synthetic}: its samples have d_in {synthetic.d_in}, the SAE reads "
                         f"{sae.cfg.d_in}")
    say(f"evaluating {folder} ({sae.cfg.describe()}) against the true features "
        f"of {described}, {cfg.tokens:,} evaluation samples")
    metrics = ground_truth_metrics(sae, SyntheticFeatures(synthetic), cfg.tokens)
    if "geometry" in cfg.suites:
        metrics["geometry"] = geometry_metrics(sae, metrics["firing_frequency"])
    info = {"sae": str(folder.resolve()), "architecture": sae.cfg.architecture, "d_in": sae.cfg.d_in,
            "d_sae": sae.cfg.d_sae, "model": "synthetic", "hook": sae.cfg.metadata.get("hook_name", "synthetic"),
            "dataset": described, "synthetic_config": asdict(synthetic), "tokens_requested": cfg.tokens}
    report_dir = Path(cfg.out).expanduser() if cfg.out else default_report_dir(folder, "synthetic")
    files = write_report(report_dir, metrics, info)
    return EvalResult(metrics, info, report_dir, files)

