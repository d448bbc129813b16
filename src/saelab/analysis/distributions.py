"""Per-feature activation histograms and examples from each activation band, streamed in bounded memory.

Both need bins relative to a feature's largest activation, known only at the end of the pass. So a
feature's range is the smallest power of two above every activation seen so far; when a larger one
arrives the range doubles (as often as needed) and neighbouring bins merge pairwise. With power-of-two
ranges and bin counts, the bin a value ends up in is exactly the bin it would have had with the final
range from the start: the result does not depend on the order of the data.

Band examples are a uniform sample of the active tokens in each band, by bottom-k sampling: every active
token draws a random key and a band keeps the ``per_band`` tokens with the smallest keys. Cutting the
union of two such samples back to the smallest keys gives a uniform sample of the union, so bands merge
exactly when the range doubles. Memory: O(d_sae * (n_bins + n_bands * per_band * window)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from saelab.analysis.top_examples import Example, window_example, windows_at

# What an empty sample slot holds, field by field (see ActivationDistributions._fields).
BLANK = (math.inf, 0.0, -1, -1, -1, 0.0)


@dataclass
class Histogram:
    bin_width: float             # bins are [i * bin_width, (i + 1) * bin_width), the first starting at 0
    counts: list[int]            # active tokens per bin, up to the last non-empty bin


@dataclass
class Band:
    low: float                   # activations in [low, high)
    high: float
    count: int                   # active tokens whose activation is in the band
    examples: list[Example]      # a uniform sample of them, strongest first


class ActivationDistributions:
    """Feed it ``[batch, seq, d_sae]`` feature activations (as ``TopExamplesCollector.add_features``).

    ``n_bins`` histogram bins and ``n_bands`` example bands (both powers of two) split ``[0, range)``,
    ``range`` the smallest power of two above the feature's maximum; ``per_band`` examples are kept per
    band, each with ``window`` tokens on either side. ``seed`` fixes the sampling.
    """

    def __init__(self, d_sae: int, n_bins: int = 64, n_bands: int = 8, per_band: int = 4, window: int = 8,
                 seed: int = 0):
        for name, value in (("n_bins", n_bins), ("n_bands", n_bands)):
            if value <= 0 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two (bins merge pairwise), got {value}")
        if n_bands > n_bins or per_band <= 0 or window < 0:
            raise ValueError(f"need n_bands <= n_bins, per_band > 0 and window >= 0, got n_bands={n_bands}, "
                             f"n_bins={n_bins}, per_band={per_band}, window={window}")
        self.d_sae, self.n_bins, self.n_bands, self.per_band, self.window = d_sae, n_bins, n_bands, per_band, window
        self.generator = torch.Generator().manual_seed(seed)
        self.contexts_seen = 0
        self.range = torch.zeros(d_sae)                       # 0 until the feature first fires
        self.counts = torch.zeros(d_sae, n_bins, dtype=torch.long)
        # Band samples, one slot per (feature, band, rank): slot = (feature * n_bands + band) * per_band + rank.
        slots, width = d_sae * n_bands * per_band, 2 * window + 1
        self.key = torch.full((slots,), math.inf)             # inf: empty slot
        self.value = torch.zeros(slots)
        self.context = torch.full((slots,), -1, dtype=torch.long)
        self.position = torch.full((slots,), -1, dtype=torch.long)
        self.window_tokens = torch.full((slots, width), -1, dtype=torch.int32)  # int32: halves the largest table
        self.window_acts = torch.zeros(slots, width)

    @torch.no_grad()
    def add_features(self, feats: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        if feats.dim() != 3 or feats.shape[:2] != tokens.shape or feats.shape[-1] != self.d_sae:
            raise ValueError(f"expected features [batch, seq, {self.d_sae}] and tokens [batch, seq], got "
                             f"{tuple(feats.shape)} and {tuple(tokens.shape)}")
        feats, tokens = feats.detach().float().cpu(), tokens.cpu()
        if keep is not None:
            feats = feats.masked_fill(~keep.cpu().bool()[..., None], 0.0)
        self._grow(feats.amax((0, 1)))
        b, p, f = (feats > 0).nonzero(as_tuple=True)
        value = feats[b, p, f]
        bins = (value * self.n_bins / self.range[f]).long().clamp_(max=self.n_bins - 1)  # exact: powers of two
        self.counts.view(-1).index_add_(0, f * self.n_bins + bins, torch.ones_like(bins))
        group = f * self.n_bands + bins // (self.n_bins // self.n_bands)
        key = torch.rand(value.shape, generator=self.generator)
        # A token can only enter a full band's sample with a key below the largest kept one: after the first
        # batches few do, so few windows are gathered and merged.
        largest = self.key.view(-1, self.per_band).max(1).values  # inf while a band has room
        hopeful = (key < largest[group]).nonzero().squeeze(1)
        chosen, rank = bottom_k(group[hopeful], key[hopeful], self.per_band)  # at most per_band per band
        chosen = hopeful[chosen]
        win_tokens, win_acts = windows_at(feats, tokens, b[chosen], p[chosen], f[chosen], self.window)
        self._merge(group[chosen], rank, key[chosen], value[chosen], b[chosen] + self.contexts_seen, p[chosen],
                    win_tokens.int(), win_acts)
        self.contexts_seen += feats.shape[0]

    def _grow(self, batch_max: torch.Tensor) -> None:
        """Widen each feature's range to the smallest power of two above ``batch_max``, merging bins and bands."""
        _, exponent = torch.frexp(batch_max)                  # batch_max < 2 ** exponent
        needed = torch.where(batch_max > 0, torch.ldexp(torch.ones_like(batch_max), exponent), 0.0)
        grow = (needed > self.range) & (self.range > 0)
        if grow.any():
            features = grow.nonzero().squeeze(1)
            doublings = torch.frexp(needed[features])[1] - torch.frexp(self.range[features])[1]
            self._merge_bins(features, doublings)
            self._merge_bands(features, doublings)
        self.range = torch.maximum(self.range, needed)

    def _merge_bins(self, features: torch.Tensor, doublings: torch.Tensor) -> None:
        target = torch.arange(self.n_bins) >> doublings[:, None]            # [features, n_bins]
        merged = torch.zeros(len(features), self.n_bins, dtype=torch.long)
        self.counts[features] = merged.scatter_add_(1, target, self.counts[features])

    def _merge_bands(self, features: torch.Tensor, doublings: torch.Tensor) -> None:
        per_feature = self.n_bands * self.per_band
        slots = (features[:, None] * per_feature + torch.arange(per_feature)).reshape(-1)
        band = (torch.arange(per_feature) // self.per_band) >> doublings[:, None]
        group = (features[:, None] * self.n_bands + band).reshape(-1)
        fields = [field[slots].clone() for field in self._fields()]
        for field, blank in zip(self._fields(), BLANK):  # the features' slots are refilled from the merged sample
            field[slots] = blank
        kept, rank = bottom_k(group, fields[0], self.per_band)
        destination = group[kept] * self.per_band + rank
        for field, old in zip(self._fields(), fields):
            field[destination] = old[kept]

    def _fields(self) -> list[torch.Tensor]:
        return [self.key, self.value, self.context, self.position, self.window_tokens, self.window_acts]

    def _merge(self, group, rank, key, value, context, position, win_tokens, win_acts) -> None:
        """Merge candidates (at most ``per_band`` per group, ``rank`` their order by key) into the stored samples
        of their groups: each group keeps the ``per_band`` smallest keys of its stored and new entries."""
        if len(group) == 0:
            return
        touched, row = torch.unique(group, return_inverse=True)
        stored = (touched[:, None] * self.per_band + torch.arange(self.per_band)).reshape(-1)  # [T * per_band]
        # A pool of the stored entries, the candidates and one empty entry; [T, 2 * per_band] indices into it.
        n_stored, n_new = len(stored), len(group)
        empty = n_stored + n_new
        new = torch.full((len(touched), self.per_band), empty)
        new[row, rank] = n_stored + torch.arange(n_new)
        pool_index = torch.cat([torch.arange(n_stored).view(-1, self.per_band), new], 1)
        pools = [torch.cat([old[stored], fresh, torch.full_like(fresh[:1], blank)]) for old, fresh, blank in zip(
            self._fields(), (key, value, context, position, win_tokens, win_acts), BLANK)]
        order = pools[0][pool_index].argsort(dim=1, stable=True)[:, :self.per_band]
        chosen = pool_index.gather(1, order).reshape(-1)
        for field, pool in zip(self._fields(), pools):
            field[stored] = pool[chosen]

    def histogram(self, feature: int) -> Histogram:
        counts = self.counts[feature]
        nonzero = counts.nonzero()
        last = int(nonzero[-1]) + 1 if len(nonzero) else 0
        return Histogram(float(self.range[feature]) / self.n_bins, counts[:last].tolist())

    def bands(self, feature: int) -> list[Band]:
        """The bands that hold active tokens, highest first, each with its sampled examples."""
        width = float(self.range[feature]) / self.n_bands
        per_band_bins = self.counts[feature].view(self.n_bands, -1).sum(1).tolist()
        out = []
        for band in reversed(range(self.n_bands)):
            if per_band_bins[band] == 0:
                continue
            first = (feature * self.n_bands + band) * self.per_band
            slots = [s for s in range(first, first + self.per_band) if math.isfinite(float(self.key[s]))]
            examples = [window_example(int(self.context[s]), int(self.position[s]), float(self.value[s]),
                                       self.window_tokens[s].long(), self.window_acts[s]) for s in slots]
            examples.sort(key=lambda e: -e.activation)
            out.append(Band(band * width, (band + 1) * width, per_band_bins[band], examples))
        return out


def bottom_k(group: torch.Tensor, key: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the entries with the ``k`` smallest finite keys in each group, and their rank (0 = smallest)."""
    order = key.argsort(stable=True)
    order = order[group[order].argsort(stable=True)]     # by group, then by key
    sorted_group = group[order]
    index = torch.arange(len(order))
    starts = torch.ones(len(order), dtype=torch.bool)
    starts[1:] = sorted_group[1:] != sorted_group[:-1]
    rank = index - torch.where(starts, index, 0).cummax(0).values
    keep = (rank < k) & torch.isfinite(key[order])
    return order[keep], rank[keep]
