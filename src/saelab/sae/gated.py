"""Gated SAE (Rajamanoharan et al. 2024, "Improving dictionary learning with gated sparse autoencoders").

A gate decides which latents are on, ``pre_gate = sae_in @ W_enc + b_gate > 0``; a magnitude path that
shares the encoder up to a per-latent rescaling gives their values, ``relu(sae_in @ (W_enc * exp(r_mag)) +
b_mag)``. The L1 penalty acts on the gate only, so it does not shrink the magnitudes. No ``b_enc``.

Training loss: squared error + ``l1_coefficient * sum(relu(pre_gate) * ||W_dec row||)`` + the squared error
of reconstructing from ``relu(pre_gate)`` through a frozen (detached) copy of the decoder, which gives the
gate's encoder weights a reconstruction signal the Heaviside step cannot pass.
"""

from __future__ import annotations

import torch
from torch import nn

from saelab.sae.base import SAE, START_L0, TrainOutput, TrainStep, normalized_error
from saelab.sae.registry import Architecture
from saelab.sae.sparse import decode_codes, fired_codes, per_latent, training_pre
from saelab.sae.standard import L1Settings
from saelab.sae.topk import TopKSAE


class GatedSAE(SAE):
    architecture = "gated"

    def __init__(self, cfg, settings=None):
        super().__init__(cfg, settings)
        del self.b_enc
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        """The gate's pre-activation."""
        return self.sae_in(x) @ self.W_enc + self.b_gate

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        sae_in = self.sae_in(x)
        gate = (sae_in @ self.W_enc + self.b_gate) > 0
        magnitude = (sae_in @ (self.W_enc * self.r_mag.exp()) + self.b_mag).relu()
        return magnitude * gate

    def training_forward(self, x: torch.Tensor, step: TrainStep, target: torch.Tensor | None = None) -> TrainOutput:
        self.check_width(x)
        target = x if target is None else target
        # Every term is non-zero only where the gate is open: when those entries are few, only they are computed
        # (sparse.py). One product serves both paths: (sae_in @ W_enc) * exp(r_mag) is the magnitude's.
        pre_gate, support = training_pre(x, self.W_enc, self.b_gate, self.b_dec, self.cfg.apply_b_dec_to_input,
                                         lambda pre: pre > 0, self.sparse_below)
        projected = pre_gate - per_latent(self.b_gate, support)
        magnitude = (projected * per_latent(self.r_mag, support).exp() + per_latent(self.b_mag, support)).relu()
        f = magnitude * (pre_gate > 0)
        skip = self.skip(x)
        x_hat = decode_codes(f, self.W_dec, support) + self.b_dec + skip
        squared_error = (x_hat - target).pow(2).sum(-1).mean()
        gate_acts = pre_gate.relu()
        l1 = (gate_acts * per_latent(self.decoder_norms(), support)).sum() / len(x)
        via_gate = (decode_codes(gate_acts, self.W_dec.detach(), support) + self.b_dec.detach()
                    + (skip.detach() if self.cfg.skip else 0.0))
        aux = (via_gate - target).pow(2).sum(-1).mean()
        loss = squared_error + self.settings.l1_coefficient * step.penalty_scale * l1 + aux
        return TrainOutput(loss=loss, x_hat=x_hat, fired=fired_codes(f, support),
                           parts={"mse": normalized_error(x_hat - target, target), "l1": l1, "aux": aux})

    @torch.no_grad()
    def initialize(self, sample: torch.Tensor, b_dec_init: str, generator: torch.Generator, fit: bool = False,
                   target: torch.Tensor | None = None) -> None:
        self.b_gate.zero_()
        self.b_mag.zero_()
        self.r_mag.zero_()
        super().initialize(sample, b_dec_init, generator, fit, target)

    @torch.no_grad()
    def calibrate_sparsity(self, sample: torch.Tensor) -> None:
        """Gate biases where each gate opens on START_L0 / d_sae of the sample's rows (a zero bias opens half)."""
        self.b_gate.copy_(-self.firing_levels(sample, START_L0))

    def code_parameters(self) -> list[str]:
        """None: the gate learns at the full rate. On planted features (64 in 32 dimensions, 117 steps) a fitted start
        with the encoder's and gate's rates scaled recovered them worse (mean max cosine 0.90 against 0.95, L0 9.6
        against 6.0)."""
        return []

    def scale_codes(self, factor: float) -> None:
        self.W_enc.mul_(factor)   # both paths read W_enc; the magnitude's bias is zero at the start
        self.b_gate.mul_(factor)  # the same gates open

    # Unit-norm decoder rows (as in the paper's experiments): the norm-weighted L1 then equals the plain L1.
    constrain_gradients = TopKSAE.constrain_gradients
    constrain_weights = TopKSAE.constrain_weights


# Gated SAEs penalise the gate's pre-activations, standard SAEs the codes, so one list of L1 coefficients
# cannot serve both. Measured like standard's (SmolLM2-135M blocks.6, 8x, 300k samples): 2, 4, 8 gave L0 55, 18, 5.
GATED = Architecture(
    name="gated", module=GatedSAE, settings=L1Settings, sparsity="l1_coefficient", sweep_values="2,4,8",
    label="l1_", summary="gate and magnitude paths sharing encoder directions (Rajamanoharan et al. 2024)")
