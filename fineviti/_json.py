"""Strict JSON for the files fineviti writes (metrics.jsonl, report.json): JSON has no NaN or Infinity, and strict
readers (jq, JavaScript, serde) refuse a file that holds them."""

from __future__ import annotations

import math


def finite_or_null(value):
    """`value` with NaN and infinities as None (null), in dicts, lists and tuples too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value
