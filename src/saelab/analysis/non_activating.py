"""Contexts where a feature does not fire, collected in the same streamed pass as its top examples.

An explanation is only tested by contexts it must reject. Two kinds are kept per feature (Paulo et al.
2024): *random* contexts, a uniform sample of the positions where the feature is silent on the whole
window around them, and *near misses*, the positions where the features whose decoder directions are
closest to this one's fire most strongly while this one stays silent on the window: text that looks
alike to the model but is not this feature's. Both are streamed top-N selections, so they reuse
``TopExamplesCollector``: random ones keep the largest of a random key per position (the same keys for
every feature), near misses the largest neighbour activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saelab.analysis.top_examples import TopExamplesCollector
from saelab.sae import SAE

GATHER_FLOATS = 1 << 25  # the neighbours' activations are gathered a chunk of features at a time, at most this many


@torch.no_grad()
def decoder_neighbours(sae: SAE, features: list[int], n: int) -> torch.Tensor:
    """``[len(features), n]``: for each feature, the ``n`` other features whose decoder rows have the highest
    cosine similarity with its own."""
    rows = sae.W_dec.detach().float()
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    index = torch.tensor(features, dtype=torch.long, device=rows.device)
    similarity = rows[index] @ rows.T
    similarity[torch.arange(len(features)), index] = -torch.inf  # not its own neighbour
    return similarity.topk(min(n, rows.shape[0] - 1), dim=1).indices.cpu()


class NonActivatingCollector:
    """Random contexts and near misses of the chosen ``features`` (global indices), ``n_examples`` of each.

    ``neighbours``: ``[len(features), m]`` global indices of each feature's closest features
    (``decoder_neighbours``). A position qualifies only where the feature is 0 on every token within
    ``window`` of it (the example shown is then wholly non-activating); positions where ``keep`` is False
    (special tokens) never do.
    """

    def __init__(self, features: list[int], neighbours: torch.Tensor, n_examples: int = 10, window: int = 8,
                 seed: int = 0):
        self.index = torch.tensor(features, dtype=torch.long)
        self.neighbours = neighbours.long()
        self.window = window
        self.generator = torch.Generator().manual_seed(seed)
        self.random = TopExamplesCollector(len(features), n_examples, window)
        self.near = TopExamplesCollector(len(features), n_examples, window)

    @torch.no_grad()
    def add_features(self, feats: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """``feats``: ``[batch, seq, d_sae]`` activations of all the SAE's features; ``tokens``: ``[batch, seq]``."""
        feats = feats.detach().float().cpu()
        batch, seq, _ = feats.shape
        mine = feats[..., self.index]                                          # [batch, seq, n]
        # The feature's largest activation within `window` tokens of each position: silent where it is 0.
        nearby = F.max_pool1d(mine.transpose(1, 2), 2 * self.window + 1, stride=1, padding=self.window)
        silent = nearby.transpose(1, 2) <= 0
        if keep is not None:
            silent &= keep.cpu().bool()[..., None]
        key = 1.0 - torch.rand(batch, seq, 1, generator=self.generator)        # in (0, 1]: a value > 0 is kept
        self.random.add_features(key.expand_as(silent) * silent, tokens)
        self.near.add_features(self._neighbour_peak(feats) * silent, tokens)

    def _neighbour_peak(self, feats: torch.Tensor) -> torch.Tensor:
        """``[batch, seq, n]``: the largest activation among each feature's neighbours."""
        batch, seq, _ = feats.shape
        m = max(self.neighbours.shape[1], 1)
        chunk = max(1, GATHER_FLOATS // (batch * seq * m))
        parts = [feats[..., self.neighbours[lo:lo + chunk]].amax(-1).clamp_min(0)
                 for lo in range(0, len(self.index), chunk)]
        return torch.cat(parts, dim=-1)
