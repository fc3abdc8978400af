"""Strict JSON for the files fineviti writes (metrics.jsonl, report.json, config.json): JSON has no NaN or Infinity,
and strict readers (jq, JavaScript, serde) refuse a file that holds them."""

from __future__ import annotations

import math


def _map_floats(value, change):
    """`value` with every float passed through `change`, in dicts, lists and tuples too (tuples become lists)."""
    if isinstance(value, float):
        return change(value)
    if isinstance(value, dict):
        return {k: _map_floats(v, change) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_floats(v, change) for v in value]
    return value


def finite_or_null(value):
    """`value` with NaN and infinities as None (null): a measurement that has no value (metrics, reports)."""
    return _map_floats(value, lambda v: v if math.isfinite(v) else None)


def infinities_as_text(value):
    """`value` with infinities as the strings "inf" / "-inf": a setting meaning "no limit" (a config), which
    fineviti.train.config.from_dict reads back as the float."""
    return _map_floats(value, lambda v: ("inf" if v > 0 else "-inf") if math.isinf(v) else v)
