"""`saelab sweep` end to end on a tiny local model: one activation pass shared by every grid point,
a table with a row per point, the Pareto plot, reuse of finished runs."""

import csv
import json

import pytest

from saelab.cli import main
from saelab.data import activations
from saelab.options import parse_list
from saelab.training.sweep import COLUMNS, SweepConfig, base_config, grid

TOKENS = 4096


@pytest.fixture
def count_forwards(monkeypatch):
    """Counts LMActivationSource.units calls (a pass of the model over the training text) and the model
    forwards they run."""
    counts = {"units": 0, "forwards": 0}
    original_units, original_capture = activations.LMActivationSource.units, activations.capture

    def units(self, start):
        counts["units"] += 1
        return original_units(self, start)

    def capture(*args, **kwargs):
        counts["forwards"] += 1
        return original_capture(*args, **kwargs)

    monkeypatch.setattr(activations.LMActivationSource, "units", units)
    monkeypatch.setattr(activations, "capture", capture)
    return counts


def sweep_args(model_dir, text_file, out):
    return ["sweep", "--model", str(model_dir), "--dataset", str(text_file), "--out", str(out),
            "--architectures", "topk,standard", "--k", "2,4", "--l1-coefficients", "1,10", "--tokens", str(TOKENS),
            "--batch-size", "256", "--lr", "3e-3", "--context-size", "32", "--lm-batch-size", "8",
            "--buffer-tokens", "4096", "--eval-tokens", "256", "--hook", "blocks.1.hook_resid_post", "--expansion", "4",
            "--no-progress", "--log-every", "4", "--dead-window-tokens", "1024"]


@pytest.mark.slow
def test_sweep_end_to_end_collects_activations_once(tiny_model_dir, text_file, tmp_path, count_forwards, capsys):
    out = tmp_path / "sweep"
    assert main(sweep_args(tiny_model_dir, text_file, out)) == 0
    assert count_forwards["units"] == 1                 # one pass over the training text for all 4 SAEs
    # That pass ran only as many forwards (8 contexts of 32 tokens each) as the rows it needed.
    assert count_forwards["forwards"] <= 2 + TOKENS // (8 * 30) + 1

    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["architecture"], r["sparsity_setting"]) for r in rows] == [
        ("topk", "k=2"), ("topk", "k=4"), ("standard", "l1_coefficient=1"), ("standard", "l1_coefficient=10")]
    for row in rows:
        assert set(COLUMNS) <= set(row)
        for key in ("l0", "explained_variance", "ce_loss_score", "dead_fraction", "wall_seconds"):
            assert row[key] != "" and float(row[key]) == float(row[key]), (row["run"], key)
        assert (out / row["run"] / "final" / "cfg.json").exists()
        assert (out / row["run"] / "eval.json").exists()
    assert 0 < float(rows[0]["l0"]) <= 2 and 2 < float(rows[1]["l0"]) <= 4
    assert float(rows[3]["l0"]) < float(rows[2]["l0"])  # the larger L1 coefficient is sparser
    assert [r["dead_latent_remedy"] for r in rows] == ["auxk", "auxk", "none", "none"]

    md = (out / "results.md").read_text()
    assert md.count("\n| topk |") == 2 and md.count("\n| standard |") == 2
    assert "CE-loss recovered" in md and "explained variance" in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["activation_rows"] == TOKENS and summary["completed"]
    assert "results.md" in capsys.readouterr().err

    # Running it again reuses every finished run: no activation pass, same table.
    count_forwards["units"] = 0
    assert main(sweep_args(tiny_model_dir, text_file, out)) == 0
    assert count_forwards["units"] == 0
    with open(out / "results.csv") as handle:
        assert list(csv.DictReader(handle)) == rows

    # A sweep stopped after training, before the shared evaluation: the rerun trains nothing (no activation
    # pass) and evaluates the saved SAEs to the same figures.
    for row in rows:
        (out / row["run"] / "sweep_row.json").unlink()
        assert (out / row["run"] / "trained.json").exists()
    assert main(sweep_args(tiny_model_dir, text_file, out)) == 0
    assert count_forwards["units"] == 0
    with open(out / "results.csv") as handle:
        again = list(csv.DictReader(handle))
    for before, after in zip(rows, again):
        for key in ("l0", "explained_variance", "ce_loss_score", "dead_fraction", "train_seconds"):
            assert float(after[key]) == pytest.approx(float(before[key]), rel=1e-5), (before["run"], key)

    # --suite geometry adds its columns, to reused rows too (from their final/ SAEs; still no activation pass).
    assert main([*sweep_args(tiny_model_dir, text_file, out), "--suite", "geometry"]) == 0
    assert count_forwards["units"] == 0
    with open(out / "results.csv") as handle:
        with_geometry = list(csv.DictReader(handle))
    for row in with_geometry:
        assert -1 <= float(row["max_decoder_cosine_mean"]) <= 1 and int(row["near_duplicate_latents"]) >= 0
        assert -1 <= float(row["encoder_decoder_cosine_mean"]) <= 1
    assert "near-duplicates" in (out / "results.md").read_text()

    # --suite absorption,probing: their columns for the finished rows (the model loaded, no training pass).
    assert main([*sweep_args(tiny_model_dir, text_file, out), "--suite", "geometry,absorption,probing"]) == 0
    assert count_forwards["units"] == 0
    with open(out / "results.csv") as handle:
        judged = list(csv.DictReader(handle))
    for before, row in zip(with_geometry, judged):
        assert row["max_decoder_cosine_mean"] == before["max_decoder_cosine_mean"]  # kept, not recomputed
        assert 0.3 <= float(row["sae_top_1_test_accuracy"]) <= 1 and 0.3 <= float(row["sae_top_5_test_accuracy"]) <= 1
        # the tiny random model does not spell: no letter is scored (empty cells), see test_absorption.py
        assert row["mean_num_split_features"] == "" or 1 <= float(row["mean_num_split_features"]) <= 10
        saved = json.loads((out / row["run"] / "sweep_row.json").read_text())["row"]
        assert "sae_top_1_test_accuracy" in saved and "mean_absorption_fraction_score" in saved
    md = (out / "results.md").read_text()
    assert "probe top-1" in md and "absorption" in md
    assert set(json.loads((out / "sweep.json").read_text())["suite_seconds_per_sae"]) == {"absorption", "probing"}
    assert main([*sweep_args(tiny_model_dir, text_file, out), "--suite", "spelling"]) == 2


def test_grid_and_defaults():
    scfg = SweepConfig(architectures="topk,matryoshka,jumprelu,gated,standard",
                       values={"k": "8,16", "target_l0": "10", "l1_coefficient": "1_0,2.5"}, out="x")
    base = base_config(scfg, tokens=1000, batch_size=100, buffer_tokens=1000, dead_latent_remedy="ghost_grads")
    assert base.architecture == "standard"
    points = grid(scfg, base)
    assert [p.name for p in points] == ["topk-k8", "topk-k16", "matryoshka_batchtopk-k8", "matryoshka_batchtopk-k16",
                                        "jumprelu-target_l0_10", "gated-l1_10", "gated-l1_2.5", "standard-l1_10",
                                        "standard-l1_2.5"]
    assert points[1].cfg.k == 16 and points[4].cfg.target_l0 == 10 and points[6].cfg.l1_coefficient == 2.5
    assert all(p.cfg.tokens == 1000 for p in points)
    # ghost grads apply where they can (standard); the others fall back to their automatic remedy
    assert [p.cfg.remedy for p in points] == ["auxk"] * 4 + ["none"] * 3 + ["ghost_grads"] * 2
    assert str(points[0].cfg.out).endswith("topk-k8")
    # Without --l1-coefficients each L1 architecture gets its own calibrated list (gated penalises another
    # quantity than standard); a given list applies to both.
    default = SweepConfig(architectures="gated,standard")
    assert [(p.architecture, p.value) for p in grid(default, base_config(default))] == [
        ("gated", 2.0), ("gated", 4.0), ("gated", 8.0), ("standard", 2.0), ("standard", 5.0), ("standard", 10.0)]
    assert parse_list("16, 32,64", int) == [16, 32, 64]
    assert SweepConfig().architectures == "topk,batchtopk,jumprelu,gated,standard"
    with pytest.raises(ValueError, match="ghost_grads applies to standard"):
        base_config(SweepConfig(architectures="topk,gated"), dead_latent_remedy="ghost_grads")
    with pytest.raises(ValueError, match="unknown architecture"):
        SweepConfig(architectures="topk,relu")
    with pytest.raises(ValueError, match="cannot read"):
        SweepConfig(values={"k": "16,big"})
