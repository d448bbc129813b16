"""Top-activating examples of every feature, collected in one streamed pass over a corpus.

Per feature the collector keeps running statistics (firing count, sum and max of activations) and a
streamed top-N of (context, position, activation), each with the window of tokens around that position
and the feature's activation on every token of the window. Memory is O(d_sae * N * window): activations
of a batch are dropped once the batch is merged, so corpus size is unbounded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from saelab.analysis.loading import Loaded, check_feature, token_strings
from saelab.evals.loading import corpus_source
from saelab.evals.options import CorpusOptions
from saelab.sae import SAE


@dataclass
class Example:
    context: int                 # index of the context in the stream (0 = first context seen)
    position: int                # token position of the maximum inside that context
    activation: float            # the feature's activation there
    tokens: list[int]            # token ids of the window around the position (positions outside dropped)
    activations: list[float]     # the feature's activation on each window token (0 where not an SAE input)
    window_start: int            # the context position of tokens[0]

    @property
    def center(self) -> int:
        """Index of the maximum inside ``tokens``."""
        return self.position - self.window_start

    def to_dict(self, tokenizer=None) -> dict:
        out = {"context": self.context, "position": self.position, "activation": self.activation,
               "window_start": self.window_start, "center": self.center, "token_ids": self.tokens,
               "activations": self.activations}
        if tokenizer is not None:
            out["tokens"] = token_strings(tokenizer, self.tokens)
        return out


@dataclass
class FeatureSummary:
    feature: int
    count: int                   # tokens on which the feature was active (> 0)
    frequency: float             # count / tokens seen
    mean_when_active: float      # sum of activations / count (0 when never active)
    max: float
    examples: list[Example]      # strongest first, at most N


class TopExamplesCollector:
    """Feed it batches of feature activations (or of hook activations, with an SAE) and token ids.

    ``n_top``: examples kept per feature; ``window``: tokens shown on each side of an example's maximum.
    Positions where ``keep`` is False (special tokens, by default) are never examples and show activation 0.
    """

    def __init__(self, d_sae: int, n_top: int = 20, window: int = 8, sae: SAE | None = None):
        if n_top <= 0 or window < 0:
            raise ValueError(f"n_top must be positive and window non-negative, got n_top={n_top}, window={window}")
        self.d_sae, self.n_top, self.window, self.sae = d_sae, n_top, window, sae
        width = 2 * window + 1
        self.tokens_seen = 0
        self.contexts_seen = 0
        self.count = torch.zeros(d_sae, dtype=torch.long)
        self.sum = torch.zeros(d_sae, dtype=torch.float64)
        self.max = torch.zeros(d_sae)
        # The running top-N of every feature: value, where, and the window around it.
        self.values = torch.full((d_sae, n_top), -math.inf)
        self.context = torch.full((d_sae, n_top), -1, dtype=torch.long)
        self.position = torch.full((d_sae, n_top), -1, dtype=torch.long)
        self.window_tokens = torch.full((d_sae, n_top, width), -1, dtype=torch.long)
        self.window_acts = torch.zeros(d_sae, n_top, width)

    @torch.no_grad()
    def add_activations(self, acts: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """``acts``: ``[batch, seq, d_in]`` hook activations, encoded with the collector's SAE."""
        if self.sae is None:
            raise ValueError("this collector has no SAE: pass sae= or feed feature activations with add_features")
        self.add_features(self.sae.encode(acts.float()), tokens, keep)

    @torch.no_grad()
    def add_features(self, feats: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """``feats``: ``[batch, seq, d_sae]`` feature activations; ``tokens``: ``[batch, seq]`` their token ids."""
        if feats.dim() != 3 or feats.shape[:2] != tokens.shape or feats.shape[-1] != self.d_sae:
            raise ValueError(f"expected features [batch, seq, {self.d_sae}] and tokens [batch, seq], got "
                             f"{tuple(feats.shape)} and {tuple(tokens.shape)}")
        feats = feats.detach().float().cpu()
        tokens = tokens.cpu()
        batch, seq, _ = feats.shape
        if keep is not None:
            keep = keep.cpu().bool()
            feats = feats.masked_fill(~keep[..., None], 0.0)
            self.tokens_seen += int(keep.sum())
        else:
            self.tokens_seen += batch * seq
        # Summed in float32 within a batch (exact for counts; sums of <= batch * seq terms), then accumulated in
        # int64 / float64: summing a bool or a float64 copy of the whole batch is several times slower.
        self.count += (feats > 0).float().sum((0, 1)).long()
        self.sum += feats.sum((0, 1)).double()
        self.max = torch.maximum(self.max, feats.amax((0, 1)))

        # This batch's top candidates per feature: [k, d_sae] over the batch's batch*seq positions.
        flat = feats.reshape(batch * seq, self.d_sae)
        k = min(self.n_top, batch * seq)
        cand_values, cand_flat = flat.topk(k, dim=0)                      # [k, d_sae]
        cand_values = cand_values.masked_fill(cand_values <= 0, -math.inf)  # not active: no example
        # Only features with a candidate above their N-th best change; merging just those keeps the stored
        # windows from being copied every batch (after the first batches, most features are done).
        rows = (cand_values[0] > self.values[:, -1]).nonzero().squeeze(1)
        cand_values, cand_flat = cand_values[:, rows], cand_flat[:, rows]
        cand_b, cand_p = cand_flat // seq, cand_flat % seq
        # The window around each candidate: [k, rows, width].
        win_tokens, win_acts = windows_at(feats, tokens, cand_b, cand_p, rows.expand_as(cand_b), self.window)

        # Merge with the running top-N: [rows, N + k] -> [rows, N]. Earlier examples win ties.
        values = torch.cat([self.values[rows], cand_values.T], 1)
        order = _stable_top(values, self.n_top)
        self.values[rows] = values.gather(1, order)
        self.context[rows] = torch.cat([self.context[rows], (cand_b + self.contexts_seen).T], 1).gather(1, order)
        self.position[rows] = torch.cat([self.position[rows], cand_p.T], 1).gather(1, order)
        windows = order[..., None].expand(-1, -1, 2 * self.window + 1)
        self.window_tokens[rows] = torch.cat([self.window_tokens[rows], win_tokens.transpose(0, 1)], 1).gather(
            1, windows)
        self.window_acts[rows] = torch.cat([self.window_acts[rows], win_acts.transpose(0, 1)], 1).gather(1, windows)
        self.contexts_seen += batch

    def summary(self, feature: int) -> FeatureSummary:
        """Statistics and top examples of one feature, strongest example first."""
        check_feature(self.d_sae, feature)
        examples = []
        for j in range(self.n_top):
            value = float(self.values[feature, j])
            if not value > 0:
                break
            examples.append(window_example(int(self.context[feature, j]), int(self.position[feature, j]), value,
                                           self.window_tokens[feature, j], self.window_acts[feature, j]))
        count = int(self.count[feature])
        return FeatureSummary(feature=feature, count=count, frequency=count / max(self.tokens_seen, 1),
                              mean_when_active=float(self.sum[feature]) / count if count else 0.0,
                              max=float(self.max[feature]), examples=examples)

    def summaries(self) -> list[FeatureSummary]:
        return [self.summary(f) for f in range(self.d_sae)]


def windows_at(feats: torch.Tensor, tokens: torch.Tensor, b: torch.Tensor, p: torch.Tensor, f: torch.Tensor,
               window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[..., 2 * window + 1]`` around positions ``(b, p)`` of ``tokens`` ``[batch, seq]``, and feature
    ``f``'s activation on each (``feats`` ``[batch, seq, d_sae]``); -1 and 0 where the window leaves the context."""
    seq = tokens.shape[1]
    where = p[..., None] + torch.arange(-window, window + 1)
    inside = (where >= 0) & (where < seq)
    where = where.clamp(0, seq - 1)
    b, f = b[..., None].expand_as(where), f[..., None].expand_as(where)
    return tokens[b, where].masked_fill(~inside, -1), feats[b, where, f].masked_fill(~inside, 0.0)


def window_example(context: int, position: int, activation: float, window_tokens: torch.Tensor,
                   window_acts: torch.Tensor) -> Example:
    """An ``Example`` from a stored window (token -1 where the window left the context, dropped here)."""
    inside = window_tokens >= 0
    window = (window_tokens.numel() - 1) // 2
    start = position - window + int(inside.long().argmax())
    return Example(context=context, position=position, activation=activation, tokens=window_tokens[inside].tolist(),
                   activations=window_acts[inside].tolist(), window_start=start)


def _stable_top(values: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` largest values per row; among equal values the earlier column wins."""
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    return order[:, :n]


def collect_from_batches(sae: SAE, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                         n_top: int = 20, window: int = 8) -> TopExamplesCollector:
    """Collect from ``(hook activations [b, s, d_in], token ids [b, s], keep mask or None)`` batches, with no model:
    what ``collect_top_examples`` does after its forward passes (tests, cached activations)."""
    collector = TopExamplesCollector(sae.cfg.d_sae, n_top, window, sae=sae)
    for acts, tokens, keep in batches:
        collector.add_activations(acts, tokens, keep)
    return collector


@torch.no_grad()
def collect_top_examples(loaded: Loaded, dataset: str = "python-docs", tokens: int = 65536, n_top: int = 20,
                         window: int = 8, context_size: int | None = None, batch_contexts: int = 8,
                         split: str = "train", text_column: str | None = None,
                         include_special_tokens: bool = False, progress: bool = False) -> TopExamplesCollector:
    """One pass of the model over the first ``tokens`` tokens of ``dataset`` (packed as the SAE was trained:
    metadata context size and BOS convention), collecting every feature's statistics and top examples."""
    corpus = CorpusOptions(dataset=dataset, dataset_split=split, text_column=text_column, context_size=context_size,
                           batch_contexts=batch_contexts, include_special_tokens=include_special_tokens)
    source = corpus_source(loaded, corpus, tokens)
    context_size = source.packing.context_size
    collector = TopExamplesCollector(loaded.sae.cfg.d_sae, n_top, window, sae=loaded.sae)
    batches = source.token_batches()
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=math.ceil(tokens / context_size / batch_contexts), desc="top examples",
                       unit="batch", leave=False)
    for batch in batches:
        acts = loaded.input_activations(batch)
        collector.add_activations(acts, batch, source.keep_mask(batch))
    if collector.contexts_seen == 0:
        raise ValueError(f"dataset {dataset!r} gave no complete context of {context_size} tokens")
    return collector
