"""Standard SAE: ReLU codes, L1 penalty on ``|f| * ||W_dec row||`` (Anthropic's April 2024 recipe)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelab.options import option
from saelab.sae.base import SAE, START_L0, TrainOutput, TrainStep, normalized_error
from saelab.sae.registry import Architecture, Settings
from saelab.sae.sparse import decode_codes, fired_codes, per_latent, training_pre


@dataclass
class L1Settings(Settings):
    l1_coefficient: float = option(5.0, "Weight of the L1 penalty on |f|*||W_dec|| (gated: on the gate's ReLU) "
                                   "(inputs are normalised to mean norm sqrt(d_in)).", per_sae=True,
                                   aliases=("--l1-coefficients",))


class StandardSAE(SAE):
    architecture = "standard"
    decoder_init_norm = 0.1  # small decoder rows; the penalty, not a constraint, sets their length

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_pre(x).relu()

    @torch.no_grad()
    def calibrate_sparsity(self, sample: torch.Tensor) -> None:
        """Encoder biases where each latent fires START_L0 / d_sae of the sample's rows (a zero bias fires half of
        all latents, d_sae / 2 per token)."""
        self.b_enc.copy_(-self.firing_levels(sample, START_L0))

    def training_forward(self, x: torch.Tensor, step: TrainStep, target: torch.Tensor | None = None) -> TrainOutput:
        self.check_width(x)
        target = x if target is None else target
        # Only the latents that fire get gradients: when they are few, only those entries are computed (sparse.py).
        pre, support = training_pre(x, self.W_enc, self.b_enc, self.b_dec, self.cfg.apply_b_dec_to_input,
                                    lambda pre: pre > 0, self.sparse_below)
        f = pre.relu()
        x_hat = decode_codes(f, self.W_dec, support) + self.b_dec + self.skip(x)
        # Weighting by decoder norm stops the SAE from shrinking codes and growing rows to dodge the L1.
        l1 = (f * per_latent(self.decoder_norms(), support)).sum() / len(x)
        mse = normalized_error(x_hat - target, target)
        per_token_error = (x_hat - target).pow(2).sum(-1)
        loss = per_token_error.mean() + self.settings.l1_coefficient * step.penalty_scale * l1
        parts = {"mse": mse, "l1": l1}
        dead = step.dead() if step.remedy == "ghost_grads" else None
        if dead is not None:
            sae_in = self.sae_in(x)
            parts["ghost_grads"] = ghost_grads_loss(sae_in, self.W_enc, self.b_enc, self.W_dec, target - x_hat,
                                                    dead, per_token_error)
            loss = loss + parts["ghost_grads"]
        return TrainOutput(loss=loss, x_hat=x_hat, fired=fired_codes(f, support), parts=parts)


def ghost_grads_loss(sae_in: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                     residual: torch.Tensor, dead: torch.Tensor, squared_error: torch.Tensor) -> torch.Tensor:
    """Ghost grads (Anthropic, Jan 2024 update; SAELens ``use_ghost_grads``): the dead latents, with
    ``exp(pre-activation)`` in place of ReLU, reconstruct the residual ``x - x_hat``. Their output is
    rescaled to half the residual's norm, and each token's loss to that token's main ``squared_error``
    (both factors held constant), so the loss is as large as the reconstruction loss and its gradient
    reaches only the dead latents' encoder columns, encoder biases and decoder rows (not b_dec, not
    live latents).

    ``sae_in``: ``[batch, d_in]`` encoder input; ``residual``: ``x - x_hat``; ``dead``: the dead latents'
    indices; ``squared_error``: per token.
    """
    residual = residual.detach()
    dead_pre = torch.addmm(b_enc[dead], sae_in.detach(), W_enc[:, dead])
    # The rescaling makes the output independent of a per-token factor, so shifting by each token's
    # largest pre-activation changes nothing but keeps exp() finite.
    dead_acts = (dead_pre - dead_pre.detach().max(dim=-1, keepdim=True).values).exp()
    ghost_out = dead_acts @ W_dec[dead]
    scale = residual.norm(dim=-1) / (2 * ghost_out.norm(dim=-1) + 1e-6)
    ghost_out = ghost_out * scale.detach()[:, None]
    ghost_error = (ghost_out - residual).pow(2).sum(-1)
    weight = (squared_error / (ghost_error + 1e-6)).detach()
    return (weight * ghost_error).mean()


# The L1 coefficients a sweep tries. Measured on SmolLM2-135M blocks.6.hook_resid_post (8x, 300k samples of
# wikitext2-valid, L0 on its held-out first 8k tokens): 2, 5, 10 gave L0 87, 69, 61: in 300k samples the
# encoder bias barely moves from 0, so a larger L1 mostly shrinks the decoder and costs reconstruction, not L0.
# (Trained on python-docs and evaluated on Wikipedia, every thresholded SAE's L0 is about twice as high:
# thresholds fit to one kind of text fire more on another.)
STANDARD = Architecture(
    name="standard", module=StandardSAE, settings=L1Settings, sparsity="l1_coefficient", sweep_values="2,5,10",
    label="l1_", remedies=("ghost_grads",), default_remedy="none",
    summary="ReLU + L1 on |f|*||W_dec|| with warm-up (Anthropic, April 2024)")
