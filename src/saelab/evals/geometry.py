"""The shape of a dictionary: how close its decoder rows come to each other, how each latent's encoder
reads what its decoder writes, how often latents fire, and which latents fire on one token id only.

- ``max_decoder_cosine`` per latent: its decoder row's largest cosine with another row (near 1: a
  near-duplicate); ``near_duplicate_latents``: latents whose max is above ``NEAR_DUPLICATE`` (0.9).
- ``encoder_decoder_cosine`` per latent: cosine between its encoder column and decoder row (1: the latent
  reads along the direction it writes, as in a tied dictionary; low: it reads something else, e.g. to
  suppress interference from other features).
- ``frequency_buckets``: latents by firing frequency on the evaluation text, in decades from dead to dense.
- ``single_token_fraction``: among latents that fired at least ``SINGLE_TOKEN_MIN_FIRINGS`` times, the share
  that fired on one token id only (token-level features: a lookup of the current token).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from saelab.sae import SAE

NEAR_DUPLICATE = 0.9
SINGLE_TOKEN_MIN_FIRINGS = 5
# Upper edges of the frequency buckets (a latent with frequency f falls in the first bucket with f <= edge).
FREQUENCY_EDGES = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
FREQUENCY_NAMES = ("dead", "<=1e-5", "1e-5..1e-4", "1e-4..1e-3", "1e-3..1e-2", "1e-2..1e-1", "dense >0.1")
GEOMETRY_KEYS = ("max_decoder_cosine_mean", "near_duplicate_latents", "encoder_decoder_cosine_mean",
                 "single_token_fraction")


@torch.no_grad()
def decoder_geometry(sae: SAE, chunk: int = 4096) -> dict:
    """Decoder-row and encoder/decoder cosines (per latent and summarised), in chunks of ``chunk`` rows so
    that a wide dictionary needs ``chunk x d_sae`` floats, not ``d_sae^2``."""
    decoder = unit_rows(sae.W_dec.detach().float().cpu())
    d_sae = len(decoder)
    best = torch.full((d_sae,), -1.0)
    for start in range(0, d_sae, chunk):
        block = decoder[start:start + chunk] @ decoder.T
        rows = torch.arange(start, min(start + chunk, d_sae))
        block[rows - start, rows] = -2.0  # a row's cosine with itself does not count
        best[rows] = block.max(dim=1).values
    encoder = unit_rows(sae.W_enc.detach().float().cpu().T)
    alignment = (encoder * decoder).sum(dim=1)
    return {"max_decoder_cosine": best, "encoder_decoder_cosine": alignment,
            "max_decoder_cosine_mean": float(best.mean()) if d_sae > 1 else math.nan,
            "near_duplicate_latents": int((best > NEAR_DUPLICATE).sum()),
            "encoder_decoder_cosine_mean": float(alignment.mean())}


def frequency_buckets(firing_frequency: torch.Tensor) -> dict[str, int]:
    """Latents per frequency bucket (FREQUENCY_NAMES), from a [d_sae] firing frequency."""
    frequency = firing_frequency.double()
    counts, lower = {}, -1.0
    for name, edge in zip(FREQUENCY_NAMES, FREQUENCY_EDGES):
        counts[name] = int(((frequency > lower) & (frequency <= edge)).sum())
        lower = edge
    return counts


class TokenDiversity:
    """For each latent, whether it has fired on more than one token id (and how often it fired), kept in
    O(d_sae) memory over any amount of text: the first id it fired on, and a flag once another appears."""

    def __init__(self, d_sae: int):
        self.first = torch.full((d_sae,), -1, dtype=torch.long)
        self.several = torch.zeros(d_sae, dtype=torch.bool)
        self.firings = torch.zeros(d_sae, dtype=torch.long)

    def add(self, codes: torch.Tensor, token_ids: torch.Tensor, rows: int = 256) -> None:
        """``codes`` [n, d_sae] and the token id of each of the n rows (``rows`` at a time: the id table is
        ``rows x d_sae`` longs)."""
        for start in range(0, len(codes), rows):
            self._add(codes[start:start + rows], token_ids[start:start + rows])

    def _add(self, codes: torch.Tensor, token_ids: torch.Tensor) -> None:
        on = codes > 0
        self.firings += on.sum(0).cpu()
        ids = torch.where(on, token_ids[:, None].to(on.device), -1)
        highest = ids.max(dim=0).values.cpu()
        lowest = torch.where(on, ids, torch.iinfo(torch.long).max).min(dim=0).values.cpu()
        fired = highest >= 0
        unseen = fired & (self.first < 0)
        self.first[unseen] = lowest[unseen]
        self.several |= fired & ((highest != self.first) | (lowest != self.first))

    def single_token_fraction(self) -> float:
        counted = self.firings >= SINGLE_TOKEN_MIN_FIRINGS
        return float((~self.several[counted]).float().mean()) if bool(counted.any()) else math.nan


def geometry_metrics(sae: SAE, firing_frequency: torch.Tensor | None = None,
                     batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = ()) -> dict:
    """Everything above: ``firing_frequency`` from an evaluation (for the buckets), ``batches`` of
    ``(activations [n, d_in], token ids [n])`` at the SAE's hook (for the single-token share)."""
    result = decoder_geometry(sae)
    if firing_frequency is not None:
        result["frequency_buckets"] = frequency_buckets(firing_frequency)
    diversity = TokenDiversity(sae.cfg.d_sae)
    with torch.no_grad():
        for acts, ids in batches:
            diversity.add(sae.encode(acts.float()), ids)
    result["single_token_fraction"] = diversity.single_token_fraction()
    result["single_token_latents"] = int((~diversity.several & (diversity.firings >= SINGLE_TOKEN_MIN_FIRINGS)).sum())
    return result


def unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """Each row divided by its norm (a zero row stays zero)."""
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
