"""Evaluation: the field's SAE metrics on held-out text, splicing an SAE into a forward pass, and the
report ``saelab eval`` writes."""

from saelab.evals.metrics import DOWNSTREAM_KEYS, METRIC_KEYS, evaluate, evaluate_many, splice, zero_ablate
from saelab.evals.report import format_table, write_report
from saelab.evals.run import EvalConfig, EvalResult, default_report_dir, run_eval

__all__ = ["DOWNSTREAM_KEYS", "METRIC_KEYS", "EvalConfig", "EvalResult", "default_report_dir", "evaluate",
           "evaluate_many", "format_table", "run_eval", "splice", "write_report", "zero_ablate"]
