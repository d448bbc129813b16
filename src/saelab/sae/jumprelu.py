"""JumpReLU SAE (Rajamanoharan et al. 2024; Gemma Scope): ``f = relu(pre) * (pre > threshold)``.

``JumpReLUSAE`` is what a folder holds (tensor ``threshold``); BatchTopK and Matryoshka SAEs export to it.
``JumpReLUTrainingSAE`` trains one: a learned log-threshold per latent, gradients for the threshold from
straight-through estimators (rectangle kernel of width ``bandwidth``), an L0 penalty, and optionally steering
toward a target L0 (each step, every threshold nudged toward it and the L0 weight adapted).

Short runs are the hard case. On SmolLM2-135M activations (300k tokens, 292 steps) the thresholds must travel
~3x from their initial value while the encoder settles. Plain log-thresholds under Adam move by ~lr per step
(at most x1.3 over such a run), so the L0 penalty could not act and targets 16, 32 and 64 all ended at L0 ~47;
hence ``LOG_THRESHOLD_LR_SCALE``. And L0 is too steep in the L0 weight for the weight alone to steer so few
steps; hence the threshold nudge (``TARGET_L0_NUDGE``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from saelab.options import option
from saelab.sae.base import SAE, START_L0, TrainOutput, TrainStep, normalized_error
from saelab.sae.registry import Architecture, Settings
from saelab.sae.sparse import decode_codes, fired_codes, per_latent, training_pre
from saelab.sae.topk import TopKSAE

# Adam moves a parameter by about lr per step whatever the size of its gradient. The parameter is
# log(threshold) / LOG_THRESHOLD_LR_SCALE, so the log-thresholds learn this many times faster than the other
# weights: up to ~1% per step at lr 1e-3, x10 over a few hundred steps, while staying positive.
LOG_THRESHOLD_LR_SCALE = 10.0
# Steering toward a target L0. On real activations the L0 is very steep in the L0 weight (SmolLM2, 300k
# tokens: weight 0 -> L0 > 250 and rising, 0.7 -> 25), and the thresholds take 100+ steps to follow a change
# of weight, so adapting the weight alone cannot steer a short run. Each step, with
# e = clamp(log(batch L0 / target), -1, 1):
# - every threshold is multiplied by exp(TARGET_L0_NUDGE * e), to which L0 answers at once (proportional);
# - near the target (|e| < TARGET_L0_INTEGRATE_WITHIN) the L0 weight is multiplied by
#   exp(TARGET_L0_ADAPT_RATE * e), within the bounds, so that in the long run the straight-through gradients
#   hold the thresholds there on their own (integral). Not far from it: at the start L0 falls from hundreds
#   whatever the weight, and integrating that transient would wind the weight up far past its balance.
TARGET_L0_NUDGE = 0.05
TARGET_L0_ADAPT_RATE = 0.05
TARGET_L0_INTEGRATE_WITHIN = 0.5
L0_SCALE_BOUNDS = (1e-4, 1e4)


@dataclass
class JumpReLUSettings(Settings):
    l0_coefficient: float = option(1.0, "Weight of the L0 penalty (the loss's squared error is summed over "
                                   "dimensions of inputs normalised to mean norm sqrt(d_in)); with --target-l0, "
                                   "the weight it starts from.")
    target_l0: float | None = option(None, "Steer the training L0 to this: each step moves every threshold by up "
                                     "to 5% toward it, and near it the L0 weight adapts until the thresholds stay "
                                     "there on their own (default: fixed weight).", positive=True, per_sae=True,
                                     aliases=("--target-l0s",))
    jumprelu_bandwidth: float = option(0.05, "Width of the straight-through estimators' rectangle kernel, in "
                                       "pre-activation units of inputs normalised to mean norm sqrt(d_in) (there a "
                                       "unit direction's projection is ~N(0,1); 0.001 at unit mean squared norm, as "
                                       "in Gemma Scope, is ~0.05 here for d_in ~2300).", positive=True)
    jumprelu_init_threshold: float = option(0.5, "Initial threshold of every latent, in the same units, without "
                                            "a fitted start (--no-fit-init; a fitted one places each latent's). The "
                                            "log-thresholds are learned 10x faster than the other weights (up to "
                                            "~10 * lr per step), so they can travel an order of magnitude in a few "
                                            "hundred steps.", positive=True)

    def __post_init__(self):
        super().__post_init__()
        if self.l0_coefficient < 0:
            raise ValueError(f"l0_coefficient must not be negative (got {self.l0_coefficient})")


class JumpReLUSAE(SAE):
    architecture = "jumprelu"

    def __init__(self, cfg, settings=None):
        super().__init__(cfg, settings)
        self.threshold = nn.Parameter(torch.zeros(cfg.d_sae))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.encode_pre(x)
        return pre.relu() * (pre > self.threshold)

    def training_forward(self, x: torch.Tensor, step: TrainStep, target: torch.Tensor | None = None) -> TrainOutput:
        raise TypeError("a loaded JumpReLU SAE is for inference; train one with architecture='jumprelu' "
                        "through saelab.training (it uses JumpReLUTrainingSAE, which learns log-thresholds)")


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A gradient of a threshold broadcast over the batch (``[d_sae]`` against ``[batch, d_sae]``) summed back to its
    shape; one gathered per entry (the sparse path's) as it is."""
    return grad.sum(0) if grad.dim() > like.dim() else grad


class _JumpReLU(torch.autograd.Function):
    """``pre * (pre > threshold)``; d/dpre is the gate, d/dthreshold the straight-through estimate
    ``-(threshold / bandwidth) * rectangle((pre - threshold) / bandwidth)``. ``threshold`` is per latent (``[d_sae]``
    against ``pre [batch, d_sae]``) or per entry (the same shape as ``pre``)."""

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
        grad_threshold = -(threshold / ctx.bandwidth * _sum_to(kernel * grad_out, threshold))
        return grad_out * gate, grad_threshold, None


class _Step(torch.autograd.Function):
    """``(pre > threshold)``; only the threshold gets a gradient: ``-(1 / bandwidth) * rectangle(...)`` (shapes as
    for ``_JumpReLU``)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        pre, threshold = ctx.saved_tensors
        kernel = _rectangle((pre - threshold) / ctx.bandwidth)
        return None, -_sum_to(kernel * grad_out, threshold) / ctx.bandwidth, None


class JumpReLUTrainingSAE(SAE):
    """Trains a JumpReLU SAE; ``export()`` gives the ``JumpReLUSAE`` with its ``threshold``, which is
    ``exp(LOG_THRESHOLD_LR_SCALE * log_threshold_scaled)``.

    Loss: squared error (summed over dimensions, mean over tokens) + ``l0_coefficient * l0_scale * L0``.
    ``l0_scale`` (a buffer, 1 unless a target L0 is set) is the target-L0 controller's state.
    """

    architecture = "jumprelu"

    def __init__(self, cfg, settings: JumpReLUSettings | None = None):
        super().__init__(cfg, settings or JumpReLUSettings())
        start = self._initial_latent_value("log_threshold_scaled")
        self.log_threshold_scaled = nn.Parameter(torch.full((cfg.d_sae,), start))
        self.register_buffer("l0_scale", torch.ones(()))

    @property
    def threshold(self) -> torch.Tensor:
        return (self.log_threshold_scaled * LOG_THRESHOLD_LR_SCALE).exp()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.encode_pre(x)
        return pre.relu() * (pre > self.threshold)

    def training_forward(self, x: torch.Tensor, step: TrainStep, target: torch.Tensor | None = None) -> TrainOutput:
        self.check_width(x)
        target = x if target is None else target
        threshold, bandwidth = self.threshold, self.settings.jumprelu_bandwidth
        # Gradients reach the latents that fire and, through the estimators' kernel, those within half a bandwidth
        # below their threshold: when they are few, only those entries are computed (sparse.py).
        pre, support = training_pre(x, self.W_enc, self.b_enc, self.b_dec, self.cfg.apply_b_dec_to_input,
                                    lambda pre: pre > threshold.detach() - bandwidth / 2, self.sparse_below)
        threshold_at = per_latent(threshold, support)
        f = _JumpReLU.apply(pre, threshold_at, bandwidth)  # threshold > 0, so this is relu(pre) * gate
        x_hat = decode_codes(f, self.W_dec, support) + self.b_dec + self.skip(x)
        squared_error = (x_hat - target).pow(2).sum(-1).mean()
        l0 = _Step.apply(pre, threshold_at, bandwidth).sum() / len(x)
        coefficient = self.settings.l0_coefficient * step.penalty_scale * self.l0_scale
        loss = squared_error + coefficient * l0
        return TrainOutput(loss=loss, x_hat=x_hat, fired=fired_codes(f, support),
                           parts={"mse": normalized_error(x_hat - target, target), "l0_penalty": l0.detach(),
                                  "l0_coefficient": coefficient.detach(),
                                  "threshold_median": threshold.detach().median()})

    @torch.no_grad()
    def after_step(self, out: TrainOutput, step: TrainStep) -> None:
        target = self.settings.target_l0
        if target:
            # The trainer has summed out.fired over the data-parallel ranks; x_hat is this rank's share.
            tokens = len(out.x_hat) * (step.data_parallel.world_size if step.data_parallel is not None else 1)
            l0 = out.fired.sum() / tokens
            error = (l0.clamp_min(1e-3) / target).log().clamp(-1.0, 1.0)
            self.log_threshold_scaled.add_(error * (TARGET_L0_NUDGE / LOG_THRESHOLD_LR_SCALE))
            near = error.abs() < TARGET_L0_INTEGRATE_WITHIN
            self.l0_scale.mul_(torch.exp(TARGET_L0_ADAPT_RATE * error * near)).clamp_(*L0_SCALE_BOUNDS)

    def _initial_latent_value(self, name: str) -> float:
        return math.log(self.settings.jumprelu_init_threshold) / LOG_THRESHOLD_LR_SCALE if name == "log_threshold_scaled" else 0.0

    @torch.no_grad()
    def calibrate_sparsity(self, sample: torch.Tensor) -> None:
        """Each latent's threshold where it fires on target / d_sae of the sample's rows (target: target_l0, else
        START_L0), so the first steps' L0 is the target, not the thousands a fixed threshold gives at a large
        width."""
        threshold = self.firing_levels(sample, self.settings.target_l0 or START_L0).clamp_min(1e-3)  # b_enc is 0
        self.log_threshold_scaled.copy_(threshold.log() / LOG_THRESHOLD_LR_SCALE)

    def scale_codes(self, factor: float) -> None:
        super().scale_codes(factor)
        self.log_threshold_scaled.add_(math.log(factor) / LOG_THRESHOLD_LR_SCALE)  # the same latents fire

    # Unit-norm decoder rows, as for TopK: the L0 penalty cannot be dodged by rescaling, and the
    # threshold keeps one meaning per latent.
    constrain_gradients = TopKSAE.constrain_gradients
    constrain_weights = TopKSAE.constrain_weights

    def export(self) -> JumpReLUSAE:
        sae = JumpReLUSAE(replace(self.cfg, architecture="jumprelu"))
        state = {name: t.detach().cpu().clone() for name, t in self.state_dict().items()
                 if name not in ("log_threshold_scaled", "l0_scale")}
        sae.load_state_dict({**state, "threshold": self.threshold.detach().cpu().clone()})
        return sae.eval()


JUMPRELU = Architecture(
    name="jumprelu", module=JumpReLUSAE, training_module=JumpReLUTrainingSAE, settings=JumpReLUSettings,
    sparsity="target_l0", sweep_values="16,32,64", label="target_l0_",
    summary="learnt per-latent thresholds, straight-through estimators, L0 penalty (Rajamanoharan et al. 2024)")
