"""Evaluation: retrieval (short and long captions), hard negatives, zero-shot and region-level classification.

Metrics are fractions in [0, 1]; ties count against the model (see `metrics`).
"""

from fineviti.eval.metrics import (
    classification_accuracy,
    hard_negative_accuracy,
    retrieval_metrics,
    retrieval_metrics_multi,
    retrieval_ranks,
)
from fineviti.eval.regions import pool_boxes, region_classification
from fineviti.eval.zeroshot import (
    DEFAULT_TEMPLATES,
    SIMPLE_IMAGENET_TEMPLATES,
    build_classifier,
    class_embeddings,
    zero_shot_accuracy,
)

__all__ = [
    "DEFAULT_TEMPLATES",
    "SIMPLE_IMAGENET_TEMPLATES",
    "build_classifier",
    "class_embeddings",
    "classification_accuracy",
    "hard_negative_accuracy",
    "pool_boxes",
    "region_classification",
    "retrieval_metrics",
    "retrieval_metrics_multi",
    "retrieval_ranks",
    "zero_shot_accuracy",
]
