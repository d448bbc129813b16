"""Standard SAE: ReLU codes, L1 penalty on ``|f| * ||W_dec row||`` (Anthropic's April 2024 recipe)."""

from __future__ import annotations

import torch

from saelab.sae.base import SAE, TrainOutput, TrainStepInfo, ghost_grads_loss, normalized_error


class StandardSAE(SAE):
    architecture = "standard"
    decoder_init_norm = 0.1  # small decoder rows; the penalty, not a constraint, sets their length

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_pre(x).relu()

    def training_forward(self, x: torch.Tensor, info: TrainStepInfo) -> TrainOutput:
        f = self.encode(x)
        x_hat = self.decode(f)
        # Weighting by decoder norm stops the SAE from shrinking codes and growing rows to dodge the L1.
        l1 = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        mse = normalized_error(x_hat - x, x)
        per_token_error = (x_hat - x).pow(2).sum(-1)
        loss = per_token_error.mean() + info.sparsity_coefficient * l1
        parts = {"mse": mse, "l1": l1}
        dead = info.dead() if info.ghost_grads else None
        if dead is not None:
            sae_in = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
            parts["ghost_grads"] = ghost_grads_loss(sae_in, self.W_enc, self.b_enc, self.W_dec, x - x_hat,
                                                    dead, per_token_error)
            loss = loss + parts["ghost_grads"]
        return TrainOutput(loss=loss, x_hat=x_hat, fired=(f > 0).sum(0), parts=parts)
