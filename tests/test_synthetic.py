"""Synthetic activations with known features, and the scores of an SAE against them."""

import itertools
import json

import pytest
import torch

from saelab.cli import main
from saelab.data.activations import shard_of
from saelab.data.synthetic import SYNTH_16K, SyntheticConfig, SyntheticFeatures, SyntheticSource
from saelab.evals.ground_truth import ground_truth_metrics
from saelab.sae import SAEConfig, create_sae


def sae_with(decoder: torch.Tensor, encoder: torch.Tensor, b_enc: float = 0.0):
    sae = create_sae(SAEConfig(d_in=decoder.shape[1], d_sae=decoder.shape[0], architecture="standard"))
    with torch.no_grad():
        sae.W_dec.copy_(decoder)
        sae.W_enc.copy_(encoder)
        sae.b_enc.fill_(b_enc)
        sae.b_dec.zero_()
    return sae


def test_the_true_dictionary_scores_one_and_a_random_one_near_chance():
    features = SyntheticFeatures(SyntheticConfig(d_in=32, n_features=32, mean_l0=4, hierarchy_fraction=0.25,
                                                 correlation_rank=2, correlation_strength=0.3))
    # Orthogonal true directions: the transposed dictionary reads every magnitude back exactly; the small
    # negative bias keeps rounding noise (1e-8) from counting as firing.
    perfect = ground_truth_metrics(sae_with(features.directions, features.directions.T, b_enc=-1e-3), features, 8192)
    assert perfect["mcc"] == pytest.approx(1.0, abs=1e-5) and perfect["uniqueness"] == 1.0
    assert perfect["f1"] > 0.99 and perfect["explained_variance"] > 0.999
    assert perfect["l0"] == pytest.approx(perfect["true_l0"], rel=0.01)
    g = torch.Generator().manual_seed(1)
    chance = ground_truth_metrics(sae_with(torch.randn(32, 32, generator=g), torch.randn(32, 32, generator=g)),
                                  features, 8192)
    assert chance["mcc"] < 0.5 and chance["f1"] < 0.3 and chance["explained_variance"] < 0


def test_the_scores_equal_a_direct_computation():
    features = SyntheticFeatures(SyntheticConfig(d_in=8, n_features=4, mean_l0=1.5, rows_per_unit=500))
    g = torch.Generator().manual_seed(3)
    sae = sae_with(torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g), b_enc=-0.2)
    got = ground_truth_metrics(sae, features, 1000)
    decoder = (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)).detach()
    cosine = decoder @ features.directions.T
    best = max(itertools.permutations(range(4)), key=lambda p: sum(float(cosine[j, p[j]]) for j in range(4)))
    assert got["mcc"] == pytest.approx(sum(float(cosine[j, best[j]]) for j in range(4)) / 4, abs=1e-6)
    x, codes = (torch.cat(parts) for parts in zip(*(features.sample(u, split="eval") for u in range(2))))
    with torch.no_grad():
        fired, true = sae.encode(x) > 0, codes > 0
        x_hat = sae(x)
    f1s = []
    for j in range(4):
        i = best[j]
        if not true[:, i].any():
            continue
        tp = float((fired[:, j] & true[:, i]).sum())
        precision, recall = tp / max(1, float(fired[:, j].sum())), tp / float(true[:, i].sum())
        f1s.append(0 if tp == 0 else 2 * precision * recall / (precision + recall))
    assert got["f1"] == pytest.approx(sum(f1s) / len(f1s), abs=1e-6)
    fvu = float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert got["explained_variance"] == pytest.approx(1 - fvu, abs=1e-5)
    assert got["l0"] == pytest.approx(float(fired.sum(1).float().mean()), abs=1e-6)


def test_children_fire_only_with_their_parent_and_siblings_exclusively():
    cfg = SyntheticConfig(d_in=16, n_features=64, mean_l0=10, zipf_exponent=0.0, hierarchy_fraction=0.5,
                          children_per_parent=4)
    features = SyntheticFeatures(cfg)
    _, codes = features.sample(0)
    on = codes > 0
    children = (features.parent >= 0).nonzero().squeeze(1)
    assert len(children) == 32
    assert not (on[:, children] & ~on[:, features.parent[children]]).any()
    for parent in features.parent[children].unique():
        siblings = (features.parent == parent).nonzero().squeeze(1)
        assert int(on[:, siblings].sum(1).max()) <= 1
    assert on[:, children].any()  # and they do fire
    free = SyntheticFeatures(SyntheticConfig(**{**cfg.__dict__, "exclusive_siblings": False}))
    _, codes = free.sample(0)
    assert int((codes[:, children] > 0).view(len(codes), -1, 4).sum(2).max()) > 1


def test_frequencies_follow_the_config_and_correlations_appear_when_asked():
    independent = SyntheticFeatures(SyntheticConfig(d_in=32, n_features=128, mean_l0=6, zipf_exponent=1.0))
    _, codes = independent.sample(0)
    on = (codes > 0).float()
    assert float(on.sum(1).mean()) == pytest.approx(6, rel=0.05)
    assert float(on[:, :8].mean()) > 5 * float(on[:, -64:].mean())  # Zipf: the first features are frequent

    def mean_abs_correlation(on):
        common = on[:, :16]
        return float(torch.corrcoef(common.T).nan_to_num().abs().fill_diagonal_(0).mean())

    correlated = SyntheticFeatures(SyntheticConfig(d_in=32, n_features=128, mean_l0=6, zipf_exponent=1.0,
                                                   correlation_rank=2, correlation_strength=0.8))
    assert mean_abs_correlation((correlated.sample(0)[1] > 0).float()) > 3 * mean_abs_correlation(on)


def test_the_data_is_regenerated_from_the_saved_config_one_unit_at_a_time(tmp_path):
    cfg = SyntheticConfig(d_in=16, n_features=40, mean_l0=3, hierarchy_fraction=0.2, correlation_rank=1,
                          correlation_strength=0.2, bias_norm=2.0, noise_std=0.01, rows_per_unit=64, seed=5)
    cfg.save(tmp_path / "synthetic.json")
    again = SyntheticFeatures(SyntheticConfig.load(tmp_path / "synthetic.json"))
    first = SyntheticFeatures(cfg)
    assert torch.equal(first.directions, again.directions)
    assert torch.equal(list(SyntheticSource(first, 4).units(0))[3], next(SyntheticSource(again, 4).units(3)))
    assert torch.equal(next(shard_of(SyntheticSource(again, 4), 1, 2).units(1)), first.sample(3)[0])  # unit 1 + 2
    assert not torch.equal(first.sample(0)[0], first.sample(0, split="eval")[0])
    assert float(first.bias.norm()) == pytest.approx(2.0)
    (tmp_path / "bad.json").write_text(json.dumps({"d_in": 4, "n_featurez": 3}))
    with pytest.raises(ValueError, match="unknown synthetic-data settings n_featurez"):
        SyntheticConfig.load(tmp_path / "bad.json")


def test_the_16k_reference_configuration_is_described():
    assert (SYNTH_16K.n_features, SYNTH_16K.d_in, SYNTH_16K.mean_l0) == (16_384, 768, 30.0)
    with pytest.raises(ValueError, match="hierarchy_fraction"):
        SyntheticConfig(hierarchy_fraction=1.5)


EASY = ["--d-in", "32", "--n-features", "64", "--mean-l0", "3", "--zipf-exponent", "0.3"]


def test_train_and_sweep_on_synthetic_data_report_the_ground_truth_scores(tmp_path, capsys):
    config = tmp_path / "synthetic.json"
    assert main(["synth", *EASY, "--out", str(config)]) == 0
    assert "true L0" in capsys.readouterr().out
    run = ["--synthetic", str(config), "--d-sae", "64", "--tokens", "300000", "--batch-size", "1024",
           "--eval-tokens", "8192", "--no-progress"]
    assert main(["train", *run, "--k", "3", "--out", str(tmp_path / "run")]) == 0
    scores = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert scores["mcc"] > 0.9 and scores["f1"] > 0.5 and scores["true_l0"] == pytest.approx(3, rel=0.1)
    meta = json.loads((tmp_path / "run" / "final" / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == "synthetic" and meta["synthetic_config"]["n_features"] == 64

    assert main(["sweep", *run, "--tokens", "100000", "--architectures", "topk,standard", "--k", "2,4",
                 "--l1-coefficient", "1", "--suite", "geometry", "--out", str(tmp_path / "sweep")]) == 0
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert "| MCC | F1 |" in table and "true L0" in table and "near-duplicates" in table
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"]
    assert len(rows) == 3 and all(0 <= row["mcc"] <= 1 and row["f1"] is not None for row in rows)
    assert (tmp_path / "sweep" / "pareto.png").stat().st_size > 0


def test_eval_scores_an_sae_against_the_data_it_was_trained_on(tmp_path, capsys):
    config = tmp_path / "synthetic.json"
    assert main(["synth", *EASY, "--out", str(config)]) == 0
    assert main(["train", "--synthetic", str(config), "--d-sae", "64", "--k", "3", "--tokens", "100000",
                 "--batch-size", "1024", "--eval-tokens", "0", "--no-progress", "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--suite", "synthetic,geometry", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mcc"] > 0.8 and "f1" in data and data["geometry"]["near_duplicate_latents"] >= 0
    assert data["eval"]["model"] == "synthetic"


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "gated", "standard"])
def test_a_fitted_start_is_sane_at_two_widths(architecture, tmp_path):
    """--fit-init (the default): every architecture's first steps reconstruct with FVU below 1 at 8x and 64x, JumpReLU
    starts at its target L0 (a fixed starting threshold gives it hundreds of latents at 64x), standard and gated SAEs
    near 32 (zero biases fire half of all latents: 1,024 at 64x)."""
    from saelab.training import TrainConfig, train
    from saelab.training.trainer import read_metrics

    path = tmp_path / "synthetic.json"
    SyntheticConfig(d_in=32, n_features=256, mean_l0=6, rows_per_unit=1024).save(path)
    sparsity = {"target_l0": 8} if architecture == "jumprelu" else {"k": 8} if "topk" in architecture else {}
    for width in (8, 64):
        out = tmp_path / f"{architecture}-{width}"
        train(TrainConfig(synthetic=str(path), hook="synthetic", architecture=architecture, expansion=width,
                          tokens=1024 * 10, batch_size=1024, log_every=1, eval_tokens=0, progress=False,
                          fit_init=True, out=str(out), **sparsity))
        first = [row for row in read_metrics(out / "metrics.jsonl") if "fvu" in row][:5]
        assert len(first) == 5
        assert max(row["fvu"] for row in first) < 1, (width, [row["fvu"] for row in first])
        l0 = sum(row["l0"] for row in first) / 5
        if architecture == "jumprelu":
            assert 4 <= l0 <= 16, (width, [row["l0"] for row in first])
        if architecture in ("standard", "gated"):  # biases start where START_L0 = 32 fire, not half of all latents
            assert l0 <= 64, (width, [row["l0"] for row in first])
