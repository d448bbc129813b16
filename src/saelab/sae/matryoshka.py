"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024): BatchTopK codes, and every prefix of the
dictionary in ``matryoshka_widths`` (strictly increasing, the last = d_sae) must reconstruct the input on
its own; the loss is the sum of the prefixes' losses. Early latents learn general features, later ones
refine them instead of absorbing them. Exports as a JumpReLU SAE, like BatchTopK.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

from saelab.options import option
from saelab.sae.base import TrainOutput, TrainStep, normalized_error
from saelab.sae.batchtopk import BatchTopKSAE, BatchTopKSettings
from saelab.sae.registry import Architecture
from saelab.sae.sparse import decode_support

DEFAULT_WIDTHS = "1/16,1/8,1/4,1/2,1"


def parse_widths(spec: str | Sequence | None) -> list[int | Fraction]:
    """``"128,512,2048"`` (latent counts) or ``"1/16,0.25,1"`` (fractions of d_sae: as soon as one entry is
    written with / or . or is a float, all are fractions, so the final ``1`` there means the whole SAE)."""
    if spec is None:
        spec = DEFAULT_WIDTHS
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    fractions = any(isinstance(i, float) or (isinstance(i, str) and ("/" in i or "." in i)) for i in items)
    widths = []
    for item in items:
        try:
            if not fractions:
                widths.append(int(item))
            elif isinstance(item, float):
                widths.append(Fraction(item).limit_denominator(1 << 20))
            else:
                widths.append(Fraction(item))
        except (ValueError, TypeError, ZeroDivisionError):
            raise ValueError(f"matryoshka widths must be comma-separated integers or fractions, got {spec!r}") from None
    if not widths or any(w <= 0 for w in widths):
        raise ValueError(f"matryoshka widths must be positive, got {spec!r}")
    if any(isinstance(w, Fraction) and w > 1 for w in widths):
        raise ValueError(f"matryoshka width fractions must be at most 1, got {spec!r}")
    return widths


def resolve_widths(spec: str | Sequence | None, d_sae: int) -> list[int]:
    """Latent counts, strictly increasing; d_sae is appended when the last prefix is not the whole SAE."""
    widths = [round(w * d_sae) if isinstance(w, Fraction) else w for w in parse_widths(spec)]
    if widths[-1] != d_sae:
        widths.append(d_sae)
    if any(b <= a for a, b in zip(widths, widths[1:])) or widths[0] < 1 or widths[-1] != d_sae:
        raise ValueError(f"matryoshka widths {spec!r} give prefixes {widths} for d_sae={d_sae}: they must be "
                         "strictly increasing, positive and at most d_sae")
    return widths


@dataclass
class MatryoshkaSettings(BatchTopKSettings):
    matryoshka_widths: str | None = option(None, "Nested prefix widths, strictly increasing: latent counts "
                                           "(128,512,4608) or fractions of d_sae (1/16,0.25,1); d_sae is added as "
                                           "the last (default 1/16,1/8,1/4,1/2,1).", fixed_on_resume=True)

    def __post_init__(self):
        super().__post_init__()
        if self.matryoshka_widths is not None:
            parse_widths(self.matryoshka_widths)  # a ValueError naming the bad widths


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    architecture = "matryoshka_batchtopk"

    def __init__(self, cfg, settings: MatryoshkaSettings | None = None):
        super().__init__(cfg, settings or MatryoshkaSettings())
        self.widths = resolve_widths(self.settings.matryoshka_widths, cfg.d_sae)

    def training_forward(self, x: torch.Tensor, step: TrainStep, target: torch.Tensor | None = None) -> TrainOutput:
        target = x if target is None else target
        values, support = self._encode_sparse(x, step.data_parallel)
        parts, loss, skip = {}, 0.0, self.skip(x)
        for width in self.widths:
            kept = values if width == self.cfg.d_sae else values * (support.latents < width)
            x_hat = decode_support(support, kept, self.W_dec) + self.b_dec + skip
            parts[f"mse_{width}"] = normalized_error(x_hat - target, target, step.data_parallel)
            loss = loss + parts[f"mse_{width}"]
        parts["mse"] = parts[f"mse_{self.cfg.d_sae}"]  # x_hat is now the whole dictionary's reconstruction
        loss = loss + self._auxk_term(x, target - x_hat, step, parts)
        return self._output(loss, x_hat, values, support, parts)


MATRYOSHKA = Architecture(
    name="matryoshka_batchtopk", module=MatryoshkaBatchTopKSAE, settings=MatryoshkaSettings, aliases=("matryoshka",),
    sparsity="k", sweep_values="16,32,64", label="k", remedies=("auxk",), default_remedy="auxk", loads_as="jumprelu",
    in_default_sweep=False,  # a sweep trains it when --architectures names it
    summary="nested BatchTopK prefixes (--matryoshka-widths) each trained to reconstruct; saved as jumprelu "
            "(Bussmann et al. 2025)")
