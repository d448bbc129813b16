"""Transcoders and skip transcoders: every architecture as either kind, trained on pairs of activations (an input
hook and the output hook it predicts), resumed, saved and loaded, and evaluated spliced into a model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_resumes_exactly, mean_max_cosine
from saelab.cli import main
from saelab.data import TensorSource
from saelab.distributed import DataParallel
from saelab.sae import SAE, SAEConfig, all_architectures, create_sae, load_sae
from saelab.sae.format import folder_architecture, parse_folder_architecture
from saelab.training import TrainConfig, Trainer
from saelab.training.lockstep import SharedBuffer
from saelab.training.trainer import training_buffer

D_IN, D_OUT = 32, 24
SPARSITY = {"topk": {"k": 3}, "batchtopk": {"k": 3}, "matryoshka_batchtopk": {"k": 3}, "jumprelu": {"target_l0": 3},
            "standard": {"l1_coefficient": 1.0}, "gated": {"l1_coefficient": 1.0}, "abstopk": {"k": 3}}


def planted_pairs(n: int, n_features: int = 64, active: int = 3, skip: torch.Tensor | None = None, seed: int = 1000):
    """Inputs x = w @ D_in and outputs y = w @ D_out (+ x @ skip.T) from the same sparse non-negative w: the
    features read one direction and write another, as an MLP's do."""
    g = torch.Generator().manual_seed(seed)
    d_read = torch.randn(n_features, D_IN, generator=g)
    d_write = torch.randn(n_features, D_OUT, generator=g)
    d_read, d_write = d_read / d_read.norm(dim=1, keepdim=True), d_write / d_write.norm(dim=1, keepdim=True)
    chosen = torch.rand(n, n_features, generator=g).argsort(dim=1)[:, :active]
    w = torch.zeros(n, n_features).scatter_(1, chosen, 0.5 + torch.rand(n, active, generator=g))
    x = w @ d_read
    y = w @ d_write + (0.0 if skip is None else x @ skip.T)
    return x, y, d_write


def config(tmp_path, **overrides) -> TrainConfig:
    base = dict(out=str(tmp_path), kind="transcoder", hook="in", hook_out="out", architecture="topk", k=3, d_sae=128,
                tokens=20_000, batch_size=256, lr=3e-3, buffer_tokens=8192, dead_window_tokens=5_000,
                checkpoint_every_tokens=5_000, log_every=10, progress=False, seed=0)
    return TrainConfig(**{**base, **overrides})


def pair_trainer(cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, run_dir) -> Trainer:
    """A Trainer reading (x, y) from one buffer, as ``saelab.training.train`` sets it up for two hooks."""
    source = TensorSource(torch.cat([x, y], 1), rows_per_unit=1000,
                          columns={"in": slice(0, D_IN), "out": slice(D_IN, D_IN + D_OUT)})
    view = SharedBuffer(training_buffer(source, cfg, DataParallel(), torch.device("cpu"))).view(
        slice(0, D_IN), slice(D_IN, D_IN + D_OUT))
    return Trainer(cfg, view, run_dir, buffer=view)


def fvu(sae: SAE, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((sae(x) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


# --- recovering planted features -------------------------------------------------------------------------

def test_a_transcoder_recovers_the_directions_its_features_write(tmp_path):
    x, y, d_write = planted_pairs(20_000)
    result = pair_trainer(config(tmp_path, tokens=100_000), x, y, tmp_path).run()
    sae = result.sae
    assert (sae.cfg.kind, sae.cfg.d_in, sae.cfg.output_size) == ("transcoder", D_IN, D_OUT)
    assert mean_max_cosine(d_write, sae.W_dec.detach()) >= 0.9
    assert fvu(sae, x[:4000], y[:4000]) < 0.1


def test_a_skip_transcoder_puts_a_linear_part_of_the_map_in_its_skip_connection(tmp_path):
    # y = w @ D_out + x @ L.T: which linear map the skip takes is not identifiable (the rest can always be written
    # by k latents of a changed dictionary), but having one must reconstruct better than spending latents on it.
    linear = 0.5 * torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(5)) / D_IN**0.5
    x, y, _ = planted_pairs(20_000, skip=linear)
    plain = pair_trainer(config(tmp_path / "plain", tokens=100_000), x, y, tmp_path / "plain").run().sae
    skip = pair_trainer(config(tmp_path / "skip", kind="skip_transcoder", tokens=100_000), x, y,
                        tmp_path / "skip").run().sae
    assert skip.W_skip.shape == (D_OUT, D_IN) and not hasattr(plain, "W_skip")
    with torch.no_grad():  # the skip alone predicts part of y (in raw units: both scales are folded in)
        alone = (x[:4000] @ skip.W_skip.T - y[:4000]).pow(2).sum() / (y[:4000] - y[:4000].mean(0)).pow(2).sum()
        assert alone < 0.98
    assert fvu(skip, x[:4000], y[:4000]) < 0.85 * fvu(plain, x[:4000], y[:4000])


# --- every architecture as either kind --------------------------------------------------------------------

# Every architecture with an encoder of its own (matching pursuit reads with its decoder rows: SAEs only).
CASES = [(arch.name, kind) for arch in all_architectures() if not arch.module.tied_encoder
         for kind in ("transcoder", "skip_transcoder")]


@pytest.mark.parametrize("architecture,kind", CASES)
def test_every_architecture_trains_resumes_and_round_trips_as_each_kind(architecture, kind, tmp_path):
    x, y, _ = planted_pairs(6_000, skip=0.3 * torch.eye(D_OUT, D_IN))
    make = lambda folder: pair_trainer(config(folder, architecture=architecture, kind=kind, tokens=12_800,
                                              **SPARSITY[architecture]), x, y, folder)
    full = assert_resumes_exactly(make, tmp_path)
    sae = full.sae
    assert (sae.cfg.kind, sae.W_dec.shape, sae.b_dec.shape) == (kind, (128, D_OUT), (D_OUT,))
    assert fvu(sae, x[:2000], y[:2000]) < 0.9  # it learnt something in 50 steps
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["fvu"] < records[0]["fvu"]

    sae.cfg.metadata.update(hook_name="blocks.0.ln2.hook_normalized", hook_name_out="blocks.0.hook_mlp_out")
    sae.save(tmp_path / "folder")
    raw = json.loads((tmp_path / "folder" / "cfg.json").read_text())
    assert raw["architecture"] == folder_architecture(sae.cfg) and raw["d_out"] == D_OUT
    assert raw["apply_b_dec_to_input"] is False and raw["metadata"]["hook_name_out"] == "blocks.0.hook_mlp_out"
    loaded = load_sae(tmp_path / "folder")
    assert type(loaded) is type(sae) and loaded.cfg.kind == kind
    with torch.no_grad():
        torch.testing.assert_close(loaded(x[:500]), sae(x[:500]))
        torch.testing.assert_close(loaded.encode(x[:500]), sae.encode(x[:500]))


def test_folder_architecture_names_follow_saelens():
    names = {("standard", "transcoder"): "transcoder", ("standard", "skip_transcoder"): "skip_transcoder",
             ("jumprelu", "transcoder"): "jumprelu_transcoder",
             ("jumprelu", "skip_transcoder"): "jumprelu_skip_transcoder",
             ("topk", "transcoder"): "topk_transcoder", ("topk", "sae"): "topk", ("standard", "sae"): "standard"}
    for (architecture, kind), name in names.items():
        cfg = SAEConfig(d_in=4, d_sae=8, architecture=architecture, kind=kind, k=2)
        assert folder_architecture(cfg) == name
        assert parse_folder_architecture(name) == (architecture, kind)


def test_a_transcoder_has_no_b_dec_on_its_input_and_checks_both_widths():
    sae = create_sae(SAEConfig(d_in=D_IN, d_sae=32, architecture="topk", k=4, kind="skip_transcoder", d_out=D_OUT))
    assert sae.cfg.apply_b_dec_to_input is False
    with torch.no_grad():
        sae.b_dec.fill_(3.0)
        sae.W_skip.copy_(torch.randn(D_OUT, D_IN))
        x = torch.randn(5, D_IN)
        f = sae.encode(x)
        torch.testing.assert_close(sae.encode_pre(x), x @ sae.W_enc + sae.b_enc)  # b_dec is not subtracted
        torch.testing.assert_close(sae(x), f @ sae.W_dec + sae.b_dec + x @ sae.W_skip.T)
    with pytest.raises(ValueError, match=f"d_in={D_IN}"):
        sae.encode(torch.randn(5, D_OUT))
    with pytest.raises(ValueError, match="d_out"):
        SAEConfig(d_in=4, d_sae=8, architecture="topk", k=2, d_out=6)


# --- the configuration -------------------------------------------------------------------------------------

def test_a_transcoder_predicts_the_mlp_output_of_the_block_it_reads_unless_told():
    assert TrainConfig(kind="transcoder").hooks == ["blocks.6.ln2.hook_normalized", "blocks.6.hook_mlp_out"]
    assert TrainConfig(kind="skip_transcoder", hook="blocks.3.hook_mlp_in").target_hook == "blocks.3.hook_mlp_out"
    assert TrainConfig().hooks == ["blocks.6.hook_resid_post"]
    with pytest.raises(ValueError, match="needs --hook-out"):
        TrainConfig(kind="transcoder", hook="blocks.3.hook_resid_post")
    with pytest.raises(ValueError, match="hook_out is for transcoders"):
        TrainConfig(hook_out="blocks.3.hook_mlp_out")
    with pytest.raises(ValueError, match="another hook point"):
        TrainConfig(kind="transcoder", hook="blocks.3.hook_mlp_out", hook_out="blocks.3.hook_mlp_out")


# --- on a language model -----------------------------------------------------------------------------------

def test_train_and_eval_a_skip_transcoder_through_the_cli(tiny_model_dir, text_file, tmp_path, capsys):
    run = tmp_path / "tc"
    assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(text_file), "--kind", "skip_transcoder",
                 "--hook", "blocks.1.ln2.hook_normalized", "--k", "8", "--expansion", "4", "--tokens", "8192",
                 "--batch-size", "256", "--context-size", "64", "--eval-tokens", "1024", "--out", str(run),
                 "--no-progress"]) == 0
    sae = load_sae(run / "final")
    assert (sae.cfg.kind, sae.cfg.architecture) == ("skip_transcoder", "topk")
    assert sae.cfg.metadata["hook_name_out"] == "blocks.1.hook_mlp_out"
    assert sae.cfg.metadata["hook_module_path_out"] == "model.layers.1.mlp"
    trained = json.loads((run / "eval.json").read_text())
    assert 0 < trained["fvu"] < 1.5 and abs(trained["l0"] - 8) < 1e-6
    capsys.readouterr()
    assert main(["eval", str(run), "--dataset", str(text_file), "--tokens", "2048", "--context-size", "64",
                 "--suite", "core,geometry"]) == 0
    report = json.loads((run / f"eval-{text_file.stem}" / "metrics.json").read_text())
    assert report["eval"]["kind"] == "skip_transcoder" and report["eval"]["hook_out"] == "blocks.1.hook_mlp_out"
    assert {"ce_loss_score", "fvu", "geometry"} <= set(report)
    assert main(["eval", str(run), "--dataset", str(text_file), "--tokens", "2048", "--context-size", "64",
                 "--suite", "absorption"]) == 2
    assert "absorption" in capsys.readouterr().err


def test_a_transcoder_trains_from_a_cache_of_both_hooks_without_the_model(tiny_model_dir, text_file, tmp_path,
                                                                         monkeypatch):
    import saelab.data.sources

    cache, run = tmp_path / "cache", tmp_path / "cached"
    assert main(["cache", "--model", str(tiny_model_dir), "--dataset", str(text_file), "--context-size", "64",
                 "--hooks", "blocks.1.ln2.hook_normalized,blocks.1.hook_mlp_out", "--tokens", "12288",
                 "--out", str(cache), "--no-progress"]) == 0
    monkeypatch.setattr(saelab.data.sources, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["train", "--activations", str(cache), "--kind", "transcoder", "--hook", "blocks.1.ln2.hook_normalized",
                 "--k", "8", "--expansion", "4", "--tokens", "8192", "--batch-size", "256", "--eval-tokens", "1024",
                 "--out", str(run), "--no-progress"]) == 0
    sae = load_sae(run / "final")
    assert sae.cfg.kind == "transcoder" and sae.cfg.metadata["hook_name_out"] == "blocks.1.hook_mlp_out"
    held_out = json.loads((run / "eval.json").read_text())  # on the cache's last contexts: both hooks read there
    assert 0 < held_out["fvu"] < 1.5 and abs(held_out["l0"] - 8) < 1e-6


def linear_gpt2():
    """A tiny GPT-2 whose MLPs are linear (identity activation), so a skip transcoder can copy one exactly."""
    import transformers

    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, activation_function="linear",
        bos_token_id=1, eos_token_id=2)).eval()


def test_a_transcoder_that_copies_the_mlp_recovers_all_of_the_loss():
    from saelab.evals.metrics import evaluate

    model = linear_gpt2()
    mlp = model.transformer.h[1].mlp
    # GPT-2's Conv1D computes x @ weight + bias: the MLP is x @ (W_fc W_proj) + (b_fc W_proj + b_proj)
    with torch.no_grad():
        linear = mlp.c_fc.weight @ mlp.c_proj.weight
        bias = mlp.c_fc.bias @ mlp.c_proj.weight + mlp.c_proj.bias
        copy = create_sae(SAEConfig(d_in=32, d_sae=64, architecture="standard", kind="skip_transcoder", d_out=32,
                                    metadata={"hook_name": "blocks.1.ln2.hook_normalized",
                                              "hook_name_out": "blocks.1.hook_mlp_out"}))
        copy.W_skip.copy_(linear.T)
        copy.b_dec.copy_(bias)
        copy.b_enc.fill_(-1.0)  # W_enc = 0: no latent ever fires
    tokens = torch.randint(3, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    metrics = evaluate(model, copy.eval(), None, [tokens])
    assert metrics["fvu"] < 1e-8 and metrics["l0"] == 0
    assert metrics["ce_with_sae"] == pytest.approx(metrics["ce_clean"], abs=1e-5)
    assert metrics["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["ce_zero_ablation"] != pytest.approx(metrics["ce_clean"], abs=1e-3)  # the MLP matters
    with torch.no_grad():  # a transcoder that copies half of the MLP loses some of the loss
        copy.W_skip.mul_(0.5)
    assert evaluate(model, copy, None, [tokens])["ce_loss_score"] < 1 - 1e-3


def test_layers_trains_one_transcoder_per_block_on_one_forward_pass(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "per-layer"
    assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(text_file), "--kind", "transcoder",
                 "--layers", "0-1", "--k", "4", "--expansion", "2", "--tokens", "4096", "--batch-size", "256",
                 "--context-size", "64", "--eval-tokens", "512", "--out", str(out), "--no-progress"]) == 0
    runs = json.loads((out / "multi.json").read_text())["runs"]
    assert runs == ["blocks.0.ln2.hook_normalized-topk-k4", "blocks.1.ln2.hook_normalized-topk-k4"]
    for block, run in enumerate(runs):
        meta = load_sae(out / run / "final").cfg.metadata
        assert (meta["hook_name"], meta["hook_name_out"]) == (f"blocks.{block}.ln2.hook_normalized",
                                                              f"blocks.{block}.hook_mlp_out")
    assert main(["train", "--layers", "0-x", "--out", str(tmp_path / "bad")]) == 2


@pytest.mark.parametrize("kind", ["transcoder", "skip_transcoder"])
def test_steering_and_attribution_act_where_a_transcoder_writes(tiny_model_dir, kind):
    from saelab.analysis import attribute
    from saelab.analysis.steering import added_direction
    from saelab.evals.loading import load_sae_and_model
    from saelab.models import capture, resolve_hook

    import tempfile
    from pathlib import Path

    sae = create_sae(SAEConfig(d_in=32, d_sae=64, architecture="topk", k=4, kind=kind, d_out=32, metadata={
        "model_name": str(tiny_model_dir), "hook_name": "blocks.1.ln2.hook_normalized",
        "hook_name_out": "blocks.1.hook_mlp_out"}))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    with tempfile.TemporaryDirectory() as folder:
        sae.save(Path(folder) / "tc")
        loaded = load_sae_and_model(Path(folder) / "tc")
    assert (loaded.hook.name, loaded.writes.name) == ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")
    result = attribute(loaded, "The value of the", " name")  # parts of the MLP output's direct contribution
    assert result.feature_sum + result.error + result.bias + result.skip == pytest.approx(result.total, abs=1e-4)
    if kind == "skip_transcoder":  # the skip term's part: (x_in W_skip^T) . d, a part of its own
        from saelab.analysis.attribution import format_attribution
        from saelab.analysis.logits import final_norm, logit_directions

        assert abs(result.skip) > 1e-3 and "skip term" in format_attribution(result)
        ids = loaded.tokenize("The value of the")
        norm_in = resolve_hook(loaded.model, "blocks.2.hook_resid_post")
        seen = capture(loaded.model, ids, [loaded.hook, norm_in])
        x_in = seen[loaded.hook.name][0, -1]
        d = logit_directions(loaded.model, loaded.tokenizer(" name", add_special_tokens=False)["input_ids"][:1])[0]
        d = d * final_norm(loaded.model).inverse_rms(seen[norm_in.name][0, -1])
        assert result.skip == pytest.approx(float((x_in @ loaded.sae.W_skip.T) @ d), abs=1e-4)
    else:
        assert result.skip == 0
    ids = loaded.tokenize("The value of")
    out = resolve_hook(loaded.model, "blocks.1.hook_mlp_out")
    clean = capture(loaded.model, ids, [out])[out.name]
    with added_direction(loaded, feature=5, strength=2.0):  # the decoder row is added where it writes
        steered = capture(loaded.model, ids, [out])[out.name]
    torch.testing.assert_close(steered - clean, (2.0 * loaded.sae.W_dec[5]).expand_as(clean).detach())


def test_a_sweep_of_transcoders(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", str(tiny_model_dir), "--dataset", str(text_file), "--kind", "skip_transcoder",
                 "--hook", "blocks.1.ln2.hook_normalized", "--architectures", "topk,abstopk", "--k", "4,8",
                 "--tokens", "4096", "--batch-size", "256", "--context-size", "64", "--eval-tokens", "512",
                 "--expansion", "2", "--out", str(out), "--no-progress"]) == 0
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 5  # a header and 2 architectures x 2 values of k
    for run in ("topk-k4", "abstopk-k8"):
        sae = load_sae(out / run / "final")
        assert sae.cfg.kind == "skip_transcoder" and sae.cfg.metadata["hook_name_out"] == "blocks.1.hook_mlp_out"
    assert main(["sweep", "--model", str(tiny_model_dir), "--dataset", str(text_file), "--kind", "transcoder",
                 "--hook", "blocks.1.ln2.hook_normalized", "--architectures", "matching_pursuit",
                 "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
