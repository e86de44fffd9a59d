"""Evaluation: greedy pass@1 and sampled pass@k by difficulty level."""
from stagewise_pl.eval.evaluate import EvalResult, evaluate_problems, format_table

__all__ = ["EvalResult", "evaluate_problems", "format_table"]
