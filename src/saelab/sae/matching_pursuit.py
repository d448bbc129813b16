"""Matching pursuit SAE (SAELens ``matching_pursuit``; Mallat & Zhang 1993 as a sparse encoder): no encoder of
its own. Each token's code is built greedily over the unit-norm decoder rows: take the row most aligned with
what is still unexplained (``residual @ W_dec.T``, positive part), add its projection to the code, subtract it
from the residual, repeat ``max_iterations`` times or until the residual's norm is below ``residual_threshold``
or a step adds no new latent. Training backpropagates through the projections (the choices are not
differentiable), so the decoder learns directions that pursuit can use.

A step costs one ``[batch, d_in] x [d_in, d_sae]`` product per iteration: ``max_iterations`` times the encoder
product of the other architectures, which is the price of an encoder-free code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelab.options import option
from saelab.sae.base import SAE, TrainOutput, TrainStep, normalized_error
from saelab.sae.registry import Architecture, Settings
from saelab.sae.sparse import sparse_decode
from saelab.sae.topk import TopKSAE


@dataclass
class MatchingPursuitSettings(Settings):
    max_iterations: int = option(32, "matching_pursuit: greedy steps per token, each adding the decoder row best "
                                 "aligned with what is left, so at most this many latents fire (SAELens's "
                                 "max_iterations).", positive=True, per_sae=True, fixed_on_resume=True,
                                 aliases=("--mp-iterations",))
    residual_threshold: float = option(0.0, "matching_pursuit: a token's pursuit stops once its residual's norm "
                                       "is below this (in the units of inputs normalised to mean norm sqrt(d_in); "
                                       "saved in raw units); 0 takes every step.")

    def __post_init__(self):
        super().__post_init__()
        if self.residual_threshold < 0:
            raise ValueError(f"residual_threshold must not be negative (got {self.residual_threshold})")

    def sae_config(self) -> dict:
        return {"options": {"max_iterations": self.max_iterations, "residual_threshold": self.residual_threshold,
                            "stop_on_duplicate_support": True}}


class MatchingPursuitSAE(SAE):
    architecture = "matching_pursuit"
    tied_encoder = True
    # SAELens's defaults, for folders that leave a field out (its max_iterations None means d_in).
    folder_options = {"residual_threshold": 1e-2, "max_iterations": None, "stop_on_duplicate_support": True}

    def __init__(self, cfg, settings=None):
        if cfg.kind != "sae":
            raise ValueError(f"matching pursuit reads its input with its own decoder rows, so it cannot be a "
                             f"{cfg.kind}; choose another architecture")
        super().__init__(cfg, settings)
        del self.b_enc  # no encoder, no encoder bias (SAELens's folder has neither)

    @property
    def W_enc(self) -> torch.Tensor:
        return self.W_dec.T

    def _option(self, name: str):
        return self.cfg.options.get(name, self.folder_options[name])

    def _pursue(self, sae_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)``, ``[batch, steps]``: the latent each step chose and the projection it added (0
        once a token has stopped). Differentiable in the values; the choices are made without gradient."""
        iterations = self._option("max_iterations") or self.cfg.d_in
        threshold, stop_on_repeat = self._option("residual_threshold"), self._option("stop_on_duplicate_support")
        residual = sae_in
        done = torch.zeros(len(sae_in), dtype=torch.bool, device=sae_in.device)
        support = torch.zeros(len(sae_in), self.cfg.d_sae, dtype=torch.bool, device=sae_in.device)
        chosen, added = [], []
        for _ in range(iterations):
            with torch.no_grad():
                index = (residual.detach() @ self.W_dec.T).argmax(dim=-1)
            row = self.W_dec[index]
            value = ((residual * row).sum(-1).relu()) * ~done
            residual = residual - value[:, None] * row
            chosen.append(index)
            added.append(value)
            with torch.no_grad():
                if stop_on_repeat:  # a step that chose a latent already in the code adds no new one
                    tokens = torch.arange(len(index), device=index.device)
                    done |= support[tokens, index] | (value == 0)
                    support[tokens, index] |= value > 0
                if threshold > 0:
                    done |= residual.norm(dim=-1) < threshold
                if bool(done.all()):
                    break
        return torch.stack(added, 1), torch.stack(chosen, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        values, indices = self._pursue(self.sae_in(x.reshape(-1, shape[-1])))
        codes = torch.zeros(len(values), self.cfg.d_sae, dtype=values.dtype, device=values.device)
        return codes.scatter_add_(-1, indices, values).reshape(*shape[:-1], self.cfg.d_sae)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        # As SAELens: the decoder bias is added back only when it was subtracted from the input.
        return f @ self.W_dec + self.b_dec if self.cfg.apply_b_dec_to_input else f @ self.W_dec

    def training_forward(self, x: torch.Tensor, step: TrainStep, target: torch.Tensor | None = None) -> TrainOutput:
        self.check_width(x)
        values, indices = self._pursue(self.sae_in(x))
        x_hat = sparse_decode(indices, values, self.W_dec) + (self.b_dec if self.cfg.apply_b_dec_to_input else 0.0)
        parts = {"mse": normalized_error(x_hat - x, x, step.data_parallel)}
        with torch.no_grad():  # a latent chosen twice for one token fires once
            codes = torch.zeros(len(x), self.cfg.d_sae, device=x.device).scatter_add_(-1, indices, values.detach())
            fired = (codes != 0).sum(0)
        parts["steps"] = (values.detach() != 0).sum(-1).float().mean()
        return TrainOutput(loss=parts["mse"], x_hat=x_hat, fired=fired, parts=parts)

    def scale_codes(self, factor: float) -> None:
        """Pursuit codes are projections on unit rows: nothing scales them."""

    @torch.no_grad()
    def fold_input_scale(self, scale: float, output_scale: float | None = None) -> None:
        # Pursuit of scale * x gives scale times the codes of x: the rows stay, the bias and threshold scale.
        self.b_dec.div_(scale)
        self.cfg.options = {**self.cfg.options,
                            "residual_threshold": self._option("residual_threshold") / scale}

    # Unit-norm decoder rows: pursuit's projections assume them.
    constrain_gradients = TopKSAE.constrain_gradients
    constrain_weights = TopKSAE.constrain_weights


MATCHING_PURSUIT = Architecture(
    name="matching_pursuit", module=MatchingPursuitSAE, settings=MatchingPursuitSettings, aliases=("mp",),
    sparsity="max_iterations", sweep_values="16,32,64", label="mp", in_default_sweep=False,
    summary="no encoder: greedy pursuit over the unit-norm decoder rows, --max-iterations steps per token "
            "(SAELens matching_pursuit)")
