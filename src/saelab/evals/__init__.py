"""Evaluation: the field's SAE metrics on held-out text, and splicing an SAE into a forward pass."""

from saelab.evals.metrics import evaluate, splice, zero_ablate

__all__ = ["evaluate", "splice", "zero_ablate"]
