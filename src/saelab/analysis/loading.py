"""Helpers shared by the analysis commands; opening an SAE with its model lives in ``saelab.evals.loading``."""

from __future__ import annotations

from saelab.evals.loading import Loaded, load_sae_and_model, tokenize
from saelab.sae import SAE

__all__ = ["Loaded", "check_feature", "load_sae_and_model", "show_token", "token_strings", "tokenize"]


def check_feature(sae: SAE | int, feature: int) -> int:
    """``feature`` as a valid latent index of ``sae`` (an SAE or its ``d_sae``), or a ValueError saying the
    valid range."""
    d_sae = sae if isinstance(sae, int) else sae.cfg.d_sae
    if not isinstance(feature, int) or isinstance(feature, bool) or not 0 <= feature < d_sae:
        raise ValueError(f"feature {feature} is out of range: this SAE has {d_sae} features, "
                         f"numbered 0 to {d_sae - 1}")
    return feature


def token_strings(tokenizer, ids) -> list[str]:
    """Each token id as the text it stands for (one string per token, whitespace kept)."""
    return [tokenizer.decode([int(i)]) for i in ids]


def show_token(text: str) -> str:
    """A token made visible in a table: quoted, newlines and tabs escaped."""
    return repr(text)
