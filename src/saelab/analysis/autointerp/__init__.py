"""Automatic interpretability: explanations of features written by a language model (``explain``), and how
well they predict where each feature fires (``score``: detection and fuzzing, against two baselines)."""

from saelab.analysis.autointerp.backends import (Backend, CachedBackend, CallCache, ChatServer, LocalModel, Prompt,
                                                 ServerError, make_backend)
from saelab.analysis.autointerp.explain import ExplainConfig, explain, read_dashboard, results_dir, split_examples
from saelab.analysis.autointerp.prompts import Snippet, parse_explanation
from saelab.analysis.autointerp.score import ScoreConfig, binary_scores, format_summary, score

__all__ = ["Backend", "CachedBackend", "CallCache", "ChatServer", "ExplainConfig", "LocalModel", "Prompt",
           "ScoreConfig", "ServerError", "Snippet", "binary_scores", "explain", "format_summary", "make_backend",
           "parse_explanation", "read_dashboard", "results_dir", "score", "split_examples"]
