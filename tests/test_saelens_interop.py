"""saelab's SAE folder against SAELens 6.x: each loads the other's folder and computes the same codes.

The SAELens half runs under SAELens's own interpreter (``tests/saelens_roundtrip.py``, through the
``saelens`` fixture of conftest.py), found at ``$SAELAB_SAELENS_PYTHON`` or ``<repo>/.venv-saelens/bin/python``
(``bash scripts/install_saelens.sh`` makes it); those tests, marked ``saelens``, skip when it is absent. The
pure-saelab format tests always run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab.sae import SAE, SAEConfig, SAEFormatError, StandardSAE, TopKSAE, create_sae, load_sparsity

D_IN, D_SAE, K, N = 16, 64, 8, 48
TOL = 1e-5
METADATA = {"model_name": "HuggingFaceTB/SmolLM2-135M", "hook_name": "model.layers.6", "context_size": 128,
            "dataset_path": "roneneldan/TinyStories", "prepend_bos": True}


def assert_agree(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Within TOL, relative to the tensor's largest entry where that exceeds 1 (folding decoder norms into the
    weights, as a reader must for some folders, rounds differently from computing with them at run time)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    bound = TOL * max(1.0, expected.abs().max().item())
    assert diff <= bound, f"{what}: max |difference| {diff:.3g} > {bound:.3g}"


def random_saelab_sae(architecture: str, seed: int, metadata: dict | None = None) -> SAE:
    sae = create_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=architecture,
                               k=K if architecture == "topk" else None, metadata=dict(metadata or METADATA)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5)
        sae.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=g) * (0.5 + torch.rand(D_SAE, 1, generator=g)))
        sae.b_enc.copy_(0.3 * torch.randn(D_SAE, generator=g))
        sae.b_dec.copy_(torch.randn(D_IN, generator=g))
    return sae.eval()


def make_inputs(seed: int = 123) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": 2 * torch.randn(N, D_IN, generator=g) + 0.5,
            "f": torch.randn(N, D_SAE, generator=g).relu()}  # dense codes exercise every decoder row


@torch.no_grad()
def saelab_outputs(sae: SAE, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    encoded = sae.encode(inputs["x"])
    return {"encode": encoded, "decode": sae.decode(inputs["f"]), "forward": sae.decode(encoded)}


def reference_encode(x, W_enc, b_enc, b_dec, k=None):
    """The formula in SAE_FORMAT.md, written out independently of saelab."""
    pre = (x - b_dec) @ W_enc + b_enc
    if k is None:
        return pre.relu()
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


# --- saelab <-> SAELens ----------------------------------------------------------------------------

SAELAB_TO_SAELENS = ["standard", "topk"]
# topk-rescale: SAELens's TopKSAE with rescale_acts_by_decoder_norm=True, which saelab must fold on load.
SAELENS_TO_SAELAB = ["standard", "topk", "topk-rescale"]


@pytest.fixture(scope="module")
def interop(saelens, tmp_path_factory):
    """Run every SAELens job in one subprocess (importing sae_lens takes ~15 s); skips without SAELens."""
    root = tmp_path_factory.mktemp("saelens_interop")
    inputs = make_inputs()
    save_file(inputs, root / "inputs.safetensors")
    jobs, saelab_saes = [], {}
    for i, arch in enumerate(SAELAB_TO_SAELENS):
        sae = random_saelab_sae(arch, seed=10 + i)
        sae.save(root / f"saelab_{arch}")
        saelab_saes[arch] = sae
        jobs.append({"mode": "load", "folder": str(root / f"saelab_{arch}"),
                     "inputs": str(root / "inputs.safetensors"), "out": str(root / f"saelab_{arch}.out")})
    for i, name in enumerate(SAELENS_TO_SAELAB):
        jobs.append({"mode": "create", "architecture": name.split("-")[0], "d_in": D_IN, "d_sae": D_SAE, "k": K,
                     "seed": 20 + i, "rescale_acts_by_decoder_norm": name.endswith("rescale"),
                     "metadata": METADATA, "folder": str(root / f"saelens_{name}"),
                     "inputs": str(root / "inputs.safetensors"), "out": str(root / f"saelens_{name}.out")})
    summary = saelens.run(jobs, root, timeout=900)
    assert summary["sae_lens_version"].startswith("6."), summary

    def result(stem: str):
        return load_file(root / f"{stem}.out"), json.loads((root / f"{stem}.out.json").read_text())

    return {"root": root, "inputs": inputs, "saelab_saes": saelab_saes, "result": result, "summary": summary}


@pytest.mark.saelens
@pytest.mark.subprocess
@pytest.mark.parametrize("arch", SAELAB_TO_SAELENS)
def test_saelab_folder_loads_in_saelens(interop, arch):
    ours = saelab_outputs(interop["saelab_saes"][arch], interop["inputs"])
    theirs, info = interop["result"](f"saelab_{arch}")
    assert info["class"] == {"standard": "StandardSAE", "topk": "TopKSAE"}[arch]
    for key in ("encode", "decode", "forward"):
        assert_agree(theirs[key], ours[key], f"SAELens {interop['summary']['sae_lens_version']} {key}")
    cfg = info["cfg"]
    assert (cfg["d_in"], cfg["d_sae"], cfg["apply_b_dec_to_input"]) == (D_IN, D_SAE, True)
    if arch == "topk":
        assert cfg["k"] == K and cfg["rescale_acts_by_decoder_norm"] is False
        assert (theirs["encode"] > 0).sum(-1).max().item() <= K
    # SAELens read the cfg as the 6.x layout: the nested metadata survived (a pre-6.0 reading drops it).
    for key, value in METADATA.items():
        assert cfg["metadata"].get(key) == value, f"metadata {key}: {cfg['metadata'].get(key)!r} != {value!r}"


@pytest.mark.saelens
@pytest.mark.subprocess
@pytest.mark.parametrize("name", SAELENS_TO_SAELAB)
def test_saelens_folder_loads_in_saelab(interop, name):
    folder = interop["root"] / f"saelens_{name}"
    raw_cfg = json.loads((folder / "cfg.json").read_text())
    assert raw_cfg["architecture"] == name.split("-")[0]
    sae = SAE.load(folder)
    assert isinstance(sae, {"standard": StandardSAE, "topk": TopKSAE}[name.split("-")[0]])
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (D_IN, D_SAE)
    theirs, _ = interop["result"](f"saelens_{name}")
    ours = saelab_outputs(sae, interop["inputs"])
    for key in ("encode", "decode", "forward"):
        assert_agree(ours[key], theirs[key], f"saelab on a SAELens {name} folder, {key}")
    for key, value in METADATA.items():
        assert sae.cfg.metadata.get(key) == value
    if name.startswith("topk"):
        assert sae.cfg.k == K


# --- the transcoder family, both ways ----------------------------------------------------------------

D_OUT = 24
TRANSCODERS = {"transcoder": ("standard", "transcoder"), "skip_transcoder": ("standard", "skip_transcoder"),
               "jumprelu_transcoder": ("jumprelu", "transcoder"),
               "jumprelu_skip_transcoder": ("jumprelu", "skip_transcoder")}
TRANSCODER_METADATA = {**METADATA, "hook_name": "blocks.3.ln2.hook_normalized", "hook_name_out": "blocks.3.hook_mlp_out"}


def random_saelab_transcoder(folder_name: str, seed: int) -> SAE:
    architecture, kind = TRANSCODERS[folder_name]
    sae = create_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=architecture, kind=kind, d_out=D_OUT,
                               metadata=dict(TRANSCODER_METADATA)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5)
        sae.W_dec.copy_(torch.randn(D_SAE, D_OUT, generator=g) * (0.5 + torch.rand(D_SAE, 1, generator=g)))
        sae.b_enc.copy_(0.3 * torch.randn(D_SAE, generator=g))
        sae.b_dec.copy_(torch.randn(D_OUT, generator=g))
        if architecture == "jumprelu":
            sae.threshold.copy_(0.5 * torch.rand(D_SAE, generator=g))
        if kind == "skip_transcoder":
            sae.W_skip.copy_(torch.randn(D_OUT, D_IN, generator=g) / D_IN**0.5)
    return sae.eval()


def random_saelab_newer(name: str, seed: int) -> SAE:
    """An AbsTopK or matching-pursuit SAE with random weights (unit decoder rows for pursuit)."""
    options = {"max_iterations": 6, "residual_threshold": 0.5, "stop_on_duplicate_support": True}
    sae = create_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=name, k=K if name == "abstopk" else None,
                               options=options if name == "matching_pursuit" else {}, metadata=dict(METADATA)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        rows = torch.randn(D_SAE, D_IN, generator=g)
        sae.W_dec.copy_(rows / rows.norm(dim=1, keepdim=True) if name == "matching_pursuit"
                        else rows * (0.5 + torch.rand(D_SAE, 1, generator=g)))
        if name == "abstopk":
            sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5)
            sae.b_enc.copy_(0.3 * torch.randn(D_SAE, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(D_IN, generator=g))
    return sae.eval()


NEWER = {"abstopk": "AbsTopKSAE", "matching_pursuit": "MatchingPursuitSAE"}


@pytest.fixture(scope="module")
def transcoder_interop(saelens, tmp_path_factory):
    """SAELens jobs for the transcoder family, AbsTopK and matching pursuit, both ways, in one subprocess."""
    root = tmp_path_factory.mktemp("saelens_transcoders")
    inputs = make_inputs()
    save_file(inputs, root / "inputs.safetensors")
    jobs, ours = [], {}
    for i, name in enumerate(NEWER):
        ours[name] = random_saelab_newer(name, seed=50 + i)
        ours[name].save(root / f"saelab_{name}")
        jobs.append({"mode": "load", "folder": str(root / f"saelab_{name}"), "inputs": str(root / "inputs.safetensors"),
                     "out": str(root / f"saelab_{name}.out")})
        jobs.append({"mode": "create", "architecture": name, "d_in": D_IN, "d_sae": D_SAE, "k": K, "max_iterations": 5,
                     "residual_threshold": 0.3, "seed": 60 + i, "metadata": METADATA,
                     "folder": str(root / f"saelens_{name}"), "inputs": str(root / "inputs.safetensors"),
                     "out": str(root / f"saelens_{name}.out")})
    for i, name in enumerate(TRANSCODERS):
        ours[name] = random_saelab_transcoder(name, seed=30 + i)
        ours[name].save(root / f"saelab_{name}")
        jobs.append({"mode": "load", "folder": str(root / f"saelab_{name}"), "inputs": str(root / "inputs.safetensors"),
                     "out": str(root / f"saelab_{name}.out")})
        jobs.append({"mode": "create", "architecture": name, "d_in": D_IN, "d_sae": D_SAE, "d_out": D_OUT,
                     "seed": 40 + i, "metadata": TRANSCODER_METADATA, "folder": str(root / f"saelens_{name}"),
                     "inputs": str(root / "inputs.safetensors"), "out": str(root / f"saelens_{name}.out")})
    saelens.run(jobs, root, timeout=900)
    return root, inputs, ours


@torch.no_grad()
def transcoder_outputs(sae: SAE, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    encoded = sae.encode(inputs["x"])
    return {"encode": encoded, "decode": sae.decode(inputs["f"]), "call": sae(inputs["x"])}


@pytest.mark.saelens
@pytest.mark.subprocess
@pytest.mark.parametrize("name", TRANSCODERS)
def test_saelab_transcoders_load_in_saelens_and_saelens_transcoders_load_here(transcoder_interop, name):
    root, inputs, ours = transcoder_interop
    theirs = load_file(root / f"saelab_{name}.out")
    info = json.loads((root / f"saelab_{name}.out.json").read_text())
    assert info["cfg"]["architecture"] == name and info["cfg"]["d_out"] == D_OUT
    assert info["cfg"]["metadata"]["hook_name_out"] == "blocks.3.hook_mlp_out"
    for key, value in transcoder_outputs(ours[name], inputs).items():
        assert_agree(theirs[key], value, f"SAELens on saelab's {name}, {key}")
    sae = SAE.load(root / f"saelens_{name}")  # and a folder SAELens wrote
    assert (sae.cfg.architecture, sae.cfg.kind) == TRANSCODERS[name] and sae.cfg.output_size == D_OUT
    assert sae.cfg.metadata["hook_name_out"] == "blocks.3.hook_mlp_out"
    theirs = load_file(root / f"saelens_{name}.out")
    for key, value in transcoder_outputs(sae, inputs).items():
        assert_agree(value, theirs[key], f"saelab on SAELens's {name}, {key}")


@pytest.mark.saelens
@pytest.mark.subprocess
@pytest.mark.parametrize("name", NEWER)
def test_abstopk_and_matching_pursuit_agree_with_saelens_both_ways(transcoder_interop, name):
    root, inputs, ours = transcoder_interop
    theirs = load_file(root / f"saelab_{name}.out")
    info = json.loads((root / f"saelab_{name}.out.json").read_text())
    assert info["class"] == NEWER[name]
    if name == "matching_pursuit":  # its own fields reached SAELens's config
        assert (info["cfg"]["max_iterations"], info["cfg"]["residual_threshold"]) == (6, 0.5)
    for key, value in transcoder_outputs(ours[name], inputs).items():
        assert_agree(theirs[key], value, f"SAELens on saelab's {name}, {key}")
    sae = SAE.load(root / f"saelens_{name}")
    assert sae.cfg.architecture == name
    theirs = load_file(root / f"saelens_{name}.out")
    encoded = transcoder_outputs(sae, inputs)
    for key, value in encoded.items():
        assert_agree(value, theirs[key], f"saelab on SAELens's {name}, {key}")
    if name == "abstopk":
        assert (encoded["encode"] < 0).any() and ((encoded["encode"] != 0).sum(-1) == K).all()
    else:
        assert sae.cfg.options["max_iterations"] == 5 and (encoded["encode"] != 0).sum(-1).max() <= 5


# --- saelab alone: the folder format -------------------------------------------------------------

@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_save_load_roundtrip(tmp_path, arch):
    sae = random_saelab_sae(arch, seed=1)
    sparsity = torch.linspace(-10, -1, D_SAE)
    sae.save(tmp_path / "sae", sparsity=sparsity, runner_cfg={"lr": 3e-4, "path": tmp_path})
    loaded = SAE.load(tmp_path / "sae")
    assert type(loaded) is type(sae)
    for field in ("d_in", "d_sae", "architecture", "k", "apply_b_dec_to_input"):
        assert getattr(loaded.cfg, field) == getattr(sae.cfg, field), field
    assert loaded.cfg.metadata.items() >= sae.cfg.metadata.items()
    assert sae.state_dict().keys() == loaded.state_dict().keys()
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    inputs = make_inputs()
    for key, value in saelab_outputs(sae, inputs).items():
        assert torch.equal(saelab_outputs(loaded, inputs)[key], value), key
    assert torch.equal(load_sparsity(tmp_path / "sae"), sparsity)
    assert json.loads((tmp_path / "sae" / "runner_cfg.json").read_text())["lr"] == 3e-4
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["dtype"] == "float32" and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == METADATA["hook_name"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "sae").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    # SAELens reads a cfg as 6.x only when metadata.sae_lens_version parses as a version >= 6.0.
    version = cfg["metadata"]["sae_lens_version"]
    assert int(version.split(".")[0]) >= 6 and all(part.isdigit() for part in version.split("."))
    # Saving over an existing folder replaces it whole.
    other = random_saelab_sae(arch, seed=2)
    other.save(tmp_path / "sae")
    assert torch.equal(SAE.load(tmp_path / "sae").W_enc, other.W_enc)
    assert load_sparsity(tmp_path / "sae") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def _write_folder(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, folder / "sae_weights.safetensors")
    return folder


def _random_tensors(seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5,
            "W_dec": torch.randn(D_SAE, D_IN, generator=g) * (0.5 + torch.rand(D_SAE, 1, generator=g)),
            "b_enc": 0.3 * torch.randn(D_SAE, generator=g), "b_dec": torch.randn(D_IN, generator=g)}


def _legacy_cfg(**extra) -> dict:
    """A flat config as SAELens 3.x-5.x wrote it: hook, model and context at the top level."""
    return {"d_in": D_IN, "d_sae": D_SAE, "dtype": "torch.float32", "device": "cuda",
            "model_name": "gpt2-small", "hook_point": "blocks.8.hook_resid_pre", "hook_point_layer": 8,
            "hook_point_head_index": None, "context_size": 128, "dataset_path": "Skylion007/openwebtext",
            "apply_b_dec_to_input": True, "normalize_activations": False, "prepend_bos": True,
            "finetuning_scaling_factor": False, "sae_lens_training_version": "3.13.0", **extra}


LEGACY_VARIANTS = {
    # SAELens 4.x/5.x spelled a TopK SAE as architecture "standard" with a topk activation function.
    "topk-as-standard-activation": ({"architecture": "standard", "activation_fn_str": "topk",
                                     "activation_fn_kwargs": {"k": K}}, K),
    "topk-no-architecture": ({"activation_fn": "topk", "activation_fn_kwargs": {"k": K}}, K),
    "topk-architecture": ({"architecture": "topk", "activation_fn_kwargs": {"k": K}}, K),
    "standard-relu": ({"activation_fn_str": "relu", "activation_fn_kwargs": {}}, None),
    "standard-no-architecture": ({}, None),
}


@pytest.mark.parametrize("variant", sorted(LEGACY_VARIANTS))
def test_legacy_flat_cfg_loads(tmp_path, variant):
    extra, k = LEGACY_VARIANTS[variant]
    tensors = _random_tensors()
    sae = SAE.load(_write_folder(tmp_path / variant, _legacy_cfg(**extra), tensors))
    assert isinstance(sae, TopKSAE if k else StandardSAE) and sae.cfg.k == k
    assert sae.cfg.metadata["hook_name"] == "blocks.8.hook_resid_pre"
    assert sae.cfg.metadata["model_name"] == "gpt2-small" and sae.cfg.metadata["context_size"] == 128
    assert sae.cfg.metadata["hook_head_index"] is None
    x = make_inputs()["x"]
    with torch.no_grad():
        f = sae.encode(x)
        assert_agree(f, reference_encode(x, tensors["W_enc"], tensors["b_enc"], tensors["b_dec"], k), "encode")
        assert_agree(sae.decode(f), f @ tensors["W_dec"] + tensors["b_dec"], "decode")


def test_legacy_scaling_factor_is_folded(tmp_path):
    """Pre-6.0 SAEs fine-tuned with a per-latent ``scaling_factor`` decode ``(f * scaling_factor) @ W_dec``."""
    tensors = _random_tensors()
    tensors["scaling_factor"] = 0.5 + torch.rand(D_SAE, generator=torch.Generator().manual_seed(9))
    sae = SAE.load(_write_folder(tmp_path / "sae", _legacy_cfg(finetuning_scaling_factor=True), tensors))
    x = make_inputs()["x"]
    with torch.no_grad():
        f = sae.encode(x)
        assert_agree(f, reference_encode(x, tensors["W_enc"], tensors["b_enc"], tensors["b_dec"]), "encode")
        expected = (f * tensors["scaling_factor"]) @ tensors["W_dec"] + tensors["b_dec"]
        assert_agree(sae.decode(f), expected, "decode")


def test_topk_rescale_acts_by_decoder_norm_is_folded(tmp_path):
    tensors = _random_tensors()
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "architecture": "topk", "k": K, "rescale_acts_by_decoder_norm": True,
           "metadata": {"sae_lens_version": "6.54.12", "hook_name": "model.layers.3"}}
    sae = SAE.load(_write_folder(tmp_path / "sae", cfg, tensors))
    x = make_inputs()["x"]
    norms = tensors["W_dec"].norm(dim=-1)
    pre = ((x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]) * norms
    values, indices = pre.topk(K, dim=-1)
    expected_f = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    with torch.no_grad():
        f = sae.encode(x)
        assert_agree(f, expected_f, "encode")
        assert_agree(sae.decode(f), (f / norms) @ tensors["W_dec"] + tensors["b_dec"], "decode")


def test_cfg_disagreeing_with_weights_is_a_format_error(tmp_path):
    folder = tmp_path / "sae"
    random_saelab_sae("standard", seed=3).save(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "d_in": D_IN + 1}))
    with pytest.raises(SAEFormatError, match="W_enc"):
        SAE.load(folder)


def test_missing_tensor_and_missing_files_are_format_errors(tmp_path):
    tensors = _random_tensors()
    del tensors["b_enc"]
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "architecture": "standard", "metadata": {}}
    with pytest.raises(SAEFormatError, match="b_enc"):
        SAE.load(_write_folder(tmp_path / "no_b_enc", cfg, tensors))
    with pytest.raises(SAEFormatError, match="cfg.json"):
        SAE.load(tmp_path)
    with pytest.raises(SAEFormatError, match="normalize_activations"):
        SAE.load(_write_folder(tmp_path / "norm", {**cfg, "normalize_activations": "expected_average_only_in"},
                               _random_tensors()))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
