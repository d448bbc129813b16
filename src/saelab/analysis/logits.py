"""The tokens a feature's decoder direction promotes and suppresses through the model's output head.

The final norm is linearised: its input's scale (1 / RMS, or 1 / std for LayerNorm) is treated as a
constant, so the norm becomes a diagonal scale by its weight (``1 + weight`` for Gemma's norms), with
the mean removed first for LayerNorm. A vector ``v`` in the residual stream then moves the logits by
``unembed(norm_scale * v)`` up to that constant positive factor. Logit biases and Gemma's soft-capping
are left out (they do not depend on ``v``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from saelab.analysis.loading import check_feature, token_strings
from saelab.models.transformer_lens_backend import is_transformer_lens, tl_unembedding
from saelab.sae import SAE

FINAL_NORM_PATHS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm",
                    "model.final_layernorm", "model.language_model.norm", "transformer.norm_f", "ln_final")
GEMMA_OFFSET_NORMS = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")  # these scale by 1 + weight
TL_CENTERING_NORMS = ("LayerNorm", "LayerNormPre")  # TransformerLens's LayerNorms (not nn.LayerNorm); weight "w"


@dataclass
class FinalNorm:
    module: nn.Module
    scale: torch.Tensor     # [d_model] the diagonal the linearised norm multiplies by
    centers: bool           # LayerNorm: subtracts the mean first
    eps: float

    def linear(self, v: torch.Tensor) -> torch.Tensor:
        """The linearised norm applied to ``v`` (any leading shape), without the 1/RMS factor."""
        v = v.float()
        if self.centers:
            v = v - v.mean(-1, keepdim=True)
        return v * self.scale

    def inverse_rms(self, x: torch.Tensor) -> torch.Tensor:
        """The factor the real norm divides its input ``x`` by, inverted: 1/RMS (1/std with centring)."""
        x = x.float()
        if self.centers:
            x = x - x.mean(-1, keepdim=True)
        return torch.rsqrt(x.pow(2).mean(-1) + self.eps)


def final_norm(model: nn.Module) -> FinalNorm:
    """The model's last normalisation before the unembedding, as a linearised ``FinalNorm``."""
    for path in FINAL_NORM_PATHS:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        weight = getattr(module, "weight", getattr(module, "w", None))
        d = unembedding(model).shape[1]
        scale = torch.ones(d) if weight is None else weight.detach().float().cpu()
        if type(module).__name__ in GEMMA_OFFSET_NORMS:
            scale = 1.0 + scale
        centers = isinstance(module, nn.LayerNorm) or (is_transformer_lens(model) and
                                                       type(module).__name__ in TL_CENTERING_NORMS)
        eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
        return FinalNorm(module, scale.to(_device(model)), centers, eps)
    raise ValueError(f"cannot find the final norm of {type(model).__name__} (looked at {', '.join(FINAL_NORM_PATHS)})")


def unembedding(model: nn.Module) -> torch.Tensor:
    """``[vocab, d_model]``: row t maps the normed residual stream to token t's logit."""
    if is_transformer_lens(model):
        return tl_unembedding(model)
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (unembedding) to read logits from")
    return head.weight.detach().float()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def logit_directions(model: nn.Module, token_ids) -> torch.Tensor:
    """``[len(token_ids), d_model]``: the residual-stream directions whose dot product with a vector is that
    vector's direct effect on each token's logit through the linearised final norm (1/RMS left out)."""
    norm = final_norm(model)
    rows = unembedding(model)[torch.as_tensor(token_ids, device=_device(model))]
    # (P v * s) . u  =  v . P(s * u), P the (symmetric) centring projection.
    return norm.linear(rows)


@dataclass
class LogitEffects:
    feature: int
    top: list[tuple[int, str, float]]       # (token id, token, logit change per unit activation), largest first
    bottom: list[tuple[int, str, float]]    # most negative first


@torch.no_grad()
def logit_effect_rows(model: nn.Module, sae: SAE, features: list[int]) -> torch.Tensor:
    """``[len(features), vocab]``: each feature's logit change per unit of activation on every token, its decoder
    direction (at the last hook it writes) taken through the linearised final norm and the unembedding (1/RMS
    factor left out)."""
    for feature in features:
        check_feature(sae, feature)
    norm = final_norm(model)
    # A crosscoder or CLT writes several hooks: its direct effect is through the last, nearest the output.
    directions = sae.decoder_by_hook()[list(features), -1].detach().float().to(_device(model))
    if directions.shape[1] != norm.scale.shape[0]:
        raise ValueError(f"the SAE writes activations {directions.shape[1]} wide, not the model's width "
                         f"({norm.scale.shape[0]}): logit effects need a dictionary that writes a "
                         "residual-stream-sized hook of this model")
    return norm.linear(directions) @ unembedding(model).T


@torch.no_grad()
def logit_effects(model: nn.Module, tokenizer, sae: SAE, feature: int, n: int = 10) -> LogitEffects:
    """The ``n`` tokens whose logits ``W_dec[feature]`` raises most and lowers most, through the linearised
    final norm and the unembedding (values: logit change per unit of activation, 1/RMS factor left out)."""
    check_feature(sae, feature)
    return top_logit_effects([feature], logit_effect_rows(model, sae, [feature]), tokenizer, n)[0]


def top_logit_effects(features: list[int], effects: torch.Tensor, tokenizer, n: int = 10) -> list[LogitEffects]:
    """Per feature, the ``n`` largest and ``n`` smallest of its row of ``[len(features), vocab]`` logit effects,
    with their tokens."""
    if n <= 0:
        raise ValueError(f"the number of tokens to show must be positive, got {n}")
    n = min(n, effects.shape[1])
    top = effects.topk(n, dim=1)
    bottom = effects.topk(n, dim=1, largest=False)

    def listed(ids, values):
        ids = ids.tolist()
        return list(zip(ids, token_strings(tokenizer, ids), values.tolist()))

    return [LogitEffects(feature, listed(top.indices[i], top.values[i]), listed(bottom.indices[i], bottom.values[i]))
            for i, feature in enumerate(features)]


def format_logit_effects(effects: LogitEffects) -> str:
    """Two columns: promoted tokens and suppressed tokens with their logit change."""
    left = [f"{t!r:<18} {v:+.3f}" for _, t, v in effects.top]
    right = [f"{t!r:<18} {v:+.3f}" for _, t, v in effects.bottom]
    width = max([len("promotes"), *(len(s) for s in left)])
    lines = [f"feature {effects.feature}: logit change per unit activation "
             "(decoder direction -> final norm weight -> unembedding)",
             f"  {'promotes':<{width}}   suppresses"]
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ""
        b = right[i] if i < len(right) else ""
        lines.append(f"  {a:<{width}}   {b}")
    return "\n".join(lines)
