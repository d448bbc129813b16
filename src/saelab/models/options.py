"""The command-line options that name a model and a device, declared once for every command."""

from __future__ import annotations

from dataclasses import dataclass

from saelab.options import option

DEFAULT_MODEL = "smollm2-135m"
MODEL_HELP = ("Language model: an embedded alias (smollm2-135m), a local transformers folder, a .gguf file, or a "
              "Hugging Face hub id.")
DEVICE_HELP = "cpu, cuda, cuda:1 ... (default: cuda when available; under torchrun each process takes GPU LOCAL_RANK)."


def model_option(default: str | None = DEFAULT_MODEL, note: str = "", **roles):
    return option(default, MODEL_HELP + note, **roles)


def device_option(**roles):
    return option(None, DEVICE_HELP, runtime=True, **roles)


@dataclass
class ModelOptions:
    """Which model runs, and where: train and cache."""

    model: str = model_option(shared=True, cached=True)
    device: str | None = device_option(shared=True)
