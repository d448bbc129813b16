"""Pretrained SAEs: SAE.from_pretrained through a fake Hugging Face hub cache on disk (HF_HUB_OFFLINE=1, no
network), the registry, the clear error when offline and uncached, and `saelab pretrained list|show`."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from saelab import SAE
from saelab.cli import main
from saelab.sae import SAEConfig, create_sae, save_sae
from saelab.sae.pretrained import PretrainedError, registry, resolve

REVISION = "0123456789abcdef0123456789abcdef01234567"
D_IN, D_SAE = 16, 48


def snapshot(cache, repo_id: str):
    """The snapshot folder of ``repo_id`` in a hub cache laid out as huggingface_hub lays it out."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    folder = repo / "snapshots" / REVISION
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def random_sae(architecture="standard", seed=0, metadata=None, **cfg):
    sae = create_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=architecture, metadata=metadata or {}, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return sae.eval()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty offline hub cache in HF_HOME."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    return cache


def write_jb_style_folder(folder, sae, sparsity):
    """An SAE folder as jbloom/GPT2-Small-SAEs-Reformatted has them: a flat pre-6.0 SAELens cfg.json."""
    folder.mkdir(parents=True)
    save_file({name: t.contiguous() for name, t in sae.state_dict().items()}, folder / "sae_weights.safetensors")
    save_file({"sparsity": sparsity}, folder / "sparsity.safetensors")
    (folder / "cfg.json").write_text(json.dumps({
        "model_name": "gpt2-small", "hook_point": "blocks.8.hook_resid_pre", "hook_point_layer": 8, "d_in": D_IN,
        "d_sae": D_SAE, "context_size": 128, "dataset_path": "Skylion007/openwebtext", "device": "cuda",
        "dtype": "torch.float32", "lr": 4e-4, "l1_coefficient": 8e-5}))


def test_registry_release_loads_from_the_cache(hub):
    sae = random_sae()
    sparsity = torch.linspace(-6, -1, D_SAE)
    root = snapshot(hub, "jbloom/GPT2-Small-SAEs-Reformatted")
    write_jb_style_folder(root / "blocks.8.hook_resid_pre", sae, sparsity)

    loaded, cfg_dict, log_sparsity = SAE.from_pretrained(release="gpt2-small-res-jb",
                                                         sae_id="blocks.8.hook_resid_pre", device="cpu")
    x = torch.randn(5, D_IN)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae(x))
    torch.testing.assert_close(loaded.W_dec[7], sae.W_dec[7])
    torch.testing.assert_close(log_sparsity, sparsity)
    assert cfg_dict["hook_name"] == "blocks.8.hook_resid_pre" and cfg_dict["model_name"] == "gpt2-small"
    assert cfg_dict["d_sae"] == D_SAE and cfg_dict["neuronpedia_id"] == "gpt2-small/8-res-jb"
    assert loaded.cfg.metadata["neuronpedia_id"] == "gpt2-small/8-res-jb"
    # SAELens 6's name for the same tuple
    again, _, _ = SAE.from_pretrained_with_cfg_and_sparsity("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    torch.testing.assert_close(again.W_enc, loaded.W_enc)


def test_any_hub_repo_of_saelens_folders(hub):
    sae = random_sae("topk", seed=3, k=5, metadata={"hook_name": "blocks.2.hook_resid_post", "model_name": "m"})
    save_sae(sae, snapshot(hub, "someone/my-saes") / "layer_2" / "topk")
    loaded, cfg_dict, sparsity = SAE.from_pretrained("someone/my-saes", "layer_2/topk")
    assert loaded.cfg.architecture == "topk" and loaded.cfg.k == 5 and sparsity is None
    x = torch.randn(4, D_IN)
    torch.testing.assert_close(loaded(x), sae(x))
    assert cfg_dict["hook_name"] == "blocks.2.hook_resid_post" and cfg_dict["neuronpedia_id"] is None


def test_gemma_scope_params_npz(hub):
    g = torch.Generator().manual_seed(5)
    params = {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "W_dec": torch.randn(D_SAE, D_IN, generator=g),
              "b_enc": torch.randn(D_SAE, generator=g), "b_dec": torch.randn(D_IN, generator=g),
              "threshold": torch.rand(D_SAE, generator=g)}
    folder = snapshot(hub, "google/gemma-scope-2b-pt-res") / "layer_12" / "width_16k" / "average_l0_82"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{name: t.numpy() for name, t in params.items()})

    sae, cfg_dict, sparsity = SAE.from_pretrained("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical")
    x = torch.randn(6, D_IN)
    pre = x @ params["W_enc"] + params["b_enc"]  # Gemma Scope does not subtract b_dec first
    expected = pre.relu() * (pre > params["threshold"])
    torch.testing.assert_close(sae.encode(x), expected)
    torch.testing.assert_close(sae.decode(expected), expected @ params["W_dec"] + params["b_dec"])
    assert cfg_dict["hook_name"] == "blocks.12.hook_resid_post" and cfg_dict["model_name"] == "gemma-2-2b"
    assert cfg_dict["neuronpedia_id"] == "gemma-2-2b/12-gemmascope-res-16k" and sparsity is None
    # the open-ended release takes the folder itself as the SAE id
    same, _, _ = SAE.from_pretrained("gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82")
    torch.testing.assert_close(same.encode(x), expected)


def test_local_folder_of_sae_folders(tmp_path):
    sae = random_sae(seed=9)
    save_sae(sae, tmp_path / "release" / "blocks.0.hook_resid_pre", sparsity=torch.zeros(D_SAE))
    loaded, cfg_dict, sparsity = SAE.from_pretrained(str(tmp_path / "release"), "blocks.0.hook_resid_pre")
    torch.testing.assert_close(loaded.W_dec, sae.W_dec)
    assert sparsity is not None and cfg_dict["d_in"] == D_IN


def test_offline_and_uncached_is_a_clear_error(hub):
    with pytest.raises(PretrainedError) as err:
        SAE.from_pretrained("gpt2-small-res-jb", "blocks.3.hook_resid_pre")
    message = str(err.value)
    for needed in ("gpt2-small-res-jb", "blocks.3.hook_resid_pre", "HF_HUB_OFFLINE", "HF_HOME",
                   "blocks.3.hook_resid_pre/sae_weights.safetensors", "jbloom/GPT2-Small-SAEs-Reformatted",
                   "SAE.load(folder)", str(hub)):
        assert needed in message
    # the repo is cached, but not this SAE's folder: the same error, not a half-loaded SAE
    write_jb_style_folder(snapshot(hub, "jbloom/GPT2-Small-SAEs-Reformatted") / "blocks.8.hook_resid_pre",
                          random_sae(), torch.zeros(D_SAE))
    with pytest.raises(PretrainedError, match="HF_HUB_OFFLINE is set"):
        SAE.from_pretrained("gpt2-small-res-jb", "blocks.3.hook_resid_pre")


def test_unknown_release_or_sae_id_names_what_exists():
    with pytest.raises(PretrainedError, match="not in saelab's registry"):
        resolve("no-such-release", "x")
    with pytest.raises(PretrainedError, match="blocks.0.hook_resid_pre"):
        resolve("gpt2-small-res-jb", "blocks.99.hook_resid_pre")


def test_registry_entries_are_complete():
    releases = registry()
    assert {"gpt2-small-res-jb", "gemma-scope-2b-pt-res", "gemma-scope-2b-pt-res-canonical"} <= set(releases)
    for name, entry in releases.items():
        assert entry["format"] in ("saelens", "gemma_scope") and "/" in entry["repo_id"], name
        assert entry["saes"] or entry.get("any_folder"), name
    jb = resolve("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    assert (jb.repo_id, jb.path, jb.neuronpedia_id) == ("jbloom/GPT2-Small-SAEs-Reformatted",
                                                        "blocks.8.hook_resid_pre", "gpt2-small/8-res-jb")
    scope = resolve("gemma-scope-2b-pt-res", "layer_3/width_65k/average_l0_7")
    assert (scope.hook, scope.d_sae) == ("blocks.3.hook_resid_post", 65536)


def test_pretrained_commands(hub, capsys):
    assert main(["pretrained", "list"]) == 0
    out = capsys.readouterr().out
    assert "gpt2-small-res-jb" in out and "google/gemma-scope-2b-pt-res" in out

    assert main(["pretrained", "list", "--release", "gpt2-small-res-jb"]) == 0
    out = capsys.readouterr().out
    assert "gpt2-small/8-res-jb" in out and "blocks.11.hook_resid_post" in out and "24576" in out

    assert main(["pretrained", "show", "gpt2-small-res-jb", "blocks.8.hook_resid_pre"]) == 0
    out = capsys.readouterr().out
    assert "https://www.neuronpedia.org/gpt2-small/8-res-jb" in out and "no (downloaded" in out

    write_jb_style_folder(snapshot(hub, "jbloom/GPT2-Small-SAEs-Reformatted") / "blocks.8.hook_resid_pre",
                          random_sae(), torch.zeros(D_SAE))
    assert main(["pretrained", "show", "gpt2-small-res-jb", "blocks.8.hook_resid_pre"]) == 0
    assert str(hub) in capsys.readouterr().out.split("cached:")[1].split("\n")[0]

    assert main(["pretrained", "show", "no-such-release"]) == 2
    assert "not in saelab's registry" in capsys.readouterr().err
