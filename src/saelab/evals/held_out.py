"""Evaluating the dictionaries of a training run (or a sweep) on its held-out data, all together: the
model's clean and zero-ablated passes run once per batch for all of them, only the spliced pass per SAE."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tqdm.auto import tqdm

from saelab.data.sources import HeldOut
from saelab.evals.ground_truth import ground_truth_metrics
from saelab.evals.metrics import evaluate_activations, evaluate_many
from saelab.models.hooks import split_hook_list
from saelab.sae import SAE


def evaluate_held_out(held_out: HeldOut, saes: Sequence[tuple[SAE, str]], downstream: bool = True,
                      progress: bool = False) -> list[dict]:
    """The metrics of each ``(sae, hook name)`` on ``held_out``, in order, each with ``eval_dataset``. On the
    held-out contexts of a cache (no model) only reconstruction metrics exist; synthetic data is scored against
    its true features (evals/ground_truth.py)."""
    if held_out.synthetic is not None:
        return [{**ground_truth_metrics(sae, held_out.synthetic, held_out.tokens), "eval_dataset": held_out.description}
                for sae, _ in saes]
    if held_out.cache is not None:
        return [{**evaluate_activations(sae, _cached_batches(held_out, sae, hook)), "eval_dataset": held_out.description}
                for sae, hook in saes]
    batches = tqdm(held_out.token_batches, unit="batch", leave=False, disable=not progress,
                   desc=f"evaluating {len(saes)} SAE{'s' if len(saes) > 1 else ''}")
    results = evaluate_many(held_out.model, [(sae, held_out.hooks.get(hook, hook)) for sae, hook in saes], batches,
                            held_out.keep_mask, downstream=downstream)
    return [{**metrics, "eval_dataset": held_out.description} for metrics in results]


def _cached_batches(held_out: HeldOut, sae: SAE, hook: str):
    """The held-out contexts of the cache as (act, keep): the activations of the hooks in ``hook`` (a crosscoder's
    or CLT's, joined by +) side by side; a transcoder's (CLT's) outputs too, as (act, keep, target)."""
    def side_by_side(names: list[str]):
        readers = [held_out.cache.activations(name, held_out.cache_start) for name in names]
        for parts in zip(*readers):
            yield torch.cat([act for act, _ in parts], -1), parts[0][1]

    inputs = side_by_side(split_hook_list(hook))
    if not sae.cfg.separate_output:
        return inputs
    return ((act, keep, target) for (act, keep), (target, _) in zip(inputs, side_by_side(sae.cfg.written_hooks)))
