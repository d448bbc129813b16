"""Explanations of a trained SAE's features written and scored by a local model (not a test: figures for the README).

    python benchmarks/autointerp.py [--sae runs/demo] [--features 100] [--explainer smollm2-135m]
                                    [--out runs/autointerp] [--json benchmarks/results/autointerp.json]

Runs ``saelab explain`` (one pass over --tokens tokens of WikiText-2 for the examples, then one explanation per live
feature, the first --features in index order) and ``saelab score`` (detection and fuzzing of each explanation and of
its two baselines) into a fresh results folder, and records the wall time of each step, seconds per feature, the
mean scores of ``scores_summary.json`` and a few explanations as written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from saelab.analysis.autointerp import ExplainConfig, ScoreConfig, explain, score
from saelab.analysis.autointerp.results import SUMMARY_FILE
from saelab.files import read_jsonl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sae", default="runs/demo", help="the SAE (a run of `saelab train`: `make demo` makes it)")
    parser.add_argument("--features", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--explainer", default="smollm2-135m")
    parser.add_argument("--dataset", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext2-valid.txt"))
    parser.add_argument("--out", default="runs/autointerp")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)  # every answer computed again: the cache would make the timings meaningless
    say = lambda message: print(f"saelab: {message}", flush=True)  # noqa: E731
    start = time.perf_counter()
    explain(ExplainConfig(sae=args.sae, dataset=args.dataset, tokens=args.tokens, max_features=args.features,
                          explainer=args.explainer, out=str(out)), say=say)
    explained = time.perf_counter()
    score(ScoreConfig(sae=args.sae, out=str(out)), say=say)
    scored = time.perf_counter()

    summary = json.loads((out / SUMMARY_FILE).read_text())
    rows = read_jsonl(out / "scores.jsonl", "")
    result = {
        "sae": args.sae, "explainer_and_scorer": args.explainer, "dataset": args.dataset, "tokens": args.tokens,
        "features": summary["features"], "explain_seconds": round(explained - start, 1),
        "score_seconds": round(scored - explained, 1),
        "seconds_per_feature": round((scored - start) / max(summary["features"], 1), 2),
        "questions_per_feature": round(sum(len(r["tests"]) for r in rows) * 3 / max(len(rows), 1), 1),
        "means": summary["means"],
        "examples": [{"feature": r["feature"], "explanation": r["explanation"],
                      "detection_balanced_accuracy": r["detection"]["balanced_accuracy"],
                      "detection_auc": r["detection"]["auc"]} for r in rows[:8]],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
