"""AbsTopK (signed top-k by magnitude) and matching pursuit (greedy codes over the decoder rows, no encoder)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import mean_max_cosine, synthetic_activations
from saelab.data import TensorSource
from saelab.sae import SAEConfig, TrainStep, create_sae, load_sae
from saelab.sae.base import normalized_error
from saelab.sae.matching_pursuit import MatchingPursuitSettings
from saelab.training import TrainConfig, Trainer


def signed_data(n: int, d_in: int = 32, n_features: int = 48, active: int = 3, seed: int = 1000):
    """Rows that are sparse combinations of known unit directions with coefficients of either sign."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_features, d_in, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    chosen = torch.rand(n, n_features, generator=g).argsort(dim=1)[:, :active]
    signs = torch.randint(0, 2, (n, active), generator=g) * 2 - 1
    w = torch.zeros(n, n_features).scatter_(1, chosen, signs * (0.5 + torch.rand(n, active, generator=g)))
    return w @ directions, directions


def train(tmp_path, data, **overrides):
    cfg = TrainConfig(**{**dict(out=str(tmp_path), d_sae=48, tokens=150_000, batch_size=256, lr=3e-3,
                                buffer_tokens=8192, dead_window_tokens=20_000, checkpoint_every_tokens=50_000,
                                log_every=20, progress=False, b_dec_init="zeros"), **overrides})
    return Trainer(cfg, TensorSource(data, rows_per_unit=1024), tmp_path).run().sae


# --- AbsTopK ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sae", "skip_transcoder"])
def test_abstopk_training_kernels_equal_dense_autograd(kind):
    cfg = SAEConfig(d_in=16, d_sae=64, architecture="abstopk", k=4, kind=kind, d_out=None if kind == "sae" else 12)
    sae = create_sae(cfg, training=True)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(256, 16, generator=g)
    sae.initialize(sample, "mean", g, target=None if kind == "sae" else torch.randn(256, 12, generator=g))
    if kind != "sae":
        with torch.no_grad():
            sae.W_skip.normal_(generator=g)
    x = torch.randn(32, 16, generator=g)
    y = x if kind == "sae" else torch.randn(32, 12, generator=g)
    out = sae.training_forward(x, TrainStep(), None if kind == "sae" else y)
    out.loss.backward()
    dense = create_sae(cfg, training=True)
    dense.load_state_dict(sae.state_dict())
    pre = dense.encode_pre(x)
    chosen = pre.abs().topk(4, dim=-1).indices
    codes = torch.zeros_like(pre).scatter(-1, chosen, pre.gather(-1, chosen))  # signed, no ReLU
    normalized_error(codes @ dense.W_dec + dense.b_dec + dense.skip(x) - y, y).backward()
    for (name, a), b in zip(sae.named_parameters(), dense.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert (sae.encode(x) < 0).any() and ((sae.encode(x) != 0).sum(-1) == 4).all()
    assert torch.equal(out.fired, (sae.encode(x) != 0).sum(0))


@pytest.mark.slow
def test_abstopk_uses_one_latent_for_a_feature_of_either_sign(tmp_path):
    """Features that appear with both signs: AbsTopK's 48 latents cover the 48 (one each, firing both ways),
    where TopK's ReLU codes can reconstruct only the positive half of each with as many latents."""
    data, directions = signed_data(40_000)
    abstopk = train(tmp_path / "abs", data, architecture="abstopk", k=3)
    topk = train(tmp_path / "topk", data, architecture="topk", k=3)
    x = data[:4000]
    fvu = {name: float((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
           for name, sae in (("abstopk", abstopk), ("topk", topk))}
    cosines = (directions @ (abstopk.W_dec / abstopk.W_dec.norm(dim=1, keepdim=True)).T.detach()).abs()
    assert cosines.max(dim=1).values.mean() >= 0.9
    assert fvu["abstopk"] < 0.5 * fvu["topk"], fvu


# --- matching pursuit ---------------------------------------------------------------------------------------

def pursuit_by_hand(x, W_dec, b_dec, iterations, threshold):
    """SAELens's rule, token by token: pick argmax of relu(residual . rows), add relu(projection) to that latent,
    subtract; stop after ``iterations``, when the residual norm is below ``threshold`` or a step adds no latent."""
    codes = torch.zeros(len(x), len(W_dec))
    for t in range(len(x)):
        residual = x[t] - b_dec
        for _ in range(iterations):
            index = int((residual @ W_dec.T).relu().argmax())
            value = float((residual @ W_dec[index]).relu())
            before = codes[t] != 0
            codes[t, index] += value
            residual = residual - value * W_dec[index]
            if torch.equal(codes[t] != 0, before) or residual.norm() < threshold:
                break
    return codes


def pursuit_sae(iterations=6, threshold=0.0, seed=0):
    settings = MatchingPursuitSettings(max_iterations=iterations, residual_threshold=threshold)
    sae = create_sae(SAEConfig(d_in=16, d_sae=40, architecture="matching_pursuit", **settings.sae_config()),
                     training=True, settings=settings)
    g = torch.Generator().manual_seed(seed)
    sae.initialize(torch.randn(128, 16, generator=g), "mean", g)
    return sae


@pytest.mark.parametrize("iterations,threshold", [(6, 0.0), (12, 1.5), (40, 0.0)])
def test_pursuit_codes_follow_the_rule_step_by_step(iterations, threshold):
    sae = pursuit_sae(iterations, threshold)
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        codes = sae.encode(x)
        torch.testing.assert_close(codes, pursuit_by_hand(x, sae.W_dec, sae.b_dec, iterations, threshold),
                                   atol=1e-5, rtol=1e-5)
        assert (codes != 0).sum(-1).max() <= iterations and (codes >= 0).all()
        torch.testing.assert_close(sae(x), codes @ sae.W_dec + sae.b_dec)
    assert "W_enc" not in dict(sae.named_parameters()) and torch.equal(sae.W_enc, sae.W_dec.T)


def test_pursuit_learns_the_planted_dictionary_and_saves_its_own_fields(tmp_path):
    data, directions = synthetic_activations(20_000, d_in=64, n_features=128, active=3)  # non-negative codes
    sae = train(tmp_path / "run", data, architecture="matching_pursuit", max_iterations=3, d_sae=128, tokens=100_000,
                residual_threshold=0.1, log_every=1)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["fvu"] < 0.3 * records[0]["fvu"] and records[-1]["l0"] <= 3
    assert mean_max_cosine(directions, sae.W_dec.detach()) >= 0.95
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))
    sae.save(tmp_path / "folder")
    raw = json.loads((tmp_path / "folder" / "cfg.json").read_text())
    assert raw["architecture"] == "matching_pursuit" and raw["max_iterations"] == 3
    assert raw["stop_on_duplicate_support"] is True
    # the threshold was given in training units and is saved in raw ones (the input scale folded in)
    scale = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["scale"]
    assert raw["residual_threshold"] == pytest.approx(0.1 / scale)
    loaded = load_sae(tmp_path / "folder")
    x = data[:300]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(x))
        assert float((loaded(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()) < 0.1


def test_pursuit_cannot_be_a_transcoder():
    with pytest.raises(ValueError, match="cannot be a transcoder"):
        create_sae(SAEConfig(d_in=8, d_sae=16, architecture="matching_pursuit", kind="transcoder", d_out=8))
