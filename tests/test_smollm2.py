"""The real embedded default model, SmolLM2-135M (fetched from PyPI on first use). Marked slow."""

import json

import pytest
import torch

from conftest import SHARED_DATA
from saelab import SAE
from saelab.cli import main
from saelab.models import capture, load_model, resolve_hook

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", device="cpu")


def test_embedded_model_loads_and_knows_paris(smollm2):
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_hook_matches_hidden_states_and_stops_early(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("Sparse autoencoders split activations into features.", return_tensors="pt").input_ids
    calls = []
    handle = model.model.layers[7].register_forward_hook(lambda *a: calls.append(1))
    try:
        act = capture(model, ids, [resolve_hook(model, "blocks.6.hook_resid_post")])["blocks.6.hook_resid_post"]
    finally:
        handle.remove()
    assert not calls  # layers after the hook never ran
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[7]
    assert torch.allclose(act, hidden, atol=1e-5)


def test_short_training_run_on_the_default_model(tmp_path):
    eval_text = SHARED_DATA / "wikitext2-valid.txt"
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--tokens", "65536", "--batch-size", "1024", "--buffer-tokens", "32768",
            "--eval-tokens", "1024", "--no-progress"]
    if eval_text.exists():
        args += ["--eval-dataset", str(eval_text)]
    assert main(args) == 0
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["l0"] <= 32
    assert metrics["explained_variance"] > 0.5
    assert metrics["ce_loss_score"] > 0.5
    sae = SAE.load(out / "final")
    assert sae.cfg.metadata["model_name"] == "smollm2-135m" and sae.cfg.d_sae == 8 * 576
