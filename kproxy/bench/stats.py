"""The figures' arithmetic: min/median/max over repetitions, percentiles of samples, ratios."""

from __future__ import annotations

import statistics
from typing import Any, Sequence

Stats = dict[str, Any]  # {"min", "median", "max", "samples"}: the document's STATS (kproxy/bench/schema.json)


def spread(values: Sequence[float]) -> Stats:
    """min / median / max of one figure over its repetitions."""
    if not values:
        raise ValueError("no samples")
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "samples": len(values)}


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (fraction 0.5 for p50, 0.99 for p99) of samples."""
    if not values:
        raise ValueError("no samples")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))]


def ratio(value: Stats, baseline: Stats) -> float | None:
    """The medians' ratio; None when the baseline's median is 0 (nothing to compare with)."""
    return value["median"] / baseline["median"] if baseline["median"] else None
