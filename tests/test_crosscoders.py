"""Crosscoders: one dictionary over several hook points, its latents read from all of them and written to each."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import assert_resumes_exactly, mean_max_cosine
from saelab.cli import main
from saelab.data import TensorSource
from saelab.distributed import DataParallel
from saelab.sae import SAEConfig, TrainStep, all_architectures, create_sae, load_sae
from saelab.training import TrainConfig, Trainer
from saelab.training.lockstep import SharedBuffer
from saelab.training.trainer import training_buffer

D, LAYERS = 24, 3
HOOKS = "+".join(f"blocks.{layer}.hook_resid_post" for layer in range(LAYERS))
SPARSITY = {"topk": {"k": 3}, "batchtopk": {"k": 3}, "matryoshka_batchtopk": {"k": 3}, "jumprelu": {"target_l0": 3},
            "standard": {"l1_coefficient": 1.0}, "gated": {"l1_coefficient": 1.0}, "abstopk": {"k": 3}}


def shared_features(n: int, n_features: int = 48, active: int = 3, seed: int = 1000):
    """Three layers' activations from the same sparse features: layer l is ``w @ D_l`` at its own scale (the
    residual stream grows with depth), so each latent must write the right direction at every layer."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.rand(n, n_features, generator=g).argsort(dim=1)[:, :active]
    w = torch.zeros(n, n_features).scatter_(1, chosen, 0.5 + torch.rand(n, active, generator=g))
    directions = [torch.randn(n_features, D, generator=g) for _ in range(LAYERS)]
    directions = [d / d.norm(dim=1, keepdim=True) for d in directions]
    return [w @ d * (1 + 4 * layer) for layer, d in enumerate(directions)], directions


def crosscoder_trainer(cfg: TrainConfig, layers: list[torch.Tensor], run_dir) -> Trainer:
    """A Trainer reading the layers side by side from one buffer, as ``saelab.training.train`` sets it up."""
    columns = {f"blocks.{i}.hook_resid_post": slice(i * D, (i + 1) * D) for i in range(LAYERS)}
    source = TensorSource(torch.cat(layers, 1), rows_per_unit=1000, columns=columns)
    view = SharedBuffer(training_buffer(source, cfg, DataParallel(), torch.device("cpu"))).view(list(columns.values()))
    return Trainer(cfg, view, run_dir, buffer=view)


def config(tmp_path, **overrides) -> TrainConfig:
    base = dict(out=str(tmp_path), kind="crosscoder", hook=HOOKS, architecture="topk", k=3, d_sae=96, tokens=100_000,
                batch_size=256, lr=3e-3, buffer_tokens=8192, dead_window_tokens=5_000, checkpoint_every_tokens=5_000,
                log_every=10, progress=False, seed=0)
    return TrainConfig(**{**base, **overrides})


def test_a_crosscoder_recovers_shared_features_at_every_layer(tmp_path):
    layers, directions = shared_features(20_000)
    sae = crosscoder_trainer(config(tmp_path), layers, tmp_path).run().sae
    assert (sae.cfg.kind, sae.cfg.n_hooks, sae.cfg.d_in) == ("crosscoder", LAYERS, LAYERS * D)
    decoders = sae.W_dec.detach().view(96, LAYERS, D)
    # the latent that writes a feature at one layer is the one that writes it at the others
    best = [(d @ (decoders[:, i] / decoders[:, i].norm(dim=1, keepdim=True)).T).max(dim=1)
            for i, d in enumerate(directions)]
    for i, d in enumerate(directions):
        assert mean_max_cosine(d, decoders[:, i]) >= 0.9, i
    assert (best[0].indices == best[2].indices).float().mean() >= 0.9
    x = torch.cat(layers, 1)[:4000]
    with torch.no_grad():  # in raw units: each layer's own scale is folded in
        for i in range(LAYERS):
            part = slice(i * D, (i + 1) * D)
            error = (sae(x)[:, part] - x[:, part]).pow(2).sum() / (x[:, part] - x[:, part].mean(0)).pow(2).sum()
            assert error < 0.15, (i, error)


CASES = [arch.name for arch in all_architectures() if not arch.module.tied_encoder]


@pytest.mark.parametrize("architecture", CASES)
def test_every_architecture_trains_resumes_and_round_trips_as_a_crosscoder(architecture, tmp_path):
    layers, _ = shared_features(6_000)
    make = lambda folder: crosscoder_trainer(config(folder, architecture=architecture, tokens=12_800,
                                                    **SPARSITY[architecture]), layers, folder)
    full = assert_resumes_exactly(make, tmp_path)
    sae = full.sae
    sae.cfg.metadata.update(hook_name=HOOKS, hook_names=HOOKS.split("+"))
    sae.save(tmp_path / "folder")
    raw = json.loads((tmp_path / "folder" / "cfg.json").read_text())
    assert raw["architecture"].endswith("crosscoder") and raw["n_hooks"] == LAYERS
    with safe_open(tmp_path / "folder" / "sae_weights.safetensors", "pt") as weights:  # per-hook tensors
        assert weights.get_slice("W_enc").get_shape() == [LAYERS, D, 96]
        assert weights.get_slice("W_dec").get_shape() == [96, LAYERS, D]
        assert weights.get_slice("b_dec").get_shape() == [LAYERS, D]
        assert torch.equal(weights.get_tensor("W_dec")[:, 1], sae.W_dec.detach()[:, D:2 * D])
    loaded = load_sae(tmp_path / "folder")
    x = torch.cat(layers, 1)[:500]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(x))


def test_the_l1_penalty_weighs_a_latent_by_the_sum_of_its_decoder_norms():
    sae = create_sae(SAEConfig(d_in=3 * 4, d_sae=5, architecture="standard", kind="crosscoder", n_hooks=3),
                     training=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(7, 12, generator=g)
    out = sae.training_forward(x, TrainStep())
    f = sae.encode(x)
    per_hook = torch.stack([sae.W_dec[:, i * 4:(i + 1) * 4].norm(dim=1) for i in range(3)]).sum(0)
    torch.testing.assert_close(out.parts["l1"], (f * per_hook).sum(-1).mean())
    assert not torch.allclose(per_hook, sae.W_dec.norm(dim=1))  # not the norm of the whole row


def test_crosscoder_configs_and_their_errors():
    assert TrainConfig(kind="crosscoder").hooks == [f"blocks.{b}.hook_resid_post" for b in (3, 6, 9)]
    with pytest.raises(ValueError, match="reads several hook points"):
        TrainConfig(kind="crosscoder", hook="blocks.3.hook_resid_post")
    with pytest.raises(ValueError, match="pass --kind crosscoder"):
        TrainConfig(hook="blocks.3.hook_resid_post+blocks.4.hook_resid_post")
    with pytest.raises(ValueError, match="cannot be a crosscoder"):
        TrainConfig(kind="crosscoder", architecture="matching_pursuit")


def test_train_and_eval_a_crosscoder_through_the_cli(tiny_model_dir, text_file, tmp_path, capsys):
    run = tmp_path / "cc"
    assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(text_file), "--kind", "crosscoder",
                 "--layers", "0-2", "--k", "8", "--d-sae", "128", "--tokens", "8192", "--batch-size", "256",
                 "--context-size", "64", "--eval-tokens", "1024", "--out", str(run), "--no-progress"]) == 0
    sae = load_sae(run / "final")
    assert sae.cfg.n_hooks == 3 and sae.cfg.metadata["hook_names"] == HOOKS.split("+")
    trained = json.loads((run / "eval.json").read_text())
    assert 0 < trained["fvu"] < 1.5
    capsys.readouterr()
    assert main(["eval", str(run), "--dataset", str(text_file), "--tokens", "2048", "--context-size", "64"]) == 0
    report = json.loads((run / f"eval-{text_file.stem}" / "metrics.json").read_text())
    assert list(report["by_hook"]) == HOOKS.split("+")
    for row in report["by_hook"].values():
        assert 0 < row["fvu"] < 1.5 and "ce_loss_score" in row
    # with the last residual stream replaced, what came before it no longer matters: all together = the last alone
    assert report["ce_with_sae"] == pytest.approx(report["by_hook"]["blocks.2.hook_resid_post"]["ce_with_sae"])
    summary = (run / f"eval-{text_file.stem}" / "summary.md").read_text()
    assert "Each hook of the crosscoder" in summary and "`blocks.1.hook_resid_post`" in summary
    check_reading_commands(run, text_file, capsys)


def check_reading_commands(run, text_file, capsys):
    """The reading commands on a dictionary over several hooks (a crosscoder or a CLT): features per token, logit
    effects, steering at every hook it writes, attribution at the last one, the dashboard with decoder norms."""
    from saelab.analysis import attribute, load_sae_and_model, steer, token_features
    from saelab.models import capture

    capsys.readouterr()
    assert main(["features", str(run), "--text", "hello world", "--logits", "3"]) == 0
    out = capsys.readouterr().out
    assert "top features" in out and "feature 3: logit change" in out
    loaded = load_sae_and_model(run)
    sae = loaded.sae
    # Features per token are the encoding of the hooks side by side.
    rows = token_features(loaded, "hello world", top=3)
    tokens = loaded.tokenize("hello world")
    acts = capture(loaded.model, tokens, loaded.reads)
    expected = sae.encode(torch.cat([acts[h.name] for h in loaded.reads], -1)[0].float()).detach()
    for row in rows:
        for feature, value in row.features:
            assert value == pytest.approx(float(expected[row.position, feature]), abs=1e-5)
    # Steering adds the feature's part at each hook it writes: a strong one changes the continuation.
    result = steer(loaded, "hello", feature=int(expected.sum(0).argmax()), strength=50.0, max_new_tokens=6)
    assert result.steered != result.plain
    # Clamping on clean runs: a latent silent on the text clamped to 0 changes nothing (every hook written gets
    # its clean activation back); clamped to a value, each hook gets its clean activation + the decoded change.
    from saelab.analysis.steering import clamped_hook_values

    silent = int((expected == 0).all(0).nonzero()[0])
    values = clamped_hook_values(loaded, tokens, silent, 0.0)
    clean = capture(loaded.model, tokens, loaded.written)
    for hook in loaded.written:
        assert torch.equal(values[hook.name], clean[hook.name].float())
    values = clamped_hook_values(loaded, tokens, silent, 3.0)
    for j, hook in enumerate(loaded.written):
        torch.testing.assert_close(values[hook.name] - clean[hook.name].float(),
                                   (3.0 * sae.decoder_by_hook()[silent, j]).expand_as(values[hook.name]).detach())
    result = steer(loaded, "hello world", feature=silent, clamp=0.0, max_new_tokens=1)  # only the prompt matters
    assert result.steered_ids == result.plain_ids
    assert main(["steer", str(run), "--feature", str(silent), "--clamp", "40", "--prompt", "hi",
                 "--max-new-tokens", "4"]) == 0
    assert "clamped to 40" in capsys.readouterr().out
    # Attribution at the last hook written: the parts add up to the total, the error is x - x_hat there.
    parts = attribute(loaded, "hello world", " the")
    assert parts.total == pytest.approx(parts.feature_sum + parts.error + parts.bias, abs=1e-4)
    assert parts.activations.tolist() == pytest.approx(expected[-1].tolist(), abs=1e-5)
    # The dashboard: pages of the encoding of all hooks, each latent's decoder norm at each hook it writes.
    assert main(["dashboard", str(run), "--dataset", str(text_file), "--tokens", "1024"]) == 0
    data = run / "dashboard" / "data"
    index = json.loads(data.joinpath("index.js").read_text()[len("saelabIndex("):-3])
    assert index["sae"]["writes"] == [h.name for h in loaded.written] and index["sae"]["kind"] == sae.cfg.kind
    page = json.loads(data.joinpath("features-0.js").read_text()[len("saelabFeatures("):-3])["features"]["0"]
    norms = sae.decoder_norms_by_hook()[0].tolist()
    assert page["decoder_norms"] == pytest.approx(norms, rel=1e-2, abs=1e-6)
    return page
