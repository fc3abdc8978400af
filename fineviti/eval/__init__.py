"""Evaluation: retrieval (short and long captions), hard negatives, zero-shot and region-level classification."""

from fineviti.eval.metrics import (
    classification_accuracy,
    hard_negative_accuracy,
    retrieval_metrics,
    retrieval_metrics_multi,
    retrieval_ranks,
)

__all__ = [
    "classification_accuracy",
    "hard_negative_accuracy",
    "retrieval_metrics",
    "retrieval_metrics_multi",
    "retrieval_ranks",
]
