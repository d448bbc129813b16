"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per token; AuxK revives dead latents."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelab.options import option
from saelab.sae.base import SAE, TrainOutput, TrainStep, normalized_error
from saelab.sae.registry import Architecture, Settings
from saelab.sae.sparse import count_fired, sparse_decode, topk_encode


@dataclass
class TopKSettings(Settings):
    k: int = option(32, "Latents active per token (batchtopk, matryoshka_batchtopk: on average over each batch).",
                    positive=True, per_sae=True, fixed_on_resume=True)
    aux_k: int | None = option(None, "Dead latents used by the AuxK loss (default d_in / 2).")
    aux_coefficient: float = option(1 / 32, "Weight of the AuxK loss (0 turns it off); used when "
                                    "--dead-latent-remedy is auxk (auto for these).")

    def sae_config(self) -> dict:
        return {"k": self.k}


class TopKSAE(SAE):
    architecture = "topk"
    signed: bool = False  # AbsTopK: selected by magnitude, signs kept

    def __init__(self, cfg, settings=None):
        if not cfg.k or not 0 < cfg.k <= cfg.d_sae:
            raise ValueError(f"topk needs 0 < k <= d_sae ({cfg.d_sae}), got k={cfg.k}")
        super().__init__(cfg, settings)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.encode_pre(x)
        values, indices = self._select(pre, self.cfg.k)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def _select(self, pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k codes kept of each row of ``pre``: the largest, through ReLU (AbsTopK: the largest in magnitude,
        signed)."""
        if self.signed:
            indices = pre.abs().topk(k, dim=-1, sorted=False).indices
            return pre.gather(-1, indices), indices
        values, indices = pre.topk(k, dim=-1, sorted=False)
        return values.relu(), indices

    def training_forward(self, x: torch.Tensor, step: TrainStep, target: torch.Tensor | None = None) -> TrainOutput:
        self.check_width(x)
        target = x if target is None else target
        # Only k of d_sae codes are non-zero: gradients and decoding touch only those.
        values, indices = topk_encode(x, self.W_enc, self.b_enc, self.b_dec, self.cfg.k, self.cfg.apply_b_dec_to_input,
                                      self.signed)
        x_hat = sparse_decode(indices, values, self.W_dec) + self.b_dec + self.skip(x)
        parts = {"mse": normalized_error(x_hat - target, target, step.data_parallel)}
        loss = parts["mse"] + self._auxk_term(x, target - x_hat, step, parts)
        fired = count_fired(indices, values, self.cfg.d_sae)
        return TrainOutput(loss=loss, x_hat=x_hat, fired=fired, parts=parts)

    def _auxk_term(self, x, residual, step: TrainStep, parts: dict) -> torch.Tensor | float:
        """The weighted AuxK loss when it is the remedy in effect and some latents are dead (else 0);
        ``residual``: target - reconstruction."""
        coefficient = self.settings.aux_coefficient if step.remedy == "auxk" else 0.0
        dead = step.dead() if coefficient > 0 else None
        if dead is None:
            return 0.0
        parts["auxk"] = self._auxk_loss(x, residual.detach(), dead, step.data_parallel)
        return coefficient * parts["auxk"]

    def _auxk_loss(self, x: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor,
                   data_parallel=None) -> torch.Tensor:
        """The dead latents' top pre-activations reconstruct what the live ones missed (normalised MSE)."""
        k_aux = min(self.settings.aux_k or self.cfg.d_in // 2, len(dead))
        sae_in = self.sae_in(x)
        dead_pre = torch.addmm(self.b_enc[dead], sae_in, self.W_enc[:, dead])
        values, positions = self._select(dead_pre, k_aux)
        residual_hat = sparse_decode(dead[positions], values, self.W_dec)
        return normalized_error(residual_hat - residual, residual, data_parallel)

    @torch.no_grad()
    def constrain_gradients(self) -> None:
        # Unit-norm decoder rows: drop the gradient component that would only change a row's length.
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
            self.W_dec.grad -= parallel * self.W_dec

    @torch.no_grad()
    def constrain_weights(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)


TOPK = Architecture(
    name="topk", module=TopKSAE, settings=TopKSettings, sparsity="k", sweep_values="16,32,64", label="k",
    remedies=("auxk",), default_remedy="auxk",
    summary="the k largest pre-activations per token, AuxK for dead latents (Gao et al. 2024)")
