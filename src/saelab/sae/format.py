"""Read and write the SAELens (6.x) SAE folder: ``cfg.json``, ``sae_weights.safetensors``, optional
``sparsity.safetensors`` and ``runner_cfg.json``. Older flat (pre-6.0) configs are read too."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from saelab.sae.base import SAE, SAEConfig
from saelab.sae.standard import StandardSAE
from saelab.sae.topk import TopKSAE

ARCHITECTURES: dict[str, type[SAE]] = {"standard": StandardSAE, "topk": TopKSAE}
WEIGHTS_FILE, CONFIG_FILE, SPARSITY_FILE, RUNNER_FILE = (
    "sae_weights.safetensors", "cfg.json", "sparsity.safetensors", "runner_cfg.json")
# Keys that pre-6.0 SAELens configs keep at the top level and 6.x keeps under "metadata".
LEGACY_METADATA_KEYS = ("model_name", "hook_name", "hook_point", "hook_head_index", "context_size",
                        "prepend_bos", "dataset_path", "model_class_name", "model_from_pretrained_kwargs",
                        "seqpos_slice", "exclude_special_tokens", "sequence_separator_token",
                        "neuronpedia_id", "sae_lens_training_version")


class SAEFormatError(ValueError):
    pass


def create_sae(cfg: SAEConfig) -> SAE:
    if cfg.architecture not in ARCHITECTURES:
        raise SAEFormatError(f"unknown SAE architecture {cfg.architecture!r}; "
                             f"saelab knows {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[cfg.architecture](cfg)


def config_to_json(cfg: SAEConfig) -> dict:
    out = {"d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": cfg.apply_b_dec_to_input, "normalize_activations": "none",
           "reshape_activations": "none", "architecture": cfg.architecture}
    if cfg.k is not None:
        out["k"] = cfg.k
    out["metadata"] = {"hook_head_index": None, "model_class_name": "AutoModelForCausalLM",
                       "model_from_pretrained_kwargs": {}, "seqpos_slice": [None],
                       "sequence_separator_token": "bos", "disable_concat_sequences": False,
                       "neuronpedia_id": None, **cfg.metadata}
    return out


def config_from_json(raw: dict, where: str) -> SAEConfig:
    try:
        d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
    except KeyError as err:
        raise SAEFormatError(f"{where}: cfg.json lacks {err.args[0]!r}; is this an SAE folder?") from None
    architecture = raw.get("architecture", "standard")
    if raw.get("normalize_activations", "none") not in ("none", None):
        raise SAEFormatError(f"{where}: normalize_activations={raw['normalize_activations']!r} is not "
                             "supported; fold the normalisation into the weights before saving")
    metadata = dict(raw.get("metadata") or {})
    for key in LEGACY_METADATA_KEYS:
        if key in raw and key not in metadata:
            metadata[key] = raw[key]
    if "hook_name" not in metadata and "hook_point" in metadata:
        metadata["hook_name"] = metadata["hook_point"]
    k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
    return SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, k=int(k) if k is not None else None,
                     apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)), metadata=metadata)


def save_sae(sae: SAE, folder, sparsity: torch.Tensor | None = None, runner_cfg: dict | None = None) -> None:
    """Write the folder atomically: a reader sees the old folder or the whole new one, never a mix."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        tensors = {name: p.detach().float().cpu().contiguous() for name, p in sae.state_dict().items()}
        save_file(tensors, staging / WEIGHTS_FILE)
        (staging / CONFIG_FILE).write_text(json.dumps(config_to_json(sae.cfg), indent=2))
        if sparsity is not None:
            save_file({"sparsity": sparsity.float().cpu().contiguous()}, staging / SPARSITY_FILE)
        if runner_cfg is not None:
            (staging / RUNNER_FILE).write_text(json.dumps(runner_cfg, indent=2, default=str))
        _replace_folder(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_folder(new: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def load_sae(folder, device: str | torch.device = "cpu") -> SAE:
    folder = Path(folder)
    if not (folder / CONFIG_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
        raise SAEFormatError(f"{folder} is not an SAE folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE} "
                             "(a run folder keeps its SAE in <run>/final)")
    cfg = config_from_json(json.loads((folder / CONFIG_FILE).read_text()), str(folder))
    tensors = load_file(folder / WEIGHTS_FILE)
    if cfg.architecture in ("batchtopk", "matryoshka_batchtopk") and "jumprelu" in ARCHITECTURES:
        cfg.architecture = "jumprelu"  # saved with a learned threshold, used as JumpReLU
    sae = create_sae(cfg)
    expected = {name: tuple(p.shape) for name, p in sae.state_dict().items()}
    for name, shape in expected.items():
        if name not in tensors:
            raise SAEFormatError(f"{folder}/{WEIGHTS_FILE} lacks tensor {name!r} needed by a {cfg.architecture} SAE")
        if tuple(tensors[name].shape) != shape:
            raise SAEFormatError(f"{folder}: tensor {name} has shape {tuple(tensors[name].shape)} but cfg.json "
                                 f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}) needs {shape}; the folder is inconsistent")
    sae.load_state_dict({name: tensors[name].float() for name in expected})
    return sae.to(device).eval()


def load_sparsity(folder) -> torch.Tensor | None:
    path = Path(folder) / SPARSITY_FILE
    return load_file(path)["sparsity"] if path.exists() else None
