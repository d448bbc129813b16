"""Synthetic activations with known features: the ground truth an SAE's features can be scored against.

A sample is ``x = sum_i a_i f_i d_i + bias (+ noise)``: ``d_i`` are ``n_features`` unit directions in
``d_in`` dimensions (optionally pushed apart to be nearly orthogonal), ``f_i`` whether feature i fires,
``a_i`` its magnitude. What makes it hard, as in real activations:

- **Frequencies** follow a Zipf law: ``p_i`` proportional to ``(i + 1) ** -zipf_exponent``, scaled so that on
  average ``mean_l0`` features fire per sample.
- **Magnitudes** are log-normal with mean ``magnitude_mean`` and relative spread ``magnitude_spread``.
- **Hierarchy**: a ``hierarchy_fraction`` of the features are children of a more frequent parent; a child
  fires only when its parent does (its ``p_i`` is then the chance given the parent), and with
  ``exclusive_siblings`` at most one child of a parent fires at once.
- **Correlations**: firing is decided through a Gaussian copula whose correlation has rank
  ``correlation_rank`` and weight ``correlation_strength`` (0: independent features).

Everything is drawn from ``seed``: the dictionary and hierarchy from the seed itself, unit u of the stream
from (seed, u), so any unit can be regenerated alone (resume, many readers) and the config, saved as JSON,
regenerates the data anywhere. The stream is produced a unit at a time and never held whole.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields

import torch

from saelab.data.activations import ShardableSource
from saelab.files import read_json, write_json
from saelab.options import check_fields, option


@dataclass(frozen=True)
class SyntheticConfig:
    d_in: int = option(64, "Dimension of the activations.", positive=True)
    n_features: int = option(256, "Ground-truth features (directions).", positive=True)
    mean_l0: float = option(8.0, "Features firing per sample on average (before the hierarchy removes "
                            "children whose parent is off).", positive=True)
    zipf_exponent: float = option(0.5, "Feature i fires with probability proportional to (i+1)^-exponent "
                                  "(0: all equally often).")
    magnitude_mean: float = option(1.0, "Mean magnitude of a firing feature.", positive=True)
    magnitude_spread: float = option(0.25, "Standard deviation of log(magnitude) (log-normal magnitudes; 0: "
                                     "every firing has magnitude_mean).")
    hierarchy_fraction: float = option(0.0, "Share of the features that are children of a more frequent "
                                       "parent and fire only with it.")
    children_per_parent: int = option(4, "Children each parent has (with hierarchy_fraction > 0).", positive=True)
    exclusive_siblings: bool = option(True, "At most one child of a parent fires at once.")
    correlation_rank: int = option(0, "Rank of the correlations between features' firing (0: independent).")
    correlation_strength: float = option(0.0, "Weight of the shared low-rank part of the firing copula, 0..1.")
    orthogonalize_steps: int = option(200, "Gradient steps pushing the directions apart (lower max cosine; "
                                      "0: random directions).")
    bias_norm: float = option(0.0, "Norm of a constant vector added to every sample.")
    noise_std: float = option(0.0, "Standard deviation of isotropic Gaussian noise added to every sample.")
    rows_per_unit: int = option(4096, "Samples per unit of the stream (what one regenerates at a time).",
                                positive=True)
    seed: int = option(0, "Everything is drawn from this seed.")

    def __post_init__(self):
        problems = check_fields(self)
        for name in ("hierarchy_fraction", "correlation_strength"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} ({getattr(self, name)}) must be between 0 and 1")
        if self.correlation_rank < 0:
            problems.append("correlation_rank must be 0 or more")
        if problems:
            raise ValueError("invalid synthetic config: " + "; ".join(problems))

    def save(self, path) -> None:
        write_json(path, {"format": "saelab-synthetic", **asdict(self)})

    @classmethod
    def load(cls, path) -> SyntheticConfig:
        if not os.path.exists(path):
            raise FileNotFoundError(f"synthetic-data config {path} does not exist: write one with `saelab synth "
                                    f"--out {path}`")
        data = read_json(path, "It is a synthetic-data config: write it again with SyntheticConfig(...).save().")
        data.pop("format", None)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown synthetic-data settings {', '.join(sorted(unknown))}")
        return cls(**data)


# SAELens's SynthSAEBench-16k at the size of its published reference (16,384 features, L0 about 25), in
# this generator's terms (mean_l0 30 gives a true L0 of about 25 once the hierarchy has removed children whose
# parent is off): describable, and generated a unit at a time, though slow to train on here.
SYNTH_16K = SyntheticConfig(d_in=768, n_features=16_384, mean_l0=30.0, zipf_exponent=0.5, magnitude_spread=0.25,
                            hierarchy_fraction=0.25, children_per_parent=4, correlation_rank=16,
                            correlation_strength=0.3, orthogonalize_steps=100, rows_per_unit=1024)


PRESETS = {"synth-16k": SYNTH_16K}


def describe(cfg: SyntheticConfig, rows: int = 4096) -> str:
    """What data from ``cfg`` looks like, measured on ``rows`` samples: true L0, how often the most and least
    frequent features fire, the hierarchy, and how close the directions come to each other."""
    features = SyntheticFeatures(cfg)
    x, codes = features.sample(0)
    x, codes = x[:rows], codes[:rows]
    on = (codes > 0).float()
    frequency = on.mean(0)
    probe = features.directions[:4096]
    gram = probe @ probe.T - torch.eye(len(probe))
    children = int((features.parent >= 0).sum())
    return "\n".join([
        f"{cfg.n_features:,} features in {cfg.d_in} dimensions (seed {cfg.seed})",
        f"true L0 {on.sum(1).mean():.2f} per sample (asked: {cfg.mean_l0}); feature frequencies from "
        f"{frequency.max():.4f} down to {frequency.min():.5f}; {int((frequency == 0).sum())} features never fired "
        f"in {len(x):,} samples",
        f"hierarchy: {children:,} children of {int(features.parent[features.parent >= 0].unique().numel()):,} "
        f"parents" + (", siblings exclusive" if cfg.exclusive_siblings and children else ""),
        f"directions: max |cosine| between two {gram.abs().max():.3f}, mean {gram.abs().sum() / max(1, gram.numel() - len(probe)):.3f}"
        + (" (of the first 4,096)" if cfg.n_features > 4096 else ""),
        f"sample norm: mean {x.norm(dim=1).mean():.3f}",
    ])


class SyntheticFeatures:
    """The ground truth of a config: directions, probabilities, hierarchy and copula; and the stream."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        self.directions = _spread_directions(torch.randn(cfg.n_features, cfg.d_in, generator=g),
                                             cfg.orthogonalize_steps)
        ranks = torch.arange(cfg.n_features, dtype=torch.float64)
        weights = (ranks + 1).pow(-cfg.zipf_exponent)
        self.probabilities = (weights * cfg.mean_l0 / weights.sum()).clamp(max=1.0).float()
        self.parent = _hierarchy(cfg, g)                     # [n] parent index, -1 for none
        self.copula = torch.randn(cfg.n_features, cfg.correlation_rank, generator=g) if cfg.correlation_rank else None
        self.bias = torch.randn(cfg.d_in, generator=g)
        self.bias = self.bias / self.bias.norm() * cfg.bias_norm
        self.d_in = cfg.d_in

    def sample(self, unit: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Unit ``unit`` of the ``split`` stream (``train``, or ``eval``: samples no training sees):
        ``(x [rows, d_in], codes [rows, n_features])``, codes the true magnitudes (0 where a feature is off)."""
        cfg = self.cfg
        digest = hashlib.sha256(f"{cfg.seed}:synthetic:{split}:{unit}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        rows, n = cfg.rows_per_unit, cfg.n_features
        noise = torch.randn(rows, n, generator=g)
        if self.copula is not None:
            # z @ A^T has variance ||A_i||^2 in column i: divided by it, every feature's noise stays N(0, 1).
            shared = torch.randn(rows, cfg.correlation_rank, generator=g) @ self.copula.T
            shared = shared / self.copula.norm(dim=1).clamp_min(1e-6)
            rho = cfg.correlation_strength
            noise = math.sqrt(1 - rho) * noise + math.sqrt(rho) * shared
        fires = _normal_cdf(noise) < self.probabilities
        fires = self._apply_hierarchy(fires, g)
        log_sd = cfg.magnitude_spread
        magnitudes = cfg.magnitude_mean * torch.exp(log_sd * torch.randn(rows, n, generator=g) - log_sd ** 2 / 2)
        codes = magnitudes * fires
        x = codes @ self.directions + self.bias
        if cfg.noise_std:
            x = x + cfg.noise_std * torch.randn(rows, cfg.d_in, generator=g)
        return x, codes

    def _apply_hierarchy(self, fires: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        children = (self.parent >= 0).nonzero().squeeze(1)
        if len(children) == 0:
            return fires
        fires[:, children] &= fires[:, self.parent[children]]  # parents are roots: one level settles it
        if self.cfg.exclusive_siblings:
            score = torch.rand(fires.shape[0], len(children), generator=g) * fires[:, children]
            group = self.parent[children]
            best = torch.zeros(fires.shape[0], self.cfg.n_features).scatter_reduce(
                1, group.expand(fires.shape[0], -1), score, reduce="amax", include_self=True)
            keep = (score > 0) & (score >= best.gather(1, group.expand(fires.shape[0], -1)))
            fires[:, children] = keep
        return fires


class SyntheticSource(ShardableSource):
    """``units`` of ``SyntheticFeatures`` as an ActivationSource (``units`` units of ``rows_per_unit`` rows);
    sharded, each process generates only its own units."""

    def __init__(self, features: SyntheticFeatures, units: int):
        self.features, self.n_units, self.d_in = features, units, features.d_in
        self.columns: dict = {}

    def units(self, start: int) -> Iterator[torch.Tensor]:
        for unit in range(self.part.first(start), self.n_units, self.part.count):
            yield self.features.sample(unit)[0]


def _spread_directions(raw: torch.Tensor, steps: int, subset: int = 2048) -> torch.Tensor:
    """Unit rows, then ``steps`` of gradient descent on the squared cosines between them (a cheap push toward
    the least coherent arrangement; exact orthogonality where n_features <= d_in). Each step takes a random
    ``subset`` of the rows, so that 16k features cost what 2k do."""
    directions = raw / raw.norm(dim=1, keepdim=True)
    n, d = directions.shape
    if n <= d:
        q, _ = torch.linalg.qr(directions.T)
        return q.T[:n].contiguous()
    g = torch.Generator().manual_seed(n * 7919 + d)
    w = directions.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([w], lr=0.01)
    for _ in range(steps):
        rows = torch.randperm(n, generator=g)[:subset] if n > subset else slice(None)
        unit = w[rows] / w[rows].norm(dim=1, keepdim=True)
        gram = unit @ unit.T
        loss = (gram - torch.eye(len(unit))).pow(2).sum() / len(unit)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (w / w.norm(dim=1, keepdim=True)).detach()


def _hierarchy(cfg: SyntheticConfig, g: torch.Generator) -> torch.Tensor:
    """Each feature's parent (-1: a root): the last ``hierarchy_fraction`` of the features (the rarer ones)
    become children, ``children_per_parent`` to each parent, parents drawn from the others (roots: one level)."""
    parent = torch.full((cfg.n_features,), -1, dtype=torch.long)
    n_children = int(round(cfg.hierarchy_fraction * cfg.n_features))
    if n_children == 0:
        return parent
    first_child = cfg.n_features - n_children
    n_parents = max(1, math.ceil(n_children / cfg.children_per_parent))
    if n_parents > first_child:
        raise ValueError(f"hierarchy_fraction {cfg.hierarchy_fraction} leaves {first_child} features to be parents of "
                         f"{n_children} children ({cfg.children_per_parent} each); lower it or raise children_per_parent")
    parents = torch.randperm(first_child, generator=g)[:n_parents]
    parent[first_child:] = parents.repeat_interleave(cfg.children_per_parent)[:n_children]
    return parent


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))
