"""The one interface every SAE architecture implements.

Row-vector convention, as in the SAELens folder format: ``pre = (x - b_dec) @ W_enc + b_enc``,
``x_hat = f @ W_dec + b_dec``. An architecture file defines ``encode`` (inference, exactly the formula
in the format) and ``training_forward`` (the same function plus its training losses).

The kind of dictionary (``cfg.kind``, config.py) is composed with the architecture here, not in each file: a
transcoder's ``W_dec`` and ``b_dec`` live in its output space (``d_out`` wide) and its encoder reads its input as
it is (no ``b_dec`` subtracted); a skip transcoder adds ``x @ W_skip.T``. The training losses compare the
reconstruction with ``target`` (the output hook's activation; the input itself for an SAE).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from torch import nn

from saelab.sae.config import SAEConfig
from saelab.sae.format import load_sae, save_sae
from saelab.sae.pretrained import from_pretrained
from saelab.sae.registry import Settings
from saelab.sae.sparse import SPARSE_BELOW_DENSITY


@dataclass
class TrainStep:
    """What the trainer tells the SAE about the current step (the SAE's own settings it holds itself)."""

    penalty_scale: float = 1.0              # the sparsity penalty's warm-up factor, 0 -> 1
    remedy: str = "none"                    # dead-latent remedy in effect; the SAE carries out its own (auxk, ...)
    dead_mask: torch.Tensor | None = None   # [d_sae] latents silent for the dead window
    dead_latents: torch.Tensor | None = None  # or their indices (the trainer's: no host sync per step)
    # Data-parallel training (saelab.distributed.DataParallel): x is this rank's share of the batch,
    # and batch-wide statistics (normalized_error, BatchTopK's selection) are reduced over the ranks.
    data_parallel: object | None = None

    def dead(self) -> torch.Tensor | None:
        """Indices of the dead latents, or None when none is dead. ``dead_latents`` is used as given (its
        length is known on the host); a ``dead_mask`` is converted, which waits for the device."""
        dead = self.dead_latents
        if dead is None and self.dead_mask is not None:
            dead = self.dead_mask.nonzero().squeeze(1)
        return dead if dead is not None and len(dead) > 0 else None


@dataclass
class TrainOutput:
    loss: torch.Tensor
    x_hat: torch.Tensor
    fired: torch.Tensor                     # [d_sae] tokens on which each latent was non-zero (in after_step:
                                            # over the whole batch, summed over data-parallel ranks)
    parts: dict[str, torch.Tensor]          # named loss terms, for logs
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # for the SAE's own after_step, not logged


class SAE(nn.Module):
    """``cfg``: the shapes and what the folder records; ``settings``: the architecture's training settings
    (a training module reads them, an inference module has none)."""

    architecture: ClassVar[str]
    decoder_init_norm: ClassVar[float] = 1.0
    tied_encoder: ClassVar[bool] = False    # W_enc is W_dec.T, not a parameter (matching pursuit)
    # A thresholded architecture's training step takes the sparse kernels when fewer than this fraction of its
    # codes get a gradient (sparse.py; 0: always dense). An attribute, not a setting: both paths give the same
    # step to float tolerance.
    sparse_below: float = SPARSE_BELOW_DENSITY
    code_scale: float = 1.0                 # what initialize() scaled the codes by (1: not scaled)
    # cfg.json fields of its own (SAELens's names), with the values a folder that lacks them means.
    folder_options: ClassVar[dict] = {}

    def __init__(self, cfg: SAEConfig, settings: Settings | None = None):
        super().__init__()
        self.cfg = cfg
        self.settings = settings
        if not self.tied_encoder:
            self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.output_size))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.output_size))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.output_size, cfg.d_in))  # SAELens's layout: [d_out, d_in]
        if cfg.cross_layer:  # which weights a cross-layer transcoder has (not saved: they follow from the shapes)
            encoder, decoder = cross_layer_masks(cfg)
            self.register_buffer("encoder_mask", encoder, persistent=False)
            self.register_buffer("decoder_mask", decoder, persistent=False)

    # --- inference -------------------------------------------------------------------------------
    def check_width(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"this SAE takes vectors of size d_in={self.cfg.d_in}, got {x.shape[-1]}: "
                             "it was trained on another hook point or model (see its cfg.json metadata)")

    def sae_in(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder reads: ``x``, less ``b_dec`` when ``apply_b_dec_to_input``."""
        self.check_width(x)
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae_in(x) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """The latents' part of the output (a skip transcoder's skip term is not in it: see ``reconstruction``)."""
        return f @ self.W_dec + self.b_dec

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the weights a cross-layer transcoder does not have (no-op for every other kind)."""
        if self.cfg.cross_layer:
            self.W_enc.mul_(self.encoder_mask)
            self.W_dec.mul_(self.decoder_mask)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients of the weights a cross-layer transcoder does not have, so that Adam never moves
        them from 0 (called before ``constrain_gradients``)."""
        if self.cfg.cross_layer:
            for weight, mask in ((self.W_enc, self.encoder_mask), (self.W_dec, self.decoder_mask)):
                if weight.grad is not None:
                    weight.grad.mul_(mask)

    def decoder_norms(self) -> torch.Tensor:
        """Each latent's decoder norm, ``[d_sae]``, as an L1 penalty weighs it: a crosscoder's is the sum of its
        norms at each hook (so that a latent pays for every layer it writes to)."""
        if self.cfg.n_hooks > 1:
            return self.decoder_norms_by_hook().sum(1)
        return self.W_dec.norm(dim=1)

    def decoder_by_hook(self) -> torch.Tensor:
        """``[d_sae, n_hooks, output hook width]``: each latent's decoder row at each hook it writes."""
        return self.W_dec.view(self.cfg.d_sae, self.cfg.n_hooks, -1)

    def decoder_norms_by_hook(self) -> torch.Tensor:
        """``[d_sae, n_hooks]``: each latent's decoder norm at each hook it writes (a CLT's: 0 before its block)."""
        return self.decoder_by_hook().norm(dim=2)

    def skip(self, x: torch.Tensor) -> torch.Tensor | float:
        """A skip transcoder's linear term ``x @ W_skip.T``; 0 for every other kind."""
        return x @ self.W_skip.T if self.cfg.skip else 0.0

    def reconstruction(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """The output for input ``x`` whose latents are ``f`` (edited or not): ``decode(f)`` plus the skip term."""
        return self.decode(f) + self.skip(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruction(x, self.encode(x))

    # --- training --------------------------------------------------------------------------------
    def training_forward(self, x: torch.Tensor, step: TrainStep, target: torch.Tensor | None = None) -> TrainOutput:
        """The loss of reconstructing ``target`` (default: ``x``, an SAE) from ``x``, and what the trainer logs."""
        raise NotImplementedError

    @torch.no_grad()
    def initialize(self, sample: torch.Tensor, b_dec_init: str, generator: torch.Generator, fit: bool = False,
                   target: torch.Tensor | None = None) -> None:
        """Random decoder directions, encoder = decoder transpose (a transcoder's encoder: random directions of its
        input space), ``b_dec`` at the centre of the ``target`` sample (default: ``sample``). With ``fit``, the start
        is fitted to the sample as well: ``calibrate_sparsity`` sets what decides how many latents fire (JumpReLU's
        thresholds, standard and gated SAEs' encoder or gate biases), then the encoder, and every threshold with it
        so that the same latents fire, is scaled by the least-squares factor between the sample and its
        reconstruction (``code_scale``): the first steps' FVU is below 1 whatever the width, where unscaled codes of
        many latents overshoot it. A transcoder's start is always fitted that
        far: its decoder rows pointed at the targets its latents fire on, then the scale."""
        target = sample if target is None else target
        directions = _unit_rows(self.cfg.d_sae, self.cfg.output_size, generator) * self.decoder_init_norm
        self.W_dec.copy_(directions)
        if self.cfg.separate_output:
            self.W_enc.copy_(_unit_rows(self.cfg.d_sae, self.cfg.d_in, generator).T * self.decoder_init_norm)
        elif not self.tied_encoder:
            self.W_enc.copy_(directions.T)
        self.apply_masks()  # a CLT's absent weights are 0 from the start (and stay so: encode reads them)
        if "b_enc" in self._parameters:  # gated SAEs have none
            self.b_enc.zero_()
        if b_dec_init == "median":
            self.b_dec.copy_(geometric_median(target.float()))
        elif b_dec_init == "mean":
            self.b_dec.copy_(target.float().mean(0))
        elif b_dec_init == "zeros":
            self.b_dec.zero_()
        else:
            raise ValueError(f"b_dec_init must be median, mean or zeros, not {b_dec_init!r}")
        sample = sample.to(self.W_dec.device, self.W_dec.dtype)
        target = target.to(self.W_dec.device, self.W_dec.dtype)
        if fit:
            self.calibrate_sparsity(sample)
        if self.cfg.separate_output:
            self._point_decoder_at_targets(sample, target)
        self.code_scale = 1.0
        if fit or self.cfg.separate_output:  # a transcoder's pointed rows add up along the targets: scale them
            along, length = 0.0, 0.0
            for start in range(0, len(sample), 1024):  # [1024, d_sae] codes at a time: at 128x a whole sample's
                reconstruction = self.encode(sample[start:start + 1024]) @ self.W_dec  # would take gigabytes
                along += float(((target[start:start + 1024] - self.b_dec) * reconstruction).sum())
                length += float(reconstruction.pow(2).sum())
            self.code_scale = max(along / max(length, 1e-12), 1e-6)
            self.scale_codes(self.code_scale)

    @torch.no_grad()
    def _point_decoder_at_targets(self, sample: torch.Tensor, target: torch.Tensor, rows: int = 1024) -> None:
        """A transcoder's start: each latent's decoder row along the mean (centred) target of the sample rows it
        fires on, weighted by its code, at the initial row norm. An SAE whose encoder is its decoder transposed
        starts consistent (a latent writes the direction it reads); this is the same for a map between two hook
        points, where random decoder rows would write unrelated directions at first. ``initialize`` then scales the
        codes by the least-squares factor (rows pointed this way add up along the targets and overshoot them). On
        planted features (64 in 32 dimensions, 390 steps), mean max cosine to the true write directions and FVU:
        TopK 0.968 / 0.135 from random rows, 0.995 / 0.065 so; JumpReLU 0.815 / 0.344 -> 0.984 / 0.146."""
        written = torch.zeros_like(self.W_dec)
        for start in range(0, len(sample), rows):
            codes = self.encode(sample[start:start + rows])
            written.addmm_(codes.T, target[start:start + rows] - self.b_dec)
        if self.cfg.cross_layer:
            written.mul_(self.decoder_mask)
        norms = written.norm(dim=1, keepdim=True)
        fired = norms.squeeze(1) > 0
        self.W_dec[fired] = written[fired] / norms[fired] * self.W_dec[fired].norm(dim=1, keepdim=True)

    def calibrate_sparsity(self, sample: torch.Tensor) -> None:
        """Set what decides how many latents fire from ``sample`` (an architecture with thresholds does)."""

    @torch.no_grad()
    def firing_levels(self, sample: torch.Tensor, l0: float) -> torch.Tensor:
        """``[d_sae]``: the level of each latent's encoder projection ``sae_in @ W_enc`` (no bias) that ``l0 / d_sae``
        of the sample's rows exceed: a latent that fires above it fires ``l0`` times per row on average."""
        fires = max(1, min(len(sample) - 1, round(len(sample) * l0 / self.cfg.d_sae)))
        sae_in = self.sae_in(sample)
        return torch.cat([(sae_in @ self.W_enc[:, start:start + 4096]).topk(fires + 1, dim=0).values[-1]
                          for start in range(0, self.cfg.d_sae, 4096)])  # [rows, 4096] at a time

    def code_parameters(self) -> list[str]:
        """The parameters measured in code units (the encoder and its biases): a fitted start scales them by
        ``code_scale``, and the trainer their learning rate with them, since Adam moves a parameter by about lr
        per step whatever its size (JumpReLU at 32x on SmolLM2: codes scaled by 0.08, and at the unscaled rate the
        encoder grew ~30% a step and L0 rose from 36 to 560 in three steps)."""
        return [name for name in ("W_enc", "b_enc") if name in self._parameters]

    def scale_codes(self, factor: float) -> None:
        """Multiply every code by ``factor`` > 0 (the encoder, its bias and any threshold alike; the same
        latents fire)."""
        self.W_enc.mul_(factor)
        if "b_enc" in self._parameters:
            self.b_enc.mul_(factor)

    def constrain_gradients(self) -> None:
        """Called after backward, before the optimiser step."""

    def constrain_weights(self) -> None:
        """Called after the optimiser step."""

    @torch.no_grad()
    def after_step(self, out: TrainOutput, step: TrainStep) -> None:
        """Called after ``constrain_weights`` with the step's output: update training-only state kept in
        buffers (which the trainer's checkpoint holds, so a resumed run continues it exactly)."""

    def latent_axes(self) -> dict[str, int]:
        """Each parameter that holds one slice per latent, and the axis its latents lie along."""
        axes = {"W_dec": 0} if self.tied_encoder else {"W_enc": 1, "W_dec": 0}
        for name, p in self.named_parameters():
            if p.ndim == 1 and name != "b_dec":  # b_enc, thresholds, gates: one entry per latent
                axes[name] = 0
        return axes

    @torch.no_grad()
    def reinitialize_latents(self, latents: torch.Tensor, directions: torch.Tensor, encoder_norm: float,
                             encoder_directions: torch.Tensor | None = None) -> None:
        """Resampling: latent ``latents[i]`` gets decoder row ``directions[i]`` (unit norm), encoder
        direction ``encoder_directions[i] * encoder_norm`` (default: ``directions``; a transcoder's are of its
        input space) and its per-latent biases at their initial values."""
        encoder_directions = directions if encoder_directions is None else encoder_directions
        self.W_dec[latents] = directions.to(self.W_dec.dtype)
        if not self.tied_encoder:
            self.W_enc[:, latents] = (encoder_directions * encoder_norm).T.to(self.W_enc.dtype)
        self.apply_masks()
        for name, axis in self.latent_axes().items():
            if name not in ("W_enc", "W_dec"):
                getattr(self, name)[latents] = self._initial_latent_value(name)

    def _initial_latent_value(self, name: str) -> float:
        """What a per-latent 1-d parameter is reset to by ``reinitialize_latents``."""
        return 0.0

    def export(self) -> SAE:
        """The inference SAE this one saves as, a copy on the CPU (a training module overrides it: BatchTopK
        becomes a JumpReLU SAE)."""
        sae = type(self)(replace(self.cfg), self.settings)  # its own cfg: folding the input scale may change it
        sae.load_state_dict({name: t.detach().cpu().clone() for name, t in self.state_dict().items()})
        return sae.eval()

    @torch.no_grad()
    def fold_input_scale(self, scale: float | torch.Tensor, output_scale: float | torch.Tensor | None = None) -> None:
        """Make a dictionary trained on ``scale * x`` (and, a transcoder, to predict ``output_scale * y``; default
        ``scale``) take raw ``x``: same latents, output in raw units. A scale may be a number or one factor per
        dimension (a crosscoder's hooks are scaled each on its own)."""
        scale_in = torch.as_tensor(scale, dtype=self.W_dec.dtype, device=self.W_dec.device)
        scale_out = scale_in if output_scale is None else \
            torch.as_tensor(output_scale, dtype=self.W_dec.dtype, device=self.W_dec.device)
        self.W_enc.mul_(scale_in.reshape(-1, 1) if scale_in.ndim else scale_in)
        self.W_dec.div_(scale_out)
        self.b_dec.div_(scale_out)
        if self.cfg.skip:
            self.W_skip.mul_(scale_in / (scale_out.reshape(-1, 1) if scale_out.ndim else scale_out))

    # --- files -----------------------------------------------------------------------------------
    def save(self, folder, sparsity: torch.Tensor | None = None, runner_cfg: dict | None = None) -> None:
        save_sae(self.export(), folder, sparsity=sparsity, runner_cfg=runner_cfg)

    @staticmethod
    def load(folder, device: str | torch.device = "cpu") -> SAE:
        """Load a folder written by saelab or SAELens (``cfg.json`` + ``sae_weights.safetensors``)."""
        return load_sae(folder, device=device)

    @staticmethod
    def from_pretrained(release: str, sae_id: str, device: str | torch.device = "cpu"):
        """``(sae, cfg_dict, log10 sparsity or None)`` of a pretrained SAE, downloaded through the Hugging Face
        cache: ``release`` is a registry name (``saelab pretrained list``) or a hub repo of SAELens folders."""
        return from_pretrained(release, sae_id, device=device)

    from_pretrained_with_cfg_and_sparsity = from_pretrained  # SAELens 6's name for the same tuple


# A fitted start of an architecture without a sparsity target (JumpReLU without --target-l0, standard, gated) sets
# its thresholds or biases where this many latents fire per token: about where their default penalties settle on
# real activations (SmolLM2, 300k tokens: JumpReLU's L0 weight 0.7 -> L0 25; standard's L1 5 -> 69; gated's 4 -> 18),
# not the thousands a fixed threshold (or half of all latents, a zero bias) fires at 32x.
START_L0 = 32


def cross_layer_masks(cfg: SAEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(encoder [d_in, d_sae], decoder [d_sae, d_out])`` float masks of a cross-layer transcoder over n blocks:
    latent block l reads input block l only, and writes output blocks l, l+1, ..., n-1 only."""
    n = cfg.n_hooks
    per_block = cfg.d_sae // n
    latent_block = torch.arange(cfg.d_sae) // per_block
    input_block = torch.arange(cfg.d_in) // cfg.hook_width
    output_block = torch.arange(cfg.output_size) // cfg.output_hook_width
    encoder = (input_block[:, None] == latent_block[None, :]).float()
    decoder = (latent_block[:, None] <= output_block[None, :]).float()
    return encoder, decoder


def _unit_rows(rows: int, width: int, generator: torch.Generator) -> torch.Tensor:
    directions = torch.randn(rows, width, generator=generator)
    return directions / directions.norm(dim=1, keepdim=True)


def normalized_error(error: torch.Tensor, target: torch.Tensor, data_parallel=None) -> torch.Tensor:
    """Squared error over the target's variance about its per-dimension mean: a batch's FVU. With
    ``data_parallel``, of the global batch whose share this rank holds (the same value on every rank)."""
    if data_parallel is None:
        return error.pow(2).sum() / (target - target.mean(0)).pow(2).sum().clamp_min(1e-12)
    total = data_parallel.sum
    mean = total(target.sum(0)) / total(target.new_tensor(float(len(target))))
    return total(error.pow(2).sum()) / total((target - mean).pow(2).sum()).clamp_min(1e-12)


@torch.no_grad()
def geometric_median(points: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance, robust to outlier activations."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)
        median = (weights[:, None] * points).sum(0) / weights.sum()
    return median

