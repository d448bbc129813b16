"""How well an SAE trained on synthetic activations (data/synthetic.py) found the features that made them.

- ``mcc``: mean cosine between decoder rows and true directions after the optimal one-to-one matching
  (Hungarian, maximising the total cosine; ``min(d_sae, n_features)`` pairs), the matching the rest uses.
- ``mean_max_cosine``: per true feature, its best cosine with any decoder row, averaged.
- ``uniqueness``: distinct true features that are some live latent's best match, over live latents (1: no
  two latents chase one feature); ``duplicate_latents``: live latents whose best match another latent shares.
- ``f1``, ``precision``, ``recall``: for each matched pair, the latent's firing (> 0) against the true
  feature's firing over the evaluation samples; means over the true features that fired there.
- ``explained_variance`` (1 - FVU, FVU as in SAE_FORMAT.md), ``l0`` against ``true_l0``, ``dead_fraction``
  (latents never active on the samples), ``shrinkage``: mean ||x_hat - b|| / ||x - b|| with b the data's
  constant bias (below 1: the SAE under-reconstructs, as an L1 penalty makes it).

The samples are the generator's evaluation split, never trained on.
"""

from __future__ import annotations

import math

import torch

from saelab.data.synthetic import SyntheticFeatures
from saelab.evals.geometry import unit_rows
from saelab.sae import SAE

GROUND_TRUTH_KEYS = ("mcc", "mean_max_cosine", "uniqueness", "duplicate_latents", "f1", "precision", "recall",
                     "explained_variance", "l0", "true_l0", "dead_fraction", "shrinkage")


@torch.no_grad()
def ground_truth_metrics(sae: SAE, features: SyntheticFeatures, samples: int = 16_384) -> dict:
    """The metrics above for ``sae`` on ``samples`` evaluation samples of ``features``."""
    from scipy.optimize import linear_sum_assignment

    sae = sae.eval()
    decoder = sae.W_dec.detach().float().cpu()
    cosine = unit_rows(decoder) @ unit_rows(features.directions).T           # [d_sae, n_features]
    latents, truths = linear_sum_assignment(cosine.numpy(), maximize=True)
    latents, truths = torch.as_tensor(latents), torch.as_tensor(truths)
    n_features = features.cfg.n_features
    counts = _Counts(sae.cfg.d_sae, n_features, features.d_in)
    unit = 0
    while counts.samples < samples:
        x, codes = features.sample(unit, split="eval")
        x, codes = x[:samples - counts.samples], codes[:samples - counts.samples]
        counts.add(x, sae(x), sae.encode(x) > 0, codes > 0, latents, truths, features.bias)
        unit += 1
    live = counts.latent_fired > 0
    best_truth = cosine.argmax(dim=1)[live]
    distinct = int(best_truth.unique().numel())
    fired = counts.truth_fired[truths] > 0
    precision = counts.both / counts.latent_fired[latents].clamp_min(1)
    recall = counts.both / counts.truth_fired[truths].clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    return {
        "mcc": float(cosine[latents, truths].mean()),
        "mean_max_cosine": float(cosine.max(dim=0).values.mean()),
        "uniqueness": distinct / max(1, int(live.sum())),
        "duplicate_latents": int(live.sum()) - distinct,
        "f1": _mean(f1[fired]), "precision": _mean(precision[fired]), "recall": _mean(recall[fired]),
        "explained_variance": 1.0 - counts.fvu(),
        "l0": float(counts.latent_fired.sum() / counts.samples),
        "true_l0": float(counts.truth_fired.sum() / counts.samples),
        "dead_fraction": float((~live).float().mean()),
        "shrinkage": counts.norm_ratio / max(1, counts.norm_rows),
        "tokens": counts.samples,
        "firing_frequency": (counts.latent_fired / counts.samples).float(),
    }


class _Counts:
    """Sums over the evaluation samples (float64 where they are many)."""

    def __init__(self, d_sae: int, n_features: int, d_in: int):
        self.samples = 0
        self.latent_fired = torch.zeros(d_sae, dtype=torch.float64)
        self.truth_fired = torch.zeros(n_features, dtype=torch.float64)
        self.both = torch.zeros(0, dtype=torch.float64)
        self.sq_err = 0.0
        self.x_sum = torch.zeros(d_in, dtype=torch.float64)
        self.x_sq = 0.0
        self.norm_ratio = 0.0
        self.norm_rows = 0

    def add(self, x, x_hat, latent_on, truth_on, latents, truths, bias) -> None:
        self.samples += len(x)
        self.latent_fired += latent_on.sum(0)
        self.truth_fired += truth_on.sum(0)
        both = (latent_on[:, latents] & truth_on[:, truths]).sum(0).double()
        self.both = both if len(self.both) == 0 else self.both + both
        self.sq_err += float((x_hat - x).double().pow(2).sum())
        self.x_sum += x.double().sum(0)
        self.x_sq += float(x.double().pow(2).sum())
        norms, norms_hat = (x - bias).norm(dim=1), (x_hat - bias).norm(dim=1)
        some = norms > 1e-6  # a sample where nothing fires has no size to shrink
        self.norm_ratio += float((norms_hat[some] / norms[some]).sum())
        self.norm_rows += int(some.sum())

    def fvu(self) -> float:
        variance = self.x_sq - float(self.x_sum.pow(2).sum()) / self.samples  # sum ||x - mean||^2
        return self.sq_err / variance if variance > 0 else math.nan


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if len(values) else math.nan
