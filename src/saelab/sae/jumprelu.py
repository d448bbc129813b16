"""JumpReLU SAE (Rajamanoharan et al. 2024; Gemma Scope): ``f = relu(pre) * (pre > threshold)``.

``JumpReLUSAE`` is what a folder holds (tensor ``threshold``); BatchTopK and Matryoshka SAEs export to it.
``JumpReLUTrainingSAE`` trains one: a learned log-threshold per latent, gradients for the threshold from
straight-through estimators (rectangle kernel of width ``bandwidth``), an L0 penalty, and optionally a
multiplicative adaptation of the L0 weight that steers the batch L0 toward a target.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from saelab.sae.base import SAE, TrainOutput, TrainStepInfo, normalized_error
from saelab.sae.topk import TopKSAE

# With a target L0, each step multiplies the L0 weight by exp(rate * clamp(relative L0 error, -1, 1)), within
# the bounds. Slow on purpose: Adam moves the log-thresholds at a bounded speed, so a fast controller winds up
# far past the balance point and overshoots.
TARGET_L0_ADAPT_RATE = 0.005
L0_SCALE_BOUNDS = (1e-4, 1e4)


class JumpReLUSAE(SAE):
    architecture = "jumprelu"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.zeros(cfg.d_sae))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.encode_pre(x)
        return pre.relu() * (pre > self.threshold)

    def training_forward(self, x: torch.Tensor, info: TrainStepInfo) -> TrainOutput:
        raise TypeError("a loaded JumpReLU SAE is for inference; train one with architecture='jumprelu' "
                        "through saelab.training (it uses JumpReLUTrainingSAE, which learns log-thresholds)")


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """``pre * (pre > threshold)``; d/dpre is the gate, d/dthreshold the straight-through estimate
    ``-(threshold / bandwidth) * rectangle((pre - threshold) / bandwidth)``."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        gate = pre > threshold
        ctx.save_for_backward(pre, threshold, gate)
        ctx.bandwidth = bandwidth
        return pre * gate

    @staticmethod
    def backward(ctx, grad_out):
        pre, threshold, gate = ctx.saved_tensors
        kernel = _rectangle((pre - threshold) / ctx.bandwidth)
        grad_threshold = -(threshold / ctx.bandwidth * (kernel * grad_out).sum(0))
        return grad_out * gate, grad_threshold, None


class _Step(torch.autograd.Function):
    """``(pre > threshold)``; only the threshold gets a gradient: ``-(1 / bandwidth) * rectangle(...)``."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        pre, threshold = ctx.saved_tensors
        kernel = _rectangle((pre - threshold) / ctx.bandwidth)
        return None, -(kernel * grad_out).sum(0) / ctx.bandwidth, None


class JumpReLUTrainingSAE(SAE):
    """Trains a JumpReLU SAE; ``export()`` gives the ``JumpReLUSAE`` with ``threshold = exp(log_threshold)``.

    Loss: squared error (summed over dimensions, mean over tokens) + ``l0_coefficient * l0_scale * L0``.
    ``l0_scale`` (a buffer, 1 unless a target L0 is set) is the target-L0 controller's state.
    """

    architecture = "jumprelu"

    def __init__(self, cfg):
        if not cfg.init_threshold > 0:
            raise ValueError(f"jumprelu needs a positive initial threshold, got {cfg.init_threshold}")
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.init_threshold)))
        self.register_buffer("l0_scale", torch.ones(()))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.encode_pre(x)
        return pre.relu() * (pre > self.threshold)

    def training_forward(self, x: torch.Tensor, info: TrainStepInfo) -> TrainOutput:
        pre = self.encode_pre(x)
        threshold = self.threshold
        f = _JumpReLU.apply(pre, threshold, info.bandwidth)  # threshold > 0, so this is relu(pre) * gate
        x_hat = self.decode(f)
        squared_error = (x_hat - x).pow(2).sum(-1).mean()
        l0 = _Step.apply(pre, threshold, info.bandwidth).sum(-1).mean()
        coefficient = info.l0_coefficient * self.l0_scale
        loss = squared_error + coefficient * l0
        return TrainOutput(loss=loss, x_hat=x_hat, fired=(f > 0).sum(0),
                           parts={"mse": normalized_error(x_hat - x, x), "l0_penalty": l0.detach(),
                                  "l0_coefficient": coefficient.detach()})

    @torch.no_grad()
    def after_step(self, out: TrainOutput, info: TrainStepInfo) -> None:
        if info.target_l0:
            l0 = out.fired.sum() / len(out.x_hat)
            error = ((l0 - info.target_l0) / info.target_l0).clamp(-1.0, 1.0)
            self.l0_scale.mul_(torch.exp(TARGET_L0_ADAPT_RATE * error)).clamp_(*L0_SCALE_BOUNDS)

    def _initial_latent_value(self, name: str) -> float:
        return math.log(self.cfg.init_threshold) if name == "log_threshold" else 0.0

    # Unit-norm decoder rows, as for TopK: the L0 penalty cannot be dodged by rescaling, and the
    # threshold keeps one meaning per latent.
    constrain_gradients = TopKSAE.constrain_gradients
    constrain_weights = TopKSAE.constrain_weights

    def export(self) -> JumpReLUSAE:
        sae = JumpReLUSAE(replace(self.cfg, architecture="jumprelu"))
        state = {name: t.detach().cpu().clone() for name, t in self.state_dict().items()
                 if name not in ("log_threshold", "l0_scale")}
        sae.load_state_dict({**state, "threshold": self.threshold.detach().cpu().clone()})
        return sae.eval()
