"""Feature data in the shape Neuronpedia imports (SAEDashboard's ``batch-N.json`` files).

Each ``batch-N.json`` holds ``{"model_id", "layer", "sae_set", "features": [...], "settings"}``; each feature
its index, the tokens its decoder direction promotes and suppresses (``pos_str``/``pos_values``,
``neg_str``/``neg_values``), a histogram of its logit effects over the vocabulary, its firing frequency
(``frac_nonzero``) and its top-activating examples (``activations``: per example the window's tokens and the
feature's activation on each). Features that never fired are listed in ``skipped_indexes.json`` instead,
as SAEDashboard does; ``run_settings.json`` records what was run; the explanations of ``saelab explain``, when
the SAE has some, go into ``explanations.json`` as Neuronpedia's explanation records. Built on ``TopExamplesCollector``
(examples, frequency) and the logit effects of ``saelab.analysis.logits`` (promoted and suppressed tokens),
computed for a batch of features at once.
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, dataclass
from pathlib import Path

import torch

from saelab.evals.options import CorpusOptions
from saelab.options import check_fields, option
from saelab.version import __version__
from saelab.analysis.loading import Loaded, token_strings
from saelab.analysis.logits import LogitEffects, logit_effect_rows, top_logit_effects
from saelab.analysis.top_examples import FeatureSummary, TopExamplesCollector

LOGIT_HISTOGRAM_BINS = 40


@dataclass(kw_only=True)
class ExportConfig(CorpusOptions):
    out: str = option(MISSING, "Folder for the batch-N.json files.", metavar="DIR")
    tokens: int = option(65536, "Tokens of text to read.", positive=True)
    n_top: int = option(20, "Top examples per feature.", positive=True)
    window: int = option(16, "Tokens shown each side of an example's maximum.")
    logit_tokens: int = option(10, "Promoted and suppressed tokens per feature.", positive=True)
    features_per_batch: int = option(128, "Features per batch-N.json.", positive=True)
    model_id: str | None = option(None, "Neuronpedia model id (default: from neuronpedia_id, else the model name).")
    layer: int | None = option(None, "Neuronpedia layer (default: from neuronpedia_id, else the hook's block).")
    sae_set: str | None = option(None, "Neuronpedia SAE set, e.g. res-jb (default: from neuronpedia_id, else "
                                 "<hook kind>-saelab).")

    def __post_init__(self):
        problems = check_fields(self)
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class NeuronpediaSource:
    """Where the SAE sits on Neuronpedia: ``<model_id>/<layer>-<sae_set>``."""

    model_id: str
    layer: int
    sae_set: str

    @property
    def neuronpedia_id(self) -> str:
        return f"{self.model_id}/{self.layer}-{self.sae_set}"


def neuronpedia_source(metadata: dict, model_id: str | None = None, layer: int | None = None,
                       sae_set: str | None = None) -> NeuronpediaSource:
    """Model id, layer and SAE set from the arguments, else the SAE's ``neuronpedia_id``, else its model and hook
    names (model id: the model name's last part; layer: the hook's block; set: ``<hook kind>-saelab``)."""
    known = re.fullmatch(r"([^/]+)/(\d+)-(.+)", metadata.get("neuronpedia_id") or "")
    hook = metadata.get("hook_name") or ""
    block = re.match(r"blocks\.(\d+)\.", hook)
    model_id = model_id or (known.group(1) if known else Path(str(metadata.get("model_name") or "model")).name)
    layer = layer if layer is not None else int(known.group(2)) if known else int(block.group(1)) if block else 0
    sae_set = sae_set or (known.group(3) if known else f"{_hook_kind(hook)}-saelab")
    return NeuronpediaSource(model_id, layer, sae_set)


def _hook_kind(hook: str) -> str:
    """Neuronpedia's short name for a hook's kind: res, mlp, att (sae when unknown)."""
    for part, kind in (("resid", "res"), ("mlp", "mlp"), ("attn", "att")):
        if f"hook_{part}" in hook:
            return kind
    return "sae"


def export_neuronpedia(loaded: Loaded, collector: TopExamplesCollector, out, source: NeuronpediaSource,
                       features_per_batch: int = 128, logit_tokens: int = 10, settings: dict | None = None
                       ) -> list[Path]:
    """Write ``batch-N.json`` (``features_per_batch`` live features each, in index order),
    ``skipped_indexes.json`` and ``run_settings.json`` into ``out``; returns the batch files."""
    if features_per_batch <= 0 or logit_tokens <= 0:
        raise ValueError(f"features_per_batch and logit_tokens must be positive (got {features_per_batch}, "
                         f"{logit_tokens})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    live = [f for f in range(collector.d_sae) if int(collector.count[f]) > 0]
    dead = [f for f in range(collector.d_sae) if int(collector.count[f]) == 0]
    common = {"n_tokens_total": collector.tokens_seen, "n_prompts_total": collector.contexts_seen,
              **(settings or {})}
    written = []
    text = TokenText(loaded.tokenizer)
    for number, start in enumerate(range(0, len(live), features_per_batch)):
        features = batch_features(loaded, collector, live[start:start + features_per_batch], text, logit_tokens,
                                  common)
        batch = {"model_id": source.model_id, "layer": source.layer, "sae_set": source.sae_set,
                 "features": features, "settings": {"n_batches_to_sample_from": 0, "n_prompt_to_select": 0}}
        path = out / f"batch-{number}.json"
        path.write_text(json.dumps(batch))
        written.append(path)
    (out / "skipped_indexes.json").write_text(json.dumps({"skipped_indexes": dead}))
    explanations = []
    if loaded.folder is not None:  # those of `saelab explain`, in Neuronpedia's explanation records
        from saelab.analysis.autointerp.results import neuronpedia_explanations, results_dir

        explanations = neuronpedia_explanations(results_dir(loaded.folder), source.model_id,
                                                f"{source.layer}-{source.sae_set}")
        if explanations:
            (out / "explanations.json").write_text(json.dumps(explanations))
    run = {"model_id": source.model_id, "layer": source.layer, "sae_set": source.sae_set,
           "neuronpedia_id": source.neuronpedia_id, "sae": str(loaded.folder), "model": loaded.model_name,
           "hook": loaded.hook.name, "d_sae": collector.d_sae, "live_features": len(live), "dead_features": len(dead),
           "n_top": collector.n_top, "window": collector.window, "features_per_batch": features_per_batch,
           "batches": len(written), "explanations": len(explanations), "saelab_version": __version__, **common}
    (out / "run_settings.json").write_text(json.dumps(run, indent=2))
    return written


def batch_features(loaded: Loaded, collector: TopExamplesCollector, features: list[int], text: TokenText,
                   logit_tokens: int, common: dict) -> list[dict]:
    """The records of ``features``, their logit effects computed together."""
    effects = logit_effect_rows(loaded.model, loaded.sae, features).cpu()
    tops = top_logit_effects(features, effects, loaded.tokenizer, logit_tokens)
    histograms = logit_histograms(effects)
    return [feature_record(collector.summary(f), tops[i], histograms[i], text, common) for i, f in enumerate(features)]


def feature_record(summary: FeatureSummary, effects: LogitEffects, logit_histogram: tuple[list[float], list[int]],
                   text: TokenText, common: dict) -> dict:
    """One feature as Neuronpedia's importer reads it."""
    centres, heights = logit_histogram
    return {
        "feature_index": summary.feature,
        "pos_str": [token for _, token, _ in effects.top], "pos_values": [_round(v) for _, _, v in effects.top],
        "neg_str": [token for _, token, _ in effects.bottom], "neg_values": [_round(v) for _, _, v in effects.bottom],
        "frac_nonzero": summary.frequency,
        "logits_hist_data_bar_values": centres, "logits_hist_data_bar_heights": heights,
        # Activation-density histograms need every activation, which one streamed pass does not keep.
        "freq_hist_data_bar_values": [], "freq_hist_data_bar_heights": [],
        "max_activation": _round(summary.max), "mean_when_active": _round(summary.mean_when_active),
        "activations": [{"bin_min": -1, "bin_max": _round(summary.max), "bin_contains": -1,
                         "tokens": text.decode(example.tokens), "values": [_round(v) for v in example.activations],
                         "maxValue": _round(example.activation), "maxValueTokenIndex": example.center}
                        for example in summary.examples],
        "n_prompts_total": common.get("n_prompts_total"), "n_tokens_in_prompt": common.get("context_size"),
        "dataset": common.get("dataset"),
    }


def logit_histograms(effects: torch.Tensor, bins: int = LOGIT_HISTOGRAM_BINS) -> list[tuple[list[float], list[int]]]:
    """Per row of ``[features, vocab]`` logit effects, a histogram over the vocabulary: (bin centres, counts)."""
    low, high = effects.amin(1, keepdim=True), effects.amax(1, keepdim=True)
    width = ((high - low) / bins).clamp_min(1e-12)
    which = ((effects - low) / width).long().clamp_(0, bins - 1)
    which += torch.arange(len(effects))[:, None] * bins  # one bincount for all rows: row r's bins at r * bins
    counts = torch.bincount(which.flatten(), minlength=len(effects) * bins).view(len(effects), bins)
    centres = low + (torch.arange(bins) + 0.5) * width
    return [([_round(c) for c in row_centres], row_counts) for row_centres, row_counts
            in zip(centres.tolist(), counts.tolist())]


class TokenText:
    """Token ids to the text each stands for, each id decoded once (an export shows millions of tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.known = tokenizer, {}

    def decode(self, ids) -> list[str]:
        ids = [int(i) for i in ids]
        new = sorted({i for i in ids if i not in self.known})
        self.known.update(zip(new, token_strings(self.tokenizer, new)))
        return [self.known[i] for i in ids]


def _round(value: float) -> float:
    return round(float(value), 4)
