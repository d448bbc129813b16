"""``saelab score``: how well each explanation predicts where its feature fires (Paulo et al. 2024).

- **Detection**: the scorer reads the explanation and one unmarked snippet at a time, from the feature's
  held-out activating snippets and as many non-activating ones (near misses and random contexts), and
  says whether the feature fires in it.
- **Fuzzing**: the scorer reads the explanation and one held-out activating snippet with tokens marked:
  for half of them (chosen at random) the truly active tokens, for the other half as many tokens chosen
  at random among the silent ones; it says whether the marking is right.

Each test is a yes/no question; the answer is yes when P(yes) > 0.5 (a local model's token
probabilities; a server's log-probabilities where it returns them, else its answer's text). Per feature:
balanced accuracy (mean of the recall on either class, so the class balance cannot bias it: answering at
random or always the same gives 0.5), accuracy, precision, recall, F1, and the AUC of P(yes) where
probabilities exist. Two baselines are scored on the same snippets: **shuffled** (the explanation of
another scored feature, a random derangement) and **top tokens** (``the tokens "a", "b", "c"``: the tokens
most often active in the explainer's snippets, no model involved). A score means something only against
these.
"""

from __future__ import annotations

import random
from dataclasses import MISSING, dataclass
from pathlib import Path

from saelab.analysis.autointerp.backends import Backend, CachedBackend, CallCache, make_backend
from saelab.analysis.autointerp.explain import CallOptions, model_options
from saelab.analysis.autointerp.results import (CALLS_FILE, EXAMPLES_FILE, EXPLANATIONS_FILE, SCORES_FILE,
                                                SUMMARY_FILE, refresh_dashboard, results_dir)
from saelab.analysis.autointerp.prompts import (Snippet, active_positions, detection_prompt, fuzzing_prompt,
                                                marked_text, top_tokens_explanation)
from saelab.files import folder_lock, read_jsonl, write_json, write_jsonl
from saelab.options import check_fields, option

SCORERS = ("detection", "fuzzing")
BASELINES = ("shuffled", "top_tokens")
SCORER_OPTIONS = model_options("scorer", None)


@dataclass(kw_only=True)
class ScoreConfig(CallOptions):
    sae: str = option(MISSING, "SAE folder or run folder whose explanations (of `saelab explain`) to score.",
                      positional=True, metavar="SAE_FOLDER")
    scorer: str | None = SCORER_OPTIONS["scorer"]
    scorer_model: str | None = SCORER_OPTIONS["scorer_model"]
    device: str | None = option(None, "cpu, cuda, ... for a local scorer (default: cuda when present).")
    seed: int = option(0, "Seed of the shuffled baseline and of the fuzzing marks.")
    out: str | None = option(None, "Results folder holding explanations.jsonl (default: the run folder, else the "
                             "SAE folder).")

    def __post_init__(self):
        problems = check_fields(self)
        if problems:
            raise ValueError("; ".join(problems))


# --- the tests ----------------------------------------------------------------------------------------------
@dataclass
class Test:
    scorer: str          # detection or fuzzing
    kind: str            # activating / near_miss / random (detection); correct / wrong (fuzzing)
    label: int           # 1: the right answer is yes
    snippet: Snippet
    marked: list[int]    # fuzzing: the marked token positions

    def prompt(self, explanation: str):
        return (detection_prompt(explanation, self.snippet) if self.scorer == "detection"
                else fuzzing_prompt(explanation, self.snippet, self.marked))

    def text(self) -> str:
        return marked_text(self.snippet.tokens, self.marked)


def feature_tests(item: dict, seed: int) -> list[Test]:
    """The detection and fuzzing tests of one feature's held-out snippets (``split_examples``)."""
    activating = [Snippet.from_dict(s) for s in item["activating"]]
    tests = [Test("detection", "activating", 1, s, []) for s in activating]
    tests += [Test("detection", s["kind"], 0, Snippet.from_dict(s), []) for s in item["non_activating"]]
    rng = random.Random(seed * 1_000_003 + item["feature"])
    wrong = set(rng.sample(range(len(activating)), len(activating) // 2))
    for i, snippet in enumerate(activating):
        active = active_positions(snippet, item["max"])
        if i in wrong:
            silent = [j for j, a in enumerate(snippet.acts) if a <= 0]
            if silent:
                tests.append(Test("fuzzing", "wrong", 0, snippet, sorted(rng.sample(silent, min(len(active),
                                                                                             len(silent))))))
                continue
        tests.append(Test("fuzzing", "correct", 1, snippet, active))
    return tests


def binary_scores(labels: list[int], probabilities: list[float], with_auc: bool = True) -> dict:
    """Balanced accuracy, accuracy, precision, recall, F1 and AUC of yes-answers (P(yes) > 0.5) against
    ``labels``; None where a class is absent (or for AUC without probabilities)."""
    predicted = [p > 0.5 for p in probabilities]
    tp = sum(1 for y, p in zip(labels, predicted) if y and p)
    fp = sum(1 for y, p in zip(labels, predicted) if not y and p)
    positives, negatives = sum(labels), len(labels) - sum(labels)
    tn = negatives - fp
    recall = tp / positives if positives else None
    specificity = tn / negatives if negatives else None
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * precision * recall / (precision + recall) if recall and precision + recall else 0.0
    return {"balanced_accuracy": (recall + specificity) / 2 if positives and negatives else None,
            "accuracy": (tp + tn) / len(labels) if labels else None, "precision": precision, "recall": recall,
            "f1": f1 if positives else None,
            "auc": auc(labels, probabilities) if with_auc and positives and negatives else None, "n": len(labels)}


def auc(labels: list[int], scores: list[float]) -> float:
    """The probability that a random positive scores above a random negative (ties count half)."""
    pos = [s for y, s in zip(labels, scores) if y]
    neg = [s for y, s in zip(labels, scores) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def derangement(n: int, rng: random.Random) -> list[int] | None:
    """A random permutation of range(n) with no fixed point (None for n < 2)."""
    if n < 2:
        return None
    while True:
        order = list(range(n))
        rng.shuffle(order)
        if all(i != j for i, j in enumerate(order)):
            return order


def explanation_sets(items: list[dict], explained: dict[int, str], seed: int) -> dict[str, list[str]]:
    """Per scored feature: its explanation, the shuffled baseline's and the top-tokens baseline's."""
    own = [explained[item["feature"]] for item in items]
    order = derangement(len(items), random.Random(seed))
    sets = {"explanation": own,
            "top_tokens": [top_tokens_explanation([Snippet.from_dict(s) for s in item["explain"]], item["max"])
                           for item in items]}
    if order is not None:
        sets["shuffled"] = [own[j] for j in order]
    return sets


def score_feature(backend, item: dict, explanations: dict[str, str], seed: int) -> dict:
    """All tests of one feature under each explanation in ``explanations`` (name -> text), asked in one call."""
    tests = feature_tests(item, seed)
    names = list(explanations)
    prompts = [t.prompt(explanations[name]) for name in names for t in tests]
    answers = backend.yes_probability(prompts) if prompts else []
    result = {}
    for k, name in enumerate(names):
        mine = answers[k * len(tests):(k + 1) * len(tests)]
        result[name] = {"explanation": explanations[name], **{
            scorer: binary_scores([t.label for t in tests if t.scorer == scorer],
                                  [p for t, p in zip(tests, mine) if t.scorer == scorer], backend.gives_probabilities)
            for scorer in SCORERS}}
        if name == "explanation":
            result["tests"] = [{"scorer": t.scorer, "kind": t.kind, "label": t.label, "p_yes": round(p, 4),
                                "text": t.text(), "activation": t.snippet.activation} for t, p in zip(tests, mine)]
    return result


def score(cfg: ScoreConfig, say=None, progress: bool = False, backend: Backend | None = None) -> Path:
    """Score the explanations of ``cfg.sae``'s results folder; writes ``scores.jsonl`` and
    ``scores_summary.json`` and returns the path of the first. ``backend``: the scorer to use instead of the
    one ``cfg.scorer`` names."""
    from tqdm.auto import tqdm

    from saelab.evals.loading import find_sae_folder

    say = say or (lambda message: None)
    out = results_dir(find_sae_folder(cfg.sae), cfg.out)
    for name in (EXPLANATIONS_FILE, EXAMPLES_FILE):
        if not (out / name).exists():
            raise FileNotFoundError(f"{out / name} does not exist: run `saelab explain {cfg.sae}` first")
    fix = f"Run `saelab explain {cfg.sae}` again to rewrite it."
    explained_rows = read_jsonl(out / EXPLANATIONS_FILE, fix)
    explained = {row["feature"]: row["explanation"] for row in explained_rows}
    items = [item for item in read_jsonl(out / EXAMPLES_FILE, fix) if item["feature"] in explained]
    spec = cfg.scorer or (explained_rows[0]["explainer"] if explained_rows else None)
    if spec is None:
        raise ValueError(f"{out / EXPLANATIONS_FILE} is empty: nothing to score")
    model = cfg.scorer_model
    if cfg.scorer is None and "#" in spec and spec.startswith(("http://", "https://")):  # the explainer's server
        spec, model = spec.split("#", 1)
    with folder_lock(out / "autointerp", "explain or score"):
        backend = CachedBackend(backend or make_backend(spec, model, "--scorer", cfg.device, cfg.batch_size,
                                                        cfg.concurrency, cfg.timeout, cfg.seed),
                                CallCache(out / CALLS_FILE))
        sets = explanation_sets(items, explained, cfg.seed)
        say(f"scoring {len(items):,} explanations and their baselines with {backend.name}")
        rows = []
        for i, item in enumerate(tqdm(items, desc="score", unit="feature", disable=not progress, leave=False)):
            result = score_feature(backend, item, {name: texts[i] for name, texts in sets.items()}, cfg.seed)
            rows.append({"feature": item["feature"], "explanation": result["explanation"]["explanation"],
                         "scorer": backend.name, **{s: result["explanation"][s] for s in SCORERS},
                         "baselines": {name: result[name] for name in BASELINES if name in result},
                         "tests": result["tests"]})
        write_jsonl(out / SCORES_FILE, rows)
        write_json(out / SUMMARY_FILE, summarize(rows, backend.name))
    say(f"{backend.asked:,} questions asked, {backend.reused:,} answered from the cache")
    refresh_dashboard(find_sae_folder(cfg.sae), out, say)
    return out / SCORES_FILE


def summarize(rows: list[dict], scorer: str) -> dict:
    """Means over features of each score, for the explanations and each baseline."""
    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    table = {}
    for name in ("explanation", *BASELINES):
        picked = [row if name == "explanation" else row["baselines"].get(name) for row in rows]
        picked = [p for p in picked if p]
        table[name] = {f"{scorer_name}_{metric}": mean(p[scorer_name][metric] for p in picked)
                       for scorer_name in SCORERS for metric in ("balanced_accuracy", "auc", "f1")}
    return {"scorer": scorer, "features": len(rows), "means": table}


def format_summary(summary: dict) -> str:
    """The summary as a table: one row per explanation set, columns detection / fuzzing scores."""
    columns = [(f"{s}_{m}", f"{s} {'bal. acc.' if m == 'balanced_accuracy' else m.upper()}") for s in SCORERS
               for m in ("balanced_accuracy", "auc")]
    lines = [f"{summary['features']} features scored by {summary['scorer']} (means over features)",
             "| explanations | " + " | ".join(title for _, title in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for name, values in summary["means"].items():
        cells = [f"{values[key]:.3f}" if values[key] is not None else "-" for key, _ in columns]
        lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
