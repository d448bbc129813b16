"""What an SAE folder's ``cfg.json`` describes: the shapes, the architecture and what it was trained on."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    architecture: str
    k: int | None = None                    # topk: latents kept per token; batchtopk, matryoshka: on average
    apply_b_dec_to_input: bool = True
    metadata: dict = field(default_factory=dict)  # model, hook, context and dataset it was trained on
