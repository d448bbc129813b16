"""Language models: loading (hub id, folder, GGUF, embedded default) and hook points."""

from saelab.models.hooks import (HookNameError, HookPoint, capture, hook_layer, hook_names, hook_widths, hooked,
                                 n_layers, resolve_hook)
from saelab.models.loading import EMBEDDED_MODELS, ModelLoadError, cache_dir, default_device, load_model
from saelab.models.transformer_lens_backend import is_transformer_lens, lm_logits

__all__ = ["EMBEDDED_MODELS", "HookNameError", "HookPoint", "ModelLoadError", "cache_dir", "capture",
           "default_device", "hook_layer", "hook_names", "hook_widths", "hooked", "is_transformer_lens", "lm_logits", "load_model",
           "n_layers", "resolve_hook"]
