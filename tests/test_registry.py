"""An architecture is one file: a TopK variant defined here, outside the package, registered through the
public API, trains, saves, loads, evaluates and sweeps through the command line with no other file changed."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass

import pytest
import torch

import saelab
from saelab.cli import main
from saelab.options import option
from saelab.sae import TopKSAE, TopKSettings, TrainOutput, TrainStep
from saelab.sae.base import normalized_error
from saelab.sae.sparse import count_fired, sparse_decode, topk_encode


@dataclass
class DenoisingSettings(TopKSettings):
    noise_std: float = option(0.0, "Standard deviation of the Gaussian noise added to training inputs (the "
                              "reconstruction target stays clean).")


class DenoisingTopKSAE(TopKSAE):
    """TopK that reconstructs each clean input from a noisy copy while training; inference is TopK's."""

    architecture = "denoising_topk"

    def training_forward(self, x: torch.Tensor, step: TrainStep) -> TrainOutput:
        noisy = x + self.settings.noise_std * torch.randn_like(x)
        values, indices = topk_encode(noisy, self.W_enc, self.b_enc, self.b_dec, self.cfg.k,
                                      self.cfg.apply_b_dec_to_input)
        x_hat = sparse_decode(indices, values, self.W_dec) + self.b_dec
        mse = normalized_error(x_hat - x, x, step.data_parallel)
        return TrainOutput(loss=mse, x_hat=x_hat, fired=count_fired(indices, values, self.cfg.d_sae),
                           parts={"mse": mse})


DENOISING_TOPK = saelab.Architecture(
    name="denoising_topk", module=DenoisingTopKSAE, settings=DenoisingSettings, sparsity="k", sweep_values="2,4",
    label="k", summary="TopK trained to reconstruct clean inputs from noisy ones (a test's own architecture)")

SMALL = ["--tokens", "4096", "--batch-size", "256", "--lr", "3e-3", "--context-size", "32", "--lm-batch-size", "8",
         "--buffer-tokens", "4096", "--eval-tokens", "256", "--hook", "blocks.1.hook_resid_post", "--expansion", "4",
         "--no-progress", "--log-every", "4"]


@pytest.fixture
def registered():
    saelab.register_architecture(DENOISING_TOPK)
    yield DENOISING_TOPK
    saelab.sae.unregister_architecture(DENOISING_TOPK.name)


def test_an_architecture_defined_outside_the_package_works_everywhere(registered, tiny_model_dir, text_file,
                                                                        tmp_path, capsys):
    data = ["--model", str(tiny_model_dir), "--dataset", str(text_file)]
    # Its settings are options of `saelab train`, saying which architecture takes them.
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--noise-std" in help_text and "denoising_topk: Standard deviation" in help_text
    assert "denoising_topk: TopK trained to reconstruct" in help_text  # --architecture lists it

    run = tmp_path / "run"
    assert main(["train", *data, *SMALL, "--architecture", "denoising_topk", "--k", "4", "--noise-std", "0.5",
                 "--out", str(run)]) == 0
    sae = saelab.SAE.load(run / "final")
    assert isinstance(sae, DenoisingTopKSAE) and sae.cfg.architecture == "denoising_topk" and sae.cfg.k == 4
    assert json.loads((run / "final" / "runner_cfg.json").read_text())["sae_settings"]["noise_std"] == 0.5
    trained = json.loads((run / "eval.json").read_text())
    assert 0 < trained["l0"] <= 4 and trained["explained_variance"] > 0.3

    capsys.readouterr()
    assert main(["eval", str(run), "--tokens", "512", "--json", "--no-downstream"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["eval"]["architecture"] == "denoising_topk" and 0 < report["l0"] <= 4

    # A sweep trains it beside a built-in architecture. Without noise and without AuxK it is plain TopK: the
    # same seed gives the same SAE, so the settings reach the module unchanged.
    sweep = tmp_path / "sweep"
    assert main(["sweep", *data, *SMALL, "--architectures", "denoising_topk,topk", "--k", "2,4",
                 "--noise-std", "0", "--dead-latent-remedy", "none", "--out", str(sweep)]) == 0
    with open(sweep / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["architecture"], r["sparsity_setting"]) for r in rows] == [
        ("denoising_topk", "k=2"), ("denoising_topk", "k=4"), ("topk", "k=2"), ("topk", "k=4")]
    for k in (2, 4):
        variant = saelab.SAE.load(sweep / f"denoising_topk-k{k}" / "final").state_dict()
        plain = saelab.SAE.load(sweep / f"topk-k{k}" / "final").state_dict()
        for name, tensor in plain.items():
            assert torch.allclose(variant[name], tensor, atol=1e-6), (k, name)
    noisy = saelab.SAE.load(run / "final").state_dict()["W_dec"]
    assert not torch.allclose(noisy, saelab.SAE.load(sweep / "denoising_topk-k4" / "final").state_dict()["W_dec"])


def test_unknown_architecture_names_the_registered_ones(registered):
    with pytest.raises(ValueError, match="denoising_topk"):
        saelab.TrainConfig(architecture="denoising")
