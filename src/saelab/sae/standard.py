"""Standard SAE: ReLU codes, L1 penalty on ``|f| * ||W_dec row||`` (Anthropic's April 2024 recipe)."""

from __future__ import annotations

import torch

from saelab.sae.base import SAE, TrainOutput, TrainStepInfo, normalized_error


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
        squared_error = (x_hat - x).pow(2).sum(-1).mean()
        loss = squared_error + info.sparsity_coefficient * l1
        return TrainOutput(loss=loss, x_hat=x_hat, fired=(f > 0).sum(0), parts={"mse": mse, "l1": l1})
