"""TransformerLens models (``HookedTransformer`` and subclasses) as a backend next to Hugging Face models.

TransformerLens names every activation by a ``HookPoint`` module whose module path is the hook name
(``blocks.6.hook_resid_post``) and whose output is the activation, so saelab's hooks (PyTorch forward
hooks on that module) read, replace and stop at them as they do on Hugging Face modules. What differs is
the forward call and where the final norm and unembedding live; those differences are kept here.
``transformer_lens`` is an optional dependency (``pip install saelab[tl]``): nothing here imports it until
a model is loaded through it.
"""

from __future__ import annotations

import re

import torch
from torch import nn

TL_PREFIX = "tl:"  # load_model("tl:gpt2-small") loads through TransformerLens
_LAYER = re.compile(r"^blocks\.(\d+)\.")


def is_transformer_lens(model: nn.Module) -> bool:
    """Whether ``model`` is a TransformerLens model (checked by class, without importing transformer_lens)."""
    return any(cls.__name__ == "HookedRootModule" and cls.__module__.startswith("transformer_lens")
               for cls in type(model).__mro__)


def tl_hook_names(model: nn.Module) -> list[str]:
    """Every hook point of the model, in TransformerLens's order."""
    return list(model.hook_dict)


def tl_has_hook(model: nn.Module, name: str) -> bool:
    """A hook point, or a module put in its place (an SAE attached by ``HookedSAETransformer.add_sae``)."""
    if name in model.hook_dict:
        return True
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return bool(name)


def tl_hook_layer(name: str) -> int | None:
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def lm_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Run the model on token ids (the hooks fire); returns the model's own output."""
    if is_transformer_lens(model):
        return model(input_ids, attention_mask=attention_mask)
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


def lm_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[batch, seq, vocab]`` next-token logits of a Hugging Face or TransformerLens model."""
    out = lm_forward(model, input_ids, attention_mask)
    return out if isinstance(out, torch.Tensor) else out.logits


def tl_unembedding(model: nn.Module) -> torch.Tensor:
    """``[vocab, d_model]``, as a Hugging Face output embedding's weight (TransformerLens keeps ``W_U`` transposed)."""
    return model.W_U.detach().float().T


def load_tl_model(name: str, device: torch.device, dtype: torch.dtype):
    """``(model, tokenizer)`` for ``tl:<TransformerLens model name>``, weights as the hub has them (no folding
    or centring, so activations match the Hugging Face model's)."""
    try:
        from transformer_lens import HookedTransformer
    except ImportError as err:
        raise ImportError(f"model {TL_PREFIX}{name} needs TransformerLens: pip install 'saelab[tl]' "
                          "(transformer_lens>=2,<4)") from err
    model = HookedTransformer.from_pretrained_no_processing(name, device=str(device), dtype=dtype)
    if model.tokenizer is None:
        raise ValueError(f"TransformerLens model {name!r} came without a tokenizer; build it with one "
                         "(HookedTransformer(cfg, tokenizer=...)) and pass the model object instead")
    return model.eval(), model.tokenizer
