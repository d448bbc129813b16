"""The feature dashboard: a static site with one page per feature, built from one pass over a corpus.

The pass collects, per feature, running statistics and the top-activating contexts
(``TopExamplesCollector``), an activation histogram and examples sampled from each activation band
(``ActivationDistributions``), random contexts and near misses where it is silent (``NonActivatingCollector``);
all stream, so memory does not grow with the corpus. Logit effects come
from one matmul per chunk of features through the linearised final norm and the unembedding. The site
(``index.html``, ``feature.html#F`` and ``data/*.js``) works from ``file://`` with no server or network:
its data are JavaScript files that call a function, since browsers refuse ``fetch`` of local files.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from saelab.analysis.dashboard_html import FEATURE_HTML, INDEX_HTML, STYLE_CSS
from saelab.analysis.distributions import ActivationDistributions
from saelab.analysis.loading import Loaded, check_feature, token_strings
from saelab.analysis.logits import logit_effect_rows
from saelab.analysis.non_activating import NonActivatingCollector, decoder_neighbours
from saelab.analysis.top_examples import TopExamplesCollector
from saelab.data.text import describe_source
from saelab.evals.loading import corpus_source, run_folder
from saelab.evals.metrics import METRIC_KEYS
from saelab.evals.options import CorpusOptions
from saelab.evals.report import METRIC_MEANINGS
from saelab.options import option
from saelab.sae import SAE
from saelab.sae.neuronpedia import neuronpedia_url

CHUNK = 100                 # features per data file: feature F's data is in data/features-{F // CHUNK}.js
DATA_MARKER = "index.js"    # data/index.js marks a folder as a dashboard that may be rebuilt in place


@dataclass
class DashboardConfig(CorpusOptions):
    tokens: int = option(100_000, "Tokens of text to read, rounded up to whole contexts; 500_000 is accepted.",
                         positive=True)
    features: str | None = option(None, "Features to include, e.g. 0-99,1234 (default: all).")
    top_examples: int = option(20, "Top-activating contexts kept per feature.")
    band_examples: int = option(4, "Contexts sampled at random from each activation band (8 bands of equal width "
                                "below the smallest power of two above the feature's maximum).")
    window: int = option(8, "Tokens shown on each side of an example's token.")
    logit_tokens: int = option(10, "Tokens shown that each feature's decoder direction promotes and suppresses.")
    non_activating: int = option(10, "Non-activating contexts kept per feature, of each of two kinds: random contexts "
                                 "where it is silent, and near misses, where the features with the closest decoder "
                                 "directions fire and it does not (what `saelab explain` scores explanations on); 0: "
                                 "none.")
    neighbours: int = option(4, "Features with the closest decoder directions whose firing makes a near miss.",
                             positive=True)
    seed: int = option(0, "Seed of the band examples' sampling.")
    out: str | None = option(None, "Output folder (default: <run>/dashboard for a run's final/ SAE, else "
                             "<SAE_FOLDER>-dashboard beside the SAE folder).")


# --- what to show -----------------------------------------------------------------------------------------
def parse_features(spec: str | None, d_sae: int) -> list[int]:
    """``"0-99,1234"`` as a sorted list of feature indices (None or empty: all ``d_sae`` features)."""
    if spec is None or not spec.strip():
        return list(range(d_sae))
    chosen = set()
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise ValueError(f"--features {spec!r}: {part!r} is not a feature index or a range like 0-99")
        first, last = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if last < first:
            raise ValueError(f"--features {spec!r}: the range {part.strip()} is backwards; write {last}-{first}")
        check_feature(d_sae, first)
        check_feature(d_sae, last)
        chosen.update(range(first, last + 1))
    return sorted(chosen)


def default_dashboard_dir(sae_folder) -> Path:
    """``<run>/dashboard`` for a run's ``final/`` SAE, else ``<SAE folder>-dashboard`` beside the SAE folder."""
    run, folder = run_folder(sae_folder), Path(sae_folder).resolve()
    return run / "dashboard" if run else folder.parent / f"{folder.name}-dashboard"


def summary_metrics(sae_folder) -> tuple[str | None, dict]:
    """The SAE's evaluation next to it, if any: ``eval.json`` (of ``saelab train``) or ``metrics.json`` (of
    ``saelab eval``) in the SAE folder, its run folder or an eval report beside it. Returns (file, metrics)."""
    folder, run = Path(sae_folder), run_folder(sae_folder)
    candidates = [folder / "eval.json", folder / "metrics.json"]
    if run:
        candidates += [run / "eval.json", *sorted(run.glob("eval-*/metrics.json"))]
    candidates += sorted(folder.parent.glob(f"{folder.name}-eval-*/metrics.json"))
    for path in candidates:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # absent or not an evaluation: try the next place
        metrics = {key: data[key] for key in METRIC_KEYS if isinstance(data.get(key), (int, float))}
        dataset = data.get("eval_dataset") or (data.get("eval") or {}).get("dataset")
        if metrics:
            return str(path), {**metrics, **({"dataset": dataset} if dataset else {})}
    return None, {}


# --- the pass over the corpus -----------------------------------------------------------------------------
class DashboardCollector:
    """Top examples and statistics, histograms and band examples of the chosen ``features`` (global indices),
    and, given their ``neighbours`` (``decoder_neighbours``), ``non_activating`` random contexts and near misses."""

    def __init__(self, features: list[int], n_top: int = 20, per_band: int = 4, window: int = 8, seed: int = 0,
                 neighbours: torch.Tensor | None = None, non_activating: int = 0):
        self.features = features
        self.index = torch.tensor(features, dtype=torch.long)
        self.top = TopExamplesCollector(len(features), n_top, window)
        self.distributions = ActivationDistributions(len(features), per_band=per_band, window=window, seed=seed)
        self.negatives = (NonActivatingCollector(features, neighbours, non_activating, window, seed)
                          if non_activating > 0 and neighbours is not None else None)

    @torch.no_grad()
    def add_features(self, feats: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """``feats``: ``[batch, seq, d_sae]`` activations of all the SAE's features; ``tokens``: ``[batch, seq]``."""
        if self.negatives is not None:  # reads the neighbours' activations: all features, moved once
            feats = feats.float().cpu()
            self.negatives.add_features(feats, tokens, keep)
        if len(self.features) < feats.shape[-1]:
            feats = feats[..., self.index.to(feats.device)]
        feats = feats.float().cpu()
        if keep is not None:  # masked once here; the top collector still needs keep to count the tokens seen
            feats = feats.masked_fill(~keep.cpu().bool()[..., None], 0.0)
        self.top.add_features(feats, tokens, keep)
        self.distributions.add_features(feats, tokens)


@torch.no_grad()
def collect_dashboard(loaded: Loaded, features: list[int], cfg: DashboardConfig,
                      progress: bool = False) -> DashboardCollector:
    """One pass of the model over the first ``cfg.tokens`` tokens of ``cfg.dataset``."""
    from tqdm.auto import tqdm

    source = corpus_source(loaded, cfg, cfg.tokens)
    context_size = source.packing.context_size
    neighbours = decoder_neighbours(loaded.sae, features, cfg.neighbours) if cfg.non_activating > 0 else None
    collector = DashboardCollector(features, cfg.top_examples, cfg.band_examples, cfg.window, cfg.seed, neighbours,
                                   cfg.non_activating)
    bar = tqdm(total=source.max_contexts * context_size, desc="dashboard", unit="tok", unit_scale=True,
               disable=not progress, leave=False)
    for batch in source.token_batches():
        acts = loaded.input_activations(batch)
        collector.add_features(loaded.sae.encode(acts), batch, source.keep_mask(batch))
        bar.update(batch.numel())
    bar.close()
    if collector.top.contexts_seen == 0:
        raise ValueError(f"dataset {cfg.dataset!r} gave no complete context of {context_size} tokens; use more "
                         "text, a smaller --context-size, or check --dataset-split / --text-column")
    return collector


@dataclass
class LogitTable:
    top_ids: torch.Tensor        # [features, n] the tokens each feature promotes most, largest first
    top_values: torch.Tensor     # logit change per unit activation (1/RMS factor left out)
    bottom_ids: torch.Tensor     # [features, n] the tokens it suppresses most, most negative first
    bottom_values: torch.Tensor


@torch.no_grad()
def batched_logit_effects(model, sae: SAE, features: list[int], n: int = 10, chunk: int = 1024) -> LogitTable:
    """The top and bottom ``n`` logit effects of many features (``logit_effects`` of each): one matmul per ``chunk``
    features through the linearised final norm and the unembedding (memory ``chunk * vocab`` floats)."""
    if n <= 0:
        raise ValueError(f"the number of tokens to show must be positive, got {n}")
    parts = []
    for start in range(0, len(features), chunk):
        effects = logit_effect_rows(model, sae, features[start:start + chunk])  # [chunk, vocab]
        k = min(n, effects.shape[1])
        top, bottom = effects.topk(k, dim=1), (-effects).topk(k, dim=1)
        parts.append((top.indices.cpu(), top.values.cpu(), bottom.indices.cpu(), -bottom.values.cpu()))
    return LogitTable(*(torch.cat(column) for column in zip(*parts)))


# --- the site's data --------------------------------------------------------------------------------------
# The collectors' tensors are read a chunk of features at a time as Python lists (reading them element by
# element is what would be slow), and each data file is written before the next is built.
def rounded(values: torch.Tensor, digits: int = 3) -> list:
    """``values`` rounded to ``digits`` significant digits, as (nested) lists of floats with short JSON;
    non-finite values become 0."""
    x = values.double()
    x = torch.where(torch.isfinite(x), x, 0.0)
    last = torch.floor(torch.log10(x.abs().clamp_min(1e-30))) + 1 - digits  # 10 ** last: the last digit kept
    scale = torch.pow(10.0, last.abs())
    # Divide by an exact power of ten rather than multiply by an inexact one (0.1): 0.123, not 0.12300000000000001.
    return torch.where(last < 0, torch.round(x * scale) / scale, torch.round(x / scale) * scale).tolist()


def _examples(values, contexts, positions, window_tokens, window_acts, window: int, used: set[int]) -> list[list]:
    """Stored examples (lists) as the page reads them: [activation, context, position, center, token ids,
    activations], the window cut to the tokens inside the context; empty slots (no activation) skipped."""
    out = []
    for value, context, position, tokens, acts in zip(values, contexts, positions, window_tokens, window_acts):
        if not value > 0:
            continue
        inside = [i for i, t in enumerate(tokens) if t >= 0]  # contiguous: only the context's ends cut a window
        first, last = inside[0], inside[-1] + 1
        used.update(tokens[first:last])
        out.append([value, context, position, window - first, tokens[first:last],
                    [a or 0 for a in acts[first:last]]])  # int 0: most window tokens are inactive, "0" is short
    return out


def _chunk_records(collector: DashboardCollector, lo: int, hi: int, logits: LogitTable | None,
                   neuronpedia_id: str | None, used: set[int]) -> list[dict]:
    """The pages of collected features ``lo`` to ``hi - 1``; adds the token ids they show to ``used``."""
    top, dist, n = collector.top, collector.distributions, hi - lo
    count, maxima = top.count[lo:hi].tolist(), rounded(top.max[lo:hi], 4)
    frequency = rounded(top.count[lo:hi] / max(top.tokens_seen, 1), 4)
    mean = rounded(top.sum[lo:hi] / top.count[lo:hi].clamp_min(1), 4)  # a feature never active has sum 0
    tops = (rounded(top.values[lo:hi], 4), top.context[lo:hi].tolist(), top.position[lo:hi].tolist(),
            top.window_tokens[lo:hi].tolist(), rounded(top.window_acts[lo:hi]))
    slots = slice(lo * dist.n_bands * dist.per_band, hi * dist.n_bands * dist.per_band)
    shape = (n, dist.n_bands, dist.per_band)
    bands = (rounded(dist.value[slots].view(shape), 4), dist.context[slots].view(shape).tolist(),
             dist.position[slots].view(shape).tolist(), dist.window_tokens[slots].view(*shape, -1).tolist(),
             rounded(dist.window_acts[slots].view(*shape, -1)))
    histograms, ranges = dist.counts[lo:hi].tolist(), dist.range[lo:hi].tolist()
    band_counts = dist.counts[lo:hi].view(n, dist.n_bands, -1).sum(-1).tolist()
    effects = ((logits.top_ids[lo:hi].tolist(), rounded(logits.top_values[lo:hi], 4),
                logits.bottom_ids[lo:hi].tolist(), rounded(logits.bottom_values[lo:hi], 4)) if logits is not None
               else ([[]] * n,) * 4)  # no logit effects asked for (saelab explain's examples)
    negatives = {}
    if collector.negatives is not None:
        for name, kept in (("random", collector.negatives.random), ("near_misses", collector.negatives.near)):
            negatives[name] = (rounded(kept.values[lo:hi], 4), kept.context[lo:hi].tolist(),
                               kept.position[lo:hi].tolist(), kept.window_tokens[lo:hi].tolist(),
                               torch.zeros_like(kept.window_acts[lo:hi]).long().tolist())  # silent on the window
    records = []
    for i in range(n):
        feature = collector.features[lo + i]
        hist = histograms[i]
        while hist and hist[-1] == 0:
            hist = hist[:-1]
        band_width = ranges[i] / dist.n_bands
        listed = [{"low": band * band_width, "high": (band + 1) * band_width, "count": band_counts[i][band],
                   "examples": sorted(_examples(*(column[i][band] for column in bands), dist.window, used),
                                      key=lambda ex: -ex[0])}
                  for band in reversed(range(dist.n_bands)) if band_counts[i][band]]
        promoted, suppressed = list(zip(effects[0][i], effects[1][i])), list(zip(effects[2][i], effects[3][i]))
        used.update(effects[0][i] + effects[2][i])
        records.append({
            "feature": feature, "count": count[i], "frequency": frequency[i], "mean": mean[i], "max": maxima[i],
            "histogram": {"bin_width": ranges[i] / dist.n_bins, "counts": hist},
            "top": _examples(*(column[i] for column in tops), top.window, used), "bands": listed,
            "promoted": [list(pair) for pair in promoted], "suppressed": [list(pair) for pair in suppressed],
            "neuronpedia": neuronpedia_url(neuronpedia_id, feature) if neuronpedia_id else None})
        for name, columns in negatives.items():  # the first field is the selection key, not an activation
            records[-1][name] = [[0, *ex[1:]] for ex in _examples(*(column[i] for column in columns), top.window,
                                                                  used)]
    return records


def feature_chunks(collector: DashboardCollector, logits: LogitTable | None, tokenizer,
                   neuronpedia_id: str | None = None) -> Iterator[tuple[int, dict]]:
    """Each data file's content, one at a time: (chunk number, {"vocab": {id: text}, "features": {F: page}}),
    chunk number ``F // CHUNK`` for feature F."""
    features = collector.features
    starts = [i for i in range(len(features)) if i == 0 or features[i] // CHUNK != features[i - 1] // CHUNK]
    for lo, hi in zip(starts, starts[1:] + [len(features)]):
        used: set[int] = set()
        records = _chunk_records(collector, lo, hi, logits, neuronpedia_id, used)
        yield features[lo] // CHUNK, {"vocab": vocabulary(tokenizer, used),
                                      "features": {str(r["feature"]): r for r in records}}


def index_row(record: dict, n_tokens: int = 3) -> list:
    """[feature, frequency, mean, max, top tokens, promoted tokens, explanation, detection score]: the tokens most
    often at the top examples' maxima, the tokens the decoder direction promotes most, and ("", None until
    ``attach_explanations``) the feature's explanation and its detection balanced accuracy."""
    centers = Counter(ex[4][ex[3]] for ex in record["top"])
    top_tokens = [t for t, _ in centers.most_common(n_tokens)]
    return [record["feature"], record["frequency"], record["mean"], record["max"], top_tokens,
            [t for t, _ in record["promoted"][:n_tokens]], "", None]


def sae_description(loaded: Loaded) -> dict:
    cfg, meta = loaded.sae.cfg, loaded.sae.cfg.metadata
    return {"folder": str(loaded.folder) if loaded.folder else None, "model": loaded.model_name,
            "hook": "+".join(h.name for h in loaded.reads), "kind": cfg.kind,
            "writes": [h.name for h in loaded.written], "architecture": cfg.architecture, "d_in": cfg.d_in,
            "d_sae": cfg.d_sae, "k": cfg.k, "trained_on": meta.get("dataset_path"),
            "context_size": meta.get("context_size"),
            "neuronpedia": neuronpedia_url(meta["neuronpedia_id"]) if meta.get("neuronpedia_id") else None}


def vocabulary(tokenizer, ids) -> dict[str, str]:
    ids = sorted(ids)
    return {str(i): s for i, s in zip(ids, token_strings(tokenizer, ids))}


# --- writing the site -------------------------------------------------------------------------------------
def check_out_dir(out: Path) -> bool:
    """Whether ``out`` holds an earlier dashboard (rebuilt in place); refuses any other non-empty folder."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; pass a folder for --out")
    if not out.exists() or not any(out.iterdir()):
        return False
    if not (out / "data" / DATA_MARKER).exists():
        raise FileExistsError(f"{out} exists and is not a saelab dashboard; pass an empty or new --out")
    return True


def prepare_out_dir(out: Path) -> None:
    """Create ``out``, or clear the data of an earlier dashboard there."""
    if check_out_dir(out):
        shutil.rmtree(out / "data")  # stale chunk files of a dashboard with other features
    (out / "data").mkdir(parents=True, exist_ok=True)


def _script(function: str, data: dict) -> str:
    # JSON is valid JavaScript; a function call instead of a fetch() is what lets file:// pages read it.
    return f"{function}({json.dumps(data, separators=(',', ':'), allow_nan=False)});\n"


def read_data_script(path, function: str) -> dict:
    """The data a dashboard data file hands to ``function(...)``."""
    from saelab.files import FileFormatError

    text = Path(path).read_text(encoding="utf-8").strip()
    if not (text.startswith(function + "(") and text.endswith(");")):
        raise FileFormatError(f"{path} is not a saelab dashboard data file; rebuild the dashboard")
    try:
        return json.loads(text[len(function) + 1:-2])
    except json.JSONDecodeError:
        raise FileFormatError(f"{path} was damaged or cut short; rebuild the dashboard") from None


def attach_explanations(out, notes: dict[int, dict], summary: dict | None = None) -> int:
    """Put explanations into the dashboard at ``out``: ``notes`` maps a feature to ``{"explanation", "explainer"}``
    and, once scored, ``"detection"``, ``"fuzzing"``, ``"baselines"`` and ``"tests"`` (the snippets scored);
    the page of each feature shows them, its index row gains the explanation and its detection score, and the
    index ``summary`` (the means of ``saelab score``). Returns how many features got one."""
    out = Path(out)
    index = read_data_script(out / "data" / DATA_MARKER, "saelabIndex")
    attached = 0
    for path in sorted((out / "data").glob("features-*.js")):
        chunk = read_data_script(path, "saelabFeatures")
        for key, record in chunk["features"].items():
            record.pop("explanation", None)
            if int(key) in notes:
                record["explanation"] = notes[int(key)]
                attached += 1
        path.write_text(_script("saelabFeatures", chunk), encoding="utf-8")
    for row in index["rows"]:
        note = notes.get(row[0]) or {}
        row[6:] = [note.get("explanation", ""), (note.get("detection") or {}).get("balanced_accuracy")]
    index["autointerp"] = summary
    (out / "data" / DATA_MARKER).write_text(_script("saelabIndex", index), encoding="utf-8")
    return attached


def write_site(out, loaded: Loaded, collector: DashboardCollector, logits: LogitTable, cfg: DashboardConfig,
               metrics_source: str | None = None, metrics: dict | None = None) -> Path:
    """Write index.html, feature.html, style.css and data/*.js into ``out``; return the index.html path."""
    out = Path(out)
    prepare_out_dir(out)
    (out / "index.html").write_text(INDEX_HTML, encoding="utf-8")
    (out / "feature.html").write_text(FEATURE_HTML, encoding="utf-8")
    (out / "style.css").write_text(STYLE_CSS, encoding="utf-8")
    rows = []
    # A crosscoder's or CLT's latents write several hooks: how much each writes to each is on its page.
    by_hook = loaded.sae.decoder_norms_by_hook().detach().cpu() if loaded.sae.cfg.n_hooks > 1 else None
    for number, chunk in feature_chunks(collector, logits, loaded.tokenizer, loaded.sae.cfg.metadata.get(
            "neuronpedia_id")):
        for record in chunk["features"].values() if by_hook is not None else ():
            record["decoder_norms"] = rounded(by_hook[record["feature"]])
        (out / "data" / f"features-{number}.js").write_text(_script("saelabFeatures", chunk), encoding="utf-8")
        rows += [index_row(record) for record in chunk["features"].values()]
    metrics = metrics or {}
    index = {"sae": sae_description(loaded), "dataset": describe_source(cfg.dataset),
             "tokens": collector.top.tokens_seen, "contexts": collector.top.contexts_seen, "window": cfg.window,
             "chunk_size": CHUNK, "metrics": metrics, "metrics_source": metrics_source,
             "meanings": {key: METRIC_MEANINGS[key] for key in metrics if key in METRIC_MEANINGS}, "rows": rows,
             "vocab": vocabulary(loaded.tokenizer, {t for row in rows for t in row[4] + row[5]})}
    (out / "data" / DATA_MARKER).write_text(_script("saelabIndex", index), encoding="utf-8")
    return out / "index.html"


def build_dashboard(loaded: Loaded, cfg: DashboardConfig | None = None, progress: bool = False,
                    say=None) -> Path:
    """Collect, compute logit effects and write the site for ``loaded`` (an SAE with its model); returns the
    path of ``index.html``."""
    cfg = cfg or DashboardConfig()
    say = say or (lambda message: None)
    if min(cfg.top_examples, cfg.band_examples, cfg.logit_tokens) <= 0 or min(cfg.window, cfg.non_activating) < 0:
        raise ValueError("--top-examples, --band-examples and --logit-tokens must be positive and --window and "
                         "--non-activating non-negative")
    features = parse_features(cfg.features, loaded.sae.cfg.d_sae)
    if cfg.out is None and loaded.folder is None:
        raise ValueError("this SAE has no folder to put the dashboard beside; pass --out")
    out = Path(cfg.out).expanduser() if cfg.out else default_dashboard_dir(loaded.folder)
    check_out_dir(out)  # fail before the long pass, not after it
    say(f"reading {len(features):,} features over {cfg.tokens:,} tokens of {cfg.dataset}")
    collector = collect_dashboard(loaded, features, cfg, progress)
    logits = batched_logit_effects(loaded.model, loaded.sae, features, cfg.logit_tokens)
    metrics_source, metrics = summary_metrics(loaded.folder) if loaded.folder else (None, {})
    index = write_site(out, loaded, collector, logits, cfg, metrics_source, metrics)
    if loaded.folder is not None:
        from saelab.analysis.autointerp.results import dashboard_notes, results_dir

        notes, summary = dashboard_notes(results_dir(loaded.folder))
        if notes:
            say(f"{attach_explanations(out, notes, summary):,} features have an explanation")
    return index


__all__ = ["DashboardCollector", "DashboardConfig", "LogitTable", "batched_logit_effects", "build_dashboard",
           "collect_dashboard", "default_dashboard_dir", "feature_chunks", "parse_features", "summary_metrics",
           "write_site"]
