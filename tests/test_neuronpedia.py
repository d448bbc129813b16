"""Neuronpedia: page links, the link in `saelab eval`'s report, and `saelab neuronpedia-export` writing feature
data in the shape Neuronpedia imports (SAEDashboard batch files), on a tiny local model."""

import json

import pytest
import torch

from saelab.sae.neuronpedia import neuronpedia_url
from saelab.analysis.neuronpedia_export import neuronpedia_source
from saelab.cli import main
from saelab.data.activations import LMActivationSource
from saelab.data.tokens import Packing
from saelab.models import capture, load_model, resolve_hook
from saelab.sae import SAE, SAEConfig, create_sae

HOOK = "blocks.1.hook_resid_post"
D_IN, D_SAE = 32, 24


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("text") / "docs.txt"
    path.write_text("\n\n".join(list(topics.values())[:30]))
    return path


def sae_folder(path, model_dir, neuronpedia_id=None, dead=()):
    """A TopK SAE on the tiny model's HOOK; latents in ``dead`` can never fire."""
    sae = create_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="topk", k=3, metadata={
        "model_name": str(model_dir), "hook_name": HOOK, "context_size": 16, "prepend_bos": True,
        "neuronpedia_id": neuronpedia_id}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        directions = torch.randn(D_SAE, D_IN, generator=g)
        sae.W_dec.copy_(directions / directions.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        for f in dead:
            sae.b_enc[f] = -1e6
    sae.save(path)
    return path


def test_neuronpedia_url():
    assert neuronpedia_url("gpt2-small/8-res-jb") == "https://www.neuronpedia.org/gpt2-small/8-res-jb"
    assert neuronpedia_url("gpt2-small/8-res-jb", 1234) == "https://www.neuronpedia.org/gpt2-small/8-res-jb/1234"
    with pytest.raises(ValueError, match="<model>/<sae set>"):
        neuronpedia_url("just-a-name")


def test_source_from_metadata():
    assert neuronpedia_source({"neuronpedia_id": "gpt2-small/8-res-jb"}).neuronpedia_id == "gpt2-small/8-res-jb"
    derived = neuronpedia_source({"model_name": "/some/where/tiny-llama", "hook_name": "blocks.3.hook_mlp_out"})
    assert (derived.model_id, derived.layer, derived.sae_set) == ("tiny-llama", 3, "mlp-saelab")
    assert neuronpedia_source({"neuronpedia_id": "gpt2-small/8-res-jb"}, sae_set="mine").neuronpedia_id == \
        "gpt2-small/8-mine"


def test_eval_report_links_to_neuronpedia(tiny_model_dir, text_file, tmp_path, capsys):
    folder = sae_folder(tmp_path / "sae", tiny_model_dir, neuronpedia_id="tiny/1-res-test")
    assert main(["eval", str(folder), "--dataset", str(text_file), "--tokens", "128", "--no-downstream",
                 "--device", "cpu", "--out", str(tmp_path / "report")]) == 0
    link = "https://www.neuronpedia.org/tiny/1-res-test"
    assert link in capsys.readouterr().out
    assert link in (tmp_path / "report" / "summary.md").read_text()
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["eval"]["neuronpedia"] == link


def test_export_shape(tiny_model_dir, text_file, tmp_path):
    dead = (5, 17)
    folder = sae_folder(tmp_path / "sae", tiny_model_dir, neuronpedia_id="tiny-llama/1-res-test", dead=dead)
    out = tmp_path / "np"
    assert main(["neuronpedia-export", str(folder), "--dataset", str(text_file), "--tokens", "512", "--device", "cpu",
                 "--n-top", "4", "--window", "3", "--logit-tokens", "5", "--features-per-batch", "10",
                 "--out", str(out)]) == 0

    skipped = json.loads((out / "skipped_indexes.json").read_text())["skipped_indexes"]
    assert set(dead) <= set(skipped)
    batches = [json.loads((out / f"batch-{i}.json").read_text()) for i in range(len(list(out.glob("batch-*.json"))))]
    features = [f for batch in batches for f in batch["features"]]
    assert len(batches) == -(-len(features) // 10) and all(len(b["features"]) <= 10 for b in batches)
    assert sorted(f["feature_index"] for f in features) == [f for f in range(D_SAE) if f not in skipped]
    for batch in batches:
        assert (batch["model_id"], batch["layer"], batch["sae_set"]) == ("tiny-llama", 1, "res-test")

    model, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    sae = SAE.load(folder)
    vocab = model.get_output_embeddings().weight.shape[0]
    for feature in features:
        assert len(feature["pos_str"]) == len(feature["pos_values"]) == 5
        assert len(feature["neg_str"]) == len(feature["neg_values"]) == 5
        assert feature["pos_values"] == sorted(feature["pos_values"], reverse=True)
        assert min(feature["pos_values"]) >= max(feature["neg_values"])
        assert 0 < feature["frac_nonzero"] <= 1
        assert sum(feature["logits_hist_data_bar_heights"]) == vocab
        assert 1 <= len(feature["activations"]) <= 4
        maxima = [a["maxValue"] for a in feature["activations"]]
        assert maxima == sorted(maxima, reverse=True) and maxima[0] == pytest.approx(feature["max_activation"])
        for example in feature["activations"]:
            assert len(example["tokens"]) == len(example["values"]) <= 7
            assert example["values"][example["maxValueTokenIndex"]] == pytest.approx(example["maxValue"])

    # the exported maxima are the features' real maxima over the same 512 tokens, found by brute force
    source = LMActivationSource(model, tokenizer, resolve_hook(model, HOOK), str(text_file), Packing(16, True),
                                max_contexts=512 // 16)
    best = torch.zeros(D_SAE)
    for ids in source.token_batches():
        acts = capture(model, ids, [resolve_hook(model, HOOK)])[HOOK]
        best = torch.maximum(best, sae.encode(acts)[source.keep_mask(ids)].amax(0).detach())
    for feature in features:
        assert feature["max_activation"] == pytest.approx(float(best[feature["feature_index"]]), abs=1e-3)

    settings = json.loads((out / "run_settings.json").read_text())
    assert settings["neuronpedia_id"] == "tiny-llama/1-res-test" and settings["n_tokens_total"] > 0
    assert settings["live_features"] == len(features) and settings["dead_features"] == len(skipped)
