"""``saelab explain``: each feature's examples, split into what the explainer reads and what the scorer
tests, and one explanation per feature from a local model or a server.

The examples come from the dashboard's one streamed pass (``collect_dashboard``: top examples, samples
from each activation band, random contexts and near misses), or from a dashboard folder already built.
The split: the explainer reads the top examples of even rank (0, 2, 4, ...); the scorer is tested on
activating snippets drawn from the odd-ranked top examples and the band samples above the lowest band
(so across the range of activations, never one the explainer saw), and on as many non-activating ones,
near misses and random contexts in turn.

Written into the results folder (the run folder of a ``saelab train`` run, else the SAE folder):
``explanations.jsonl`` and ``autointerp/examples.jsonl`` (what ``saelab score`` reads, so it needs no pass
over the corpus); ``autointerp/calls.jsonl`` caches every model answer.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from saelab.analysis.autointerp.backends import Backend, CachedBackend, CallCache, make_backend
from saelab.analysis.autointerp.results import (CALLS_FILE, EXAMPLES_FILE, EXPLANATIONS_FILE, refresh_dashboard,
                                                results_dir)
from saelab.analysis.autointerp.prompts import Snippet, explainer_prompt, parse_explanation
from saelab.analysis.dashboard import (DashboardConfig, collect_dashboard, feature_chunks, parse_features,
                                      read_data_script)
from saelab.evals.options import CorpusOptions, SAEOptions
from saelab.files import folder_lock, read_json, read_jsonl, write_json, write_jsonl
from saelab.options import check_fields, option


def model_options(role: str, default: str | None) -> dict:
    """The options naming the model that plays ``role`` (explainer or scorer), shared by both commands."""
    return {
        role: option(default, f"The {role}: a local model (an embedded alias such as smollm2-135m, a transformers "
                     "folder, a .gguf file or a hub id) or the URL of an OpenAI-compatible server (vLLM, llama.cpp's "
                     "llama-server, Ollama: http://localhost:8000/v1). A key in SAELAB_API_KEY or OPENAI_API_KEY is "
                     "sent when set; none is needed." + ("" if default else " Default: the explainer.")),
        f"{role}_model": option(None, "The model name to ask the server for (default: the first one its /models "
                                "lists)."),
    }


EXPLAINER_OPTIONS = model_options("explainer", "smollm2-135m")


@dataclass(kw_only=True)
class CallOptions:
    """How the explainer or the scorer is asked (both commands)."""

    batch_size: int = option(16, "Prompts per local-model batch.", positive=True)
    concurrency: int = option(4, "Requests in flight at once to a server.", positive=True)
    timeout: float = option(120.0, "Seconds a server may take to answer one request (then it is retried, 3 times).",
                            positive=True)


@dataclass(kw_only=True)
class ExplainConfig(SAEOptions, CorpusOptions, CallOptions):
    from_dashboard: str | None = option(None, "Take the examples from this dashboard folder (of `saelab dashboard`, "
                                        "built with --non-activating > 0) instead of a pass over --dataset.",
                                        metavar="DIR")
    tokens: int = option(100_000, "Tokens of --dataset to read for the examples.", positive=True)
    features: str | None = option(None, "Features to explain, e.g. 0-199,1234 (default: all); only live ones (that "
                                  "fired on the text read) are explained.")
    max_features: int = option(100, "Explain at most this many live features, the first in index order; 0: all.")
    examples: int = option(10, "Activating snippets the explainer reads per feature (top examples of even rank).",
                           positive=True)
    test_examples: int = option(10, "Activating snippets each explanation is scored on, and as many non-activating "
                                "ones.", positive=True)
    window: int = option(10, "Tokens on each side of a snippet's token.", positive=True)
    max_tokens: int = option(48, "Longest explanation the explainer may write, in tokens.", positive=True)
    seed: int = option(0, "Seed of the example sampling and of the split.")
    out: str | None = option(None, "Results folder (default: the run folder, else the SAE folder).")
    explainer: str = EXPLAINER_OPTIONS["explainer"]
    explainer_model: str | None = EXPLAINER_OPTIONS["explainer_model"]

    def __post_init__(self):
        problems = check_fields(self)
        if self.max_features < 0:
            problems.append(f"max_features must be 0 (all) or positive (got {self.max_features})")
        if problems:
            raise ValueError("; ".join(problems))


# --- examples ---------------------------------------------------------------------------------------------
def _snippet(example: list, vocab: dict) -> Snippet:
    activation, context, position, _, ids, acts = example
    return Snippet([vocab[str(i)] for i in ids], [float(a) for a in acts], float(activation), context, position)


def split_examples(record: dict, vocab: dict, n_explain: int, n_test: int, seed: int = 0) -> dict | None:
    """A dashboard record's snippets as ``{"feature", "max", "explain", "activating", "non_activating"}``
    (see the module docstring), or None for a feature with no activating example."""
    top = record["top"]
    if not top:
        return None
    explain = top[0::2][:n_explain]
    taken = {_where(ex) for ex in explain}
    candidates = _distinct(top[1::2] + [ex for band in record["bands"] if band["low"] > 0 for ex in band["examples"]],
                           taken)
    rng = random.Random(seed * 1_000_003 + record["feature"])
    activating = sorted(rng.sample(candidates, min(n_test, len(candidates))), key=lambda ex: -ex[0])
    near = [("near_miss", ex) for ex in record.get("near_misses", [])]
    rand = [("random", ex) for ex in record.get("random", [])]
    # Near misses and random contexts in turn; when one list runs out, the rest of the other.
    alternating = [pair for pairs in zip(near, rand) for pair in pairs] + near[len(rand):] + rand[len(near):]
    silent = _distinct(alternating, taken, key=lambda pair: _where(pair[1]))[:n_test]
    return {"feature": record["feature"], "max": record["max"],
            "explain": [_snippet(ex, vocab).to_dict() for ex in explain],
            "activating": [_snippet(ex, vocab).to_dict() for ex in activating],
            "non_activating": [{"kind": kind, **_snippet(ex, vocab).to_dict()} for kind, ex in silent]}


def _where(example: list) -> tuple[int, int]:
    """(context, position): what identifies an example of a dashboard record."""
    return example[1], example[2]


def _distinct(items: list, taken: set, key=_where) -> list:
    """``items`` without those whose key is in ``taken`` or repeats an earlier one; adds their keys to ``taken``."""
    kept = []
    for item in items:
        if key(item) not in taken:
            taken.add(key(item))
            kept.append(item)
    return kept


def read_dashboard(folder) -> tuple[list[dict], dict]:
    """The feature records and the vocabulary of a dashboard folder's data files."""
    data = Path(folder).expanduser() / "data"
    files = sorted(data.glob("features-*.js"), key=lambda p: int(re.findall(r"\d+", p.name)[0]))
    if not files:
        raise FileNotFoundError(f"{folder} holds no dashboard data (data/features-*.js): pass the folder "
                                "`saelab dashboard` wrote")
    records, vocab = [], {}
    for path in files:
        chunk = read_data_script(path, "saelabFeatures")
        vocab.update(chunk["vocab"])
        records += chunk["features"].values()
    if records and "near_misses" not in records[0]:
        raise ValueError(f"the dashboard {folder} has no non-activating examples to score explanations on: rebuild "
                         "it with `saelab dashboard ... --non-activating 10`, or leave out --from-dashboard")
    return records, vocab


def collect_examples(cfg: ExplainConfig, say, progress: bool = False) -> list[dict]:
    """Every live chosen feature's split snippets, from a dashboard folder or one pass over the corpus."""
    from saelab.analysis.loading import load_sae_and_model

    if cfg.from_dashboard:
        records, vocab = read_dashboard(cfg.from_dashboard)
        wanted = set(parse_features(cfg.features, max(r["feature"] for r in records) + 1)) if cfg.features else None
        records = [r for r in records if wanted is None or r["feature"] in wanted]
    else:
        loaded = load_sae_and_model(cfg.sae, model=cfg.model, hook=cfg.hook, device=cfg.device, say=say)
        features = parse_features(cfg.features, loaded.sae.cfg.d_sae)
        corpus = {f.name: getattr(cfg, f.name) for f in fields(CorpusOptions)}
        dash = DashboardConfig(**corpus, tokens=cfg.tokens, top_examples=2 * max(cfg.examples, cfg.test_examples),
                               band_examples=max(2, -(-cfg.test_examples // 4)), window=cfg.window, seed=cfg.seed,
                               non_activating=cfg.test_examples)
        say(f"collecting examples of {len(features):,} features over {cfg.tokens:,} tokens of {cfg.dataset}")
        collector = collect_dashboard(loaded, features, dash, progress=progress)
        records, vocab = [], {}
        for _, chunk in feature_chunks(collector, None, loaded.tokenizer):
            vocab.update(chunk["vocab"])
            records += chunk["features"].values()
    sets = []
    for record in records:
        split = split_examples(record, vocab, cfg.examples, cfg.test_examples, cfg.seed)
        if split is not None:
            sets.append(split)
        if cfg.max_features and len(sets) == cfg.max_features:
            break
    if not sets:
        raise ValueError("no chosen feature fired on the text read: read more --tokens, or choose other --features")
    return sets


def example_settings(cfg: ExplainConfig) -> dict:
    """What decides the examples: a folder's examples are reused when these are unchanged."""
    keep = ("from_dashboard", "dataset", "dataset_split", "text_column", "context_size", "include_special_tokens",
            "tokens", "features", "max_features", "examples", "test_examples", "window", "seed", "model", "hook")
    return {key: value for key, value in asdict(cfg).items() if key in keep}


def load_or_collect_examples(cfg: ExplainConfig, out: Path, say, progress: bool = False) -> list[dict]:
    settings_path = out / "autointerp" / "examples_settings.json"
    if settings_path.exists() and (out / EXAMPLES_FILE).exists() and read_json(
            settings_path, "Delete it to collect the examples again.") == example_settings(cfg):
        say(f"reusing the examples in {out / EXAMPLES_FILE}")
        return read_jsonl(out / EXAMPLES_FILE, "Delete it to collect the examples again.")
    sets = collect_examples(cfg, say, progress)
    (out / "autointerp").mkdir(parents=True, exist_ok=True)
    write_jsonl(out / EXAMPLES_FILE, sets)
    write_json(settings_path, example_settings(cfg))
    return sets


# --- explaining ---------------------------------------------------------------------------------------------
def explain(cfg: ExplainConfig, say=None, progress: bool = False, backend: Backend | None = None) -> Path:
    """Collect (or reuse) the examples, explain every feature, write ``explanations.jsonl``; returns its path.
    ``backend``: the explainer to use instead of the one ``cfg.explainer`` names (any ``Backend``)."""
    from tqdm.auto import tqdm

    from saelab.evals.loading import find_sae_folder

    say = say or (lambda message: None)
    out = results_dir(find_sae_folder(cfg.sae), cfg.out)
    with folder_lock(out / "autointerp", "explain or score"):
        sets = load_or_collect_examples(cfg, out, say, progress)
        backend = CachedBackend(backend or make_backend(cfg.explainer, cfg.explainer_model, "--explainer",
                                                        cfg.device, cfg.batch_size, cfg.concurrency, cfg.timeout,
                                                        cfg.seed), CallCache(out / CALLS_FILE))
        say(f"explaining {len(sets):,} features with {backend.name}")
        rows = []
        bar = tqdm(total=len(sets), desc="explain", unit="feature", disable=not progress, leave=False)
        step = max(cfg.batch_size, cfg.concurrency)
        for start in range(0, len(sets), step):
            group = sets[start:start + step]
            prompts = [explainer_prompt([Snippet.from_dict(s) for s in item["explain"]], item["max"])
                       for item in group]
            for item, reply in zip(group, backend.complete(prompts, cfg.max_tokens)):
                rows.append({"feature": item["feature"], "explanation": parse_explanation(reply), "reply": reply,
                             "explainer": backend.name, "examples": len(item["explain"])})
            bar.update(len(group))
        bar.close()
        write_jsonl(out / EXPLANATIONS_FILE, rows)
    say(f"{len(rows):,} explanations ({backend.asked:,} written now, {backend.reused:,} from the cache)")
    refresh_dashboard(find_sae_folder(cfg.sae), out, say)
    return out / EXPLANATIONS_FILE
