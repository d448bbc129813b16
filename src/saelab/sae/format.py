"""Read and write the SAELens (6.x) SAE folder: ``cfg.json``, ``sae_weights.safetensors``, optional
``sparsity.safetensors`` and ``runner_cfg.json``. Older flat (pre-6.0) configs are read too.

Crosscoders, which SAELens does not have, use the same folder (docs/CROSSCODER_FORMAT.md): architecture
``<rule>_crosscoder``, ``n_hooks``, metadata ``hook_names``, and per-hook weights as 3-d tensors (``W_enc``
``[n_hooks, d, d_sae]``, ``W_dec`` ``[d_sae, n_hooks, d]``, ``b_dec`` ``[n_hooks, d]``, the layout of
dictionary_learning's CrossCoder); saelab holds them flattened (``d_in = n_hooks * d``). Cross-layer transcoders
likewise (``<rule>_clt``, per-block tensors: see ``_per_hook``)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from safetensors.torch import save_file

from saelab.files import FileFormatError, read_json, read_safetensors, writing
from saelab.sae.config import KINDS, SAEConfig
from saelab.sae.registry import architecture, create_sae


WEIGHTS_FILE, CONFIG_FILE, SPARSITY_FILE, RUNNER_FILE = (
    "sae_weights.safetensors", "cfg.json", "sparsity.safetensors", "runner_cfg.json")
# Keys that pre-6.0 SAELens configs keep at the top level and 6.x keeps under "metadata".
LEGACY_METADATA_KEYS = ("model_name", "hook_name", "hook_point", "hook_head_index", "context_size",
                        "prepend_bos", "dataset_path", "model_class_name", "model_from_pretrained_kwargs",
                        "seqpos_slice", "exclude_special_tokens", "sequence_separator_token",
                        "neuronpedia_id", "sae_lens_training_version",
                        "hook_name_out", "hook_head_index_out")  # the last two: transcoders of older SAELens
# Pre-6.0 spellings of 6.x metadata keys.
LEGACY_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index"}
# SAELens reads cfg.json as the 6.x layout only when metadata.sae_lens_version parses as a version >= 6.0;
# otherwise it takes the file for a flat pre-6.0 config and drops the nested metadata (hook, model, ...).
LAYOUT_VERSION = "6.0.0"


class SAEFormatError(FileFormatError):
    pass


# Per-hook tensors of a crosscoder folder: how each saelab tensor is reshaped there (n: n_hooks).
CROSSCODER_LAYOUT = {"W_enc": lambda cfg: (cfg.n_hooks, cfg.hook_width, cfg.d_sae),
                     "W_dec": lambda cfg: (cfg.d_sae, cfg.n_hooks, cfg.hook_width),
                     "b_dec": lambda cfg: (cfg.n_hooks, cfg.hook_width)}


def _per_hook(cfg: SAEConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """saelab's flat tensors in a multi-hook folder's layout. A crosscoder's: CROSSCODER_LAYOUT. A cross-layer
    transcoder's, per block (n blocks of m latents): ``W_enc`` ``[n, d_in, m]`` (the weights each block has),
    ``W_dec`` ``[n, m, n, d_out]`` (block l's latents to every output block, zero before l), ``b_dec``
    ``[n, d_out]`` and every per-latent vector ``[n, m]``."""
    if not cfg.cross_layer:
        return {**tensors, **{name: tensors[name].reshape(shape(cfg)) for name, shape in CROSSCODER_LAYOUT.items()}}
    n, m = cfg.n_hooks, cfg.d_sae // cfg.n_hooks
    blocks = tensors["W_enc"].reshape(n, cfg.hook_width, n, m)
    out = {name: t.reshape(n, m) if t.shape == (cfg.d_sae,) else t for name, t in tensors.items()}
    out["W_enc"] = torch.stack([blocks[layer, :, layer] for layer in range(n)]).contiguous()
    out["W_dec"] = tensors["W_dec"].reshape(n, m, n, cfg.output_hook_width)
    out["b_dec"] = tensors["b_dec"].reshape(n, cfg.output_hook_width)
    return out


def _flattened(cfg: SAEConfig, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """The inverse of ``_per_hook``: a folder's tensors in the shapes saelab holds (``shapes``); tensors already
    flat, or of other shapes (for the error message), are left as they are."""
    out = dict(tensors)
    if cfg.cross_layer and "W_enc" in tensors and tuple(tensors["W_enc"].shape) == \
            (cfg.n_hooks, cfg.hook_width, cfg.d_sae // cfg.n_hooks):
        n, blocks = cfg.n_hooks, tensors["W_enc"]
        full = torch.zeros(n, cfg.hook_width, n, blocks.shape[2], dtype=blocks.dtype)
        for layer in range(n):
            full[layer, :, layer] = blocks[layer]
        out["W_enc"] = full
    for name, shape in shapes.items():
        if name in out and tuple(out[name].shape) != shape and out[name].numel() == math.prod(shape):
            out[name] = out[name].reshape(shape)
    return out


def folder_architecture(cfg: SAEConfig) -> str:
    """The ``architecture`` a folder records: an SAE's own name; a transcoder's as SAELens names them, the
    activation rule before the kind (``jumprelu_skip_transcoder``; ReLU + L1 is plain ``transcoder``); a
    crosscoder's likewise (``topk_crosscoder``, ``crosscoder``)."""
    if cfg.kind == "sae":
        return cfg.architecture
    rule = "" if cfg.architecture == "standard" else f"{cfg.architecture}_"
    return rule + cfg.kind


def parse_folder_architecture(name: str) -> tuple[str, str]:
    """``(architecture, kind)`` from a folder's ``architecture``: the inverse of ``folder_architecture``."""
    for kind in sorted((k for k in KINDS.values() if k.name != "sae"), key=lambda k: -len(k.name)):
        if name == kind.name:
            return "standard", kind.name
        if name.endswith("_" + kind.name):
            return name[:-len(kind.name) - 1], kind.name
    return name, "sae"


def config_to_json(cfg: SAEConfig) -> dict:
    out = {"d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": cfg.apply_b_dec_to_input, "normalize_activations": "none",
           "reshape_activations": "none", "architecture": folder_architecture(cfg)}
    if cfg.separate_output:
        out["d_out"] = cfg.output_size
    if cfg.n_hooks > 1:
        out["n_hooks"] = cfg.n_hooks
    if cfg.k is not None:
        out["k"] = cfg.k
    out.update(cfg.options)
    out["metadata"] = {"hook_head_index": None, "model_class_name": "AutoModelForCausalLM",
                       "model_from_pretrained_kwargs": {}, "seqpos_slice": [None],
                       "sequence_separator_token": "bos", "disable_concat_sequences": False,
                       "neuronpedia_id": None, **cfg.metadata}
    if not _is_6x_version(out["metadata"].get("sae_lens_version")):
        out["metadata"]["sae_lens_version"] = LAYOUT_VERSION
    return out


def _is_6x_version(version) -> bool:
    match = re.fullmatch(r"(\d+)\.\d+\.\d+", str(version))
    return match is not None and int(match.group(1)) >= 6


def config_from_json(raw: dict, where: str) -> SAEConfig:
    try:
        d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
    except KeyError as err:
        raise SAEFormatError(f"{where}: cfg.json lacks {err.args[0]!r}; is this an SAE folder?") from None
    name, kind = parse_folder_architecture(raw.get("architecture") or "standard")
    # Pre-6.0: a TopK SAE was architecture "standard" with activation_fn(_str) "topk".
    activation = raw.get("activation_fn", raw.get("activation_fn_str"))
    if activation == "topk" and name == "standard":
        name = "topk"
    elif activation not in (None, "relu", "topk"):
        raise SAEFormatError(f"{where}: activation function {activation!r} is not supported (saelab reads "
                             "relu and topk SAEs)")
    normalize = raw.get("normalize_activations", "none")
    if normalize not in ("none", None, False):  # pre-6.0 wrote a bool; True meant expected_average_only_in
        raise SAEFormatError(f"{where}: normalize_activations={normalize!r} is not "
                             "supported; fold the normalisation into the weights before saving")
    metadata = dict(raw.get("metadata") or {})
    for key in (*LEGACY_METADATA_KEYS, *LEGACY_RENAMES):
        if key in raw and key not in metadata:
            metadata[key] = raw[key]
    for old, new in LEGACY_RENAMES.items():
        if new not in metadata and old in metadata:
            metadata[new] = metadata[old]
    k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
    d_out = raw.get("d_out") if kind != "sae" else None
    try:
        own = architecture(name).module.folder_options
    except ValueError:
        own = {}  # an unknown architecture: load_sae names it
    options = {key: raw.get(key, default) for key, default in own.items()}
    return SAEConfig(d_in=d_in, d_sae=d_sae, architecture=name, k=int(k) if k is not None else None,
                     apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)), metadata=metadata,
                     kind=kind, d_out=int(d_out) if d_out is not None else None, options=options,
                     n_hooks=int(raw.get("n_hooks", 1)))


def save_sae(sae: nn.Module, folder, sparsity: torch.Tensor | None = None, runner_cfg: dict | None = None) -> None:
    """Write the folder atomically: a reader sees the old folder or the whole new one, never a mix. ``sae``
    is an inference module (``SAE.save`` exports a training module first)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    kept = "the folder there before, if any, is intact: free some disk space and save again"
    try:
        with writing(folder, "the SAE folder", kept):
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes the folder 0700: others could not read the SAE
            tensors = {name: p.detach().float().cpu().contiguous() for name, p in sae.state_dict().items()}
            if sae.cfg.n_hooks > 1:
                tensors = {name: t.contiguous() for name, t in _per_hook(sae.cfg, tensors).items()}
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


def _config_json(folder: Path) -> dict:
    if not (folder / CONFIG_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
        raise SAEFormatError(f"{folder} is not an SAE folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE} "
                             "(a run folder keeps its SAE in <run>/final)")
    return read_json(folder / CONFIG_FILE, "Save or download the SAE folder again.")


def read_sae_config(folder) -> SAEConfig:
    """An SAE folder's config (cfg.json), without reading its weights."""
    return config_from_json(_config_json(Path(folder)), str(folder))


def load_sae(folder, device: str | torch.device = "cpu") -> nn.Module:
    folder = Path(folder)
    raw = _config_json(folder)
    cfg = config_from_json(raw, str(folder))
    tensors = read_safetensors(folder / WEIGHTS_FILE, "Save or download the SAE folder again.")
    saved_as = cfg.architecture
    try:
        loads_as = architecture(saved_as).loads_as
    except ValueError as err:
        raise SAEFormatError(f"{folder}/{CONFIG_FILE}: {err}") from None
    if loads_as == "jumprelu":  # saved with a learned threshold, used as JumpReLU
        cfg.architecture, cfg.k = loads_as, None
        if "threshold" not in tensors and "topk_threshold" in tensors:  # a SAELens training checkpoint
            tensors["threshold"] = torch.full((cfg.d_sae,), float(tensors["topk_threshold"]))
    if cfg.architecture == "jumprelu" and "threshold" not in tensors and "log_threshold" in tensors:
        tensors["threshold"] = tensors["log_threshold"].float().exp()  # older SAELens training checkpoints
    sae = create_sae(cfg)
    expected = {name: tuple(p.shape) for name, p in sae.state_dict().items()}
    if cfg.n_hooks > 1:  # per-hook tensors, flattened as saelab holds them
        tensors = _flattened(cfg, tensors, expected)
    for name, shape in expected.items():
        if name not in tensors:
            raise SAEFormatError(f"{folder}/{WEIGHTS_FILE} lacks tensor {name!r} needed by a {cfg.architecture} SAE")
        if tuple(tensors[name].shape) != shape:
            raise SAEFormatError(f"{folder}: tensor {name} has shape {tuple(tensors[name].shape)} but cfg.json "
                                 f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}"
                                 f"{f', d_out={cfg.output_size}' if cfg.separate_output else ''}) needs {shape}; "
                                 "the folder is inconsistent")
    state = {name: tensors[name].float() for name in expected}
    if "scaling_factor" in tensors:  # pre-6.0 fine-tuning: x_hat = (f * scaling_factor) @ W_dec + b_dec
        scale = tensors["scaling_factor"].float()
        if tuple(scale.shape) != (cfg.d_sae,):
            raise SAEFormatError(f"{folder}: scaling_factor has shape {tuple(scale.shape)}, not ({cfg.d_sae},)")
        state["W_dec"] = state["W_dec"] * scale[:, None]
    if (cfg.architecture in ("topk", "abstopk") or loads_as == "jumprelu") and raw.get("rescale_acts_by_decoder_norm"):
        # SAELens ranks pre * ||W_dec row|| and decodes with unit rows: fold the norms into the weights.
        norms = state["W_dec"].norm(dim=1).clamp_min(1e-8)
        state["W_enc"] = state["W_enc"] * norms
        state["b_enc"] = state["b_enc"] * norms
        state["W_dec"] = state["W_dec"] / norms[:, None]
    sae.load_state_dict(state)
    return sae.to(device).eval()


def load_sparsity(folder) -> torch.Tensor | None:
    path = Path(folder) / SPARSITY_FILE
    return read_safetensors(path, "Save or download the SAE folder again.")["sparsity"] if path.exists() else None
