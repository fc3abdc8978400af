"""Evaluation: retrieval (short and long captions), hard negatives, zero-shot and region-level classification.

Metrics are fractions in [0, 1]; ties count against the model (see `metrics`). `runner.evaluate` runs tasks on a
model and writes report.json / report.md; `loaders` reads the benchmarks' own formats; `checkpoint` loads either
stage's weights with a clear error on a mismatch; `fineviti eval` is the command.
"""

from fineviti.eval.checkpoint import CheckpointMismatchError, load_checkpoint
from fineviti.eval.metrics import (
    classification_accuracy,
    hard_negative_accuracy,
    retrieval_metrics,
    retrieval_metrics_multi,
    retrieval_ranks,
)
from fineviti.eval.regions import pool_boxes, region_classification
from fineviti.eval.runner import (
    EvalConfig,
    Evaluator,
    HardNegativeTask,
    RegionTask,
    RetrievalTask,
    ZeroShotTask,
    default_box_projection,
    evaluate,
    synthetic_tasks,
    task_for,
    write_report,
)
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
    "CheckpointMismatchError",
    "EvalConfig",
    "Evaluator",
    "HardNegativeTask",
    "RegionTask",
    "RetrievalTask",
    "ZeroShotTask",
    "build_classifier",
    "class_embeddings",
    "classification_accuracy",
    "default_box_projection",
    "evaluate",
    "hard_negative_accuracy",
    "load_checkpoint",
    "pool_boxes",
    "region_classification",
    "retrieval_metrics",
    "retrieval_metrics_multi",
    "retrieval_ranks",
    "synthetic_tasks",
    "task_for",
    "write_report",
    "zero_shot_accuracy",
]
