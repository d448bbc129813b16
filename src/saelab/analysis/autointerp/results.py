"""Where explanations and scores are kept, and where they are shown: the dashboard's pages and the
Neuronpedia export."""

from __future__ import annotations

from pathlib import Path

from saelab.evals.loading import run_folder
from saelab.files import read_json, read_jsonl

EXAMPLES_FILE, CALLS_FILE = "autointerp/examples.jsonl", "autointerp/calls.jsonl"
EXPLANATIONS_FILE, SCORES_FILE, SUMMARY_FILE = "explanations.jsonl", "scores.jsonl", "scores_summary.json"


def results_dir(sae_folder, out: str | None = None) -> Path:
    """Where explanations and scores go: ``out``, else the run folder of a run's ``final/`` SAE, else the SAE
    folder itself."""
    if out:
        return Path(out).expanduser()
    return run_folder(sae_folder) or Path(sae_folder).resolve()


def dashboard_notes(folder) -> tuple[dict[int, dict], dict | None]:
    """What the dashboard shows of the results in ``folder``: per feature its explanation and, when scored,
    its scores and scored snippets; and the summary of ``saelab score`` (None before scoring)."""
    folder = Path(folder)
    fix = "Run `saelab explain` (or `saelab score`) again to rewrite it."
    notes: dict[int, dict] = {}
    if (folder / EXPLANATIONS_FILE).exists():
        for row in read_jsonl(folder / EXPLANATIONS_FILE, fix):
            notes[row["feature"]] = {"explanation": row["explanation"], "explainer": row["explainer"]}
    scored = (folder / SCORES_FILE).exists()
    if scored:
        for row in read_jsonl(folder / SCORES_FILE, fix):
            if row["feature"] in notes and notes[row["feature"]]["explanation"] == row["explanation"]:
                notes[row["feature"]].update({key: row[key] for key in ("scorer", "detection", "fuzzing",
                                                                         "baselines", "tests")})
    summary = read_json(folder / SUMMARY_FILE, fix) if scored and (folder / SUMMARY_FILE).exists() else None
    return notes, summary


def refresh_dashboard(sae_folder, folder: Path, say) -> None:
    """Show the results in ``folder`` on the SAE's dashboard at its default place, if one was built."""
    from saelab.analysis.dashboard import DATA_MARKER, attach_explanations, default_dashboard_dir

    dashboard = default_dashboard_dir(sae_folder)
    if (dashboard / "data" / DATA_MARKER).exists():
        notes, summary = dashboard_notes(folder)
        attach_explanations(dashboard, notes, summary)
        say(f"the dashboard {dashboard} shows them")


def neuronpedia_explanations(folder, model_id: str, layer: str) -> list[dict]:
    """The explanations in ``folder`` as Neuronpedia's explanation records (``modelId``, ``layer`` as in its
    SAE ids, e.g. ``8-res-jb``, ``index``, ``description``, ``explanationModelName``, ``typeName``)."""
    notes, _ = dashboard_notes(folder)
    records = []
    for feature, note in sorted(notes.items()):
        if not note["explanation"]:
            continue
        records.append({"modelId": model_id, "layer": layer, "index": str(feature), "description": note["explanation"],
                        "explanationModelName": note["explainer"], "typeName": "saelab-token-activations"})
        if "detection" in note:
            records[-1]["scores"] = {"detection": note["detection"], "fuzzing": note["fuzzing"]}
    return records
