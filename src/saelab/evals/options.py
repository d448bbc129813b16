"""The command-line options of every command that reads an existing SAE (eval, dashboard, features, steer,
attribute, neuronpedia-export): which SAE, its model and hook, and the text read through them. Declared once;
model, dataset, split, text column and context size reuse the training options' help texts."""

from __future__ import annotations

from dataclasses import MISSING, dataclass

from saelab.data.options import context_size_option, dataset_option, split_option, text_column_option
from saelab.models.options import device_option, model_option
from saelab.options import option


@dataclass(kw_only=True)
class SAEOptions:
    sae: str = option(MISSING, "SAE folder (cfg.json + sae_weights.safetensors), or a run folder of `saelab train` "
                      "(its final/ SAE is used).", positional=True, metavar="SAE_FOLDER")
    model: str | None = model_option(None, " Default: the SAE's cfg.json metadata model_name.")
    hook: str | None = option(None, "Hook point, TransformerLens-style name or module path (default: the SAE's "
                              "metadata hook_name).")
    device: str | None = device_option()


@dataclass
class CorpusOptions:
    """Text read through the model and the SAE, packed as the SAE was trained (its metadata) unless given."""

    dataset: str = dataset_option(note=" Its first --tokens tokens are used.")
    dataset_split: str = split_option()
    text_column: str | None = text_column_option()
    context_size: int | None = context_size_option(None, " Default: the SAE's metadata context_size, else 128.")
    batch_contexts: int = option(8, "Contexts per model forward pass.", positive=True)
    include_special_tokens: bool = option(False, "Also read BOS/EOS/pad positions (default: left out, as in "
                                          "training).")
