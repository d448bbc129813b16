"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per token; AuxK revives dead latents."""

from __future__ import annotations

import torch

from saelab.sae.base import SAE, TrainOutput, TrainStepInfo, normalized_error
from saelab.sae.sparse import count_fired, sparse_decode, topk_encode


class TopKSAE(SAE):
    architecture = "topk"

    def __init__(self, cfg):
        if not cfg.k or not 0 < cfg.k <= cfg.d_sae:
            raise ValueError(f"topk needs 0 < k <= d_sae ({cfg.d_sae}), got k={cfg.k}")
        super().__init__(cfg)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.encode_pre(x)
        values, indices = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    def training_forward(self, x: torch.Tensor, info: TrainStepInfo) -> TrainOutput:
        self.check_width(x)
        # Only k of d_sae codes are non-zero: gradients and decoding touch only those.
        values, indices = topk_encode(x, self.W_enc, self.b_enc, self.b_dec, self.cfg.k, self.cfg.apply_b_dec_to_input)
        x_hat = sparse_decode(indices, values, self.W_dec) + self.b_dec
        mse = normalized_error(x_hat - x, x, info.data_parallel)
        parts = {"mse": mse}
        loss = mse
        dead = info.dead() if info.aux_coefficient > 0 else None
        if dead is not None:
            parts["auxk"] = self._auxk_loss(x, (x - x_hat).detach(), dead, info.aux_k, info.data_parallel)
            loss = loss + info.aux_coefficient * parts["auxk"]
        fired = count_fired(indices, values, self.cfg.d_sae)
        return TrainOutput(loss=loss, x_hat=x_hat, fired=fired, parts=parts)

    def _auxk_loss(self, x: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor, aux_k: int,
                   data_parallel=None) -> torch.Tensor:
        """The dead latents' top pre-activations reconstruct what the live ones missed (normalised MSE)."""
        k_aux = min(aux_k, len(dead))
        sae_in = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
        dead_pre = torch.addmm(self.b_enc[dead], sae_in, self.W_enc[:, dead])
        values, positions = dead_pre.topk(k_aux, dim=-1, sorted=False)
        residual_hat = sparse_decode(dead[positions], values.relu(), self.W_dec)
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
