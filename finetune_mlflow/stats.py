"""Pure statistics for evaluation: latency percentiles and seeded bootstrap intervals."""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

LATENCY_PERCENTILES = (50, 90, 95, 99)


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float]:
    """`latency_ms_{mean,p50,p90,p95,p99,max}` over successful requests (linear interpolation, numpy default)."""
    if len(latencies_ms) == 0:
        return {}
    values = np.asarray(latencies_ms, dtype=float)
    summary = {"latency_ms_mean": float(values.mean()), "latency_ms_max": float(values.max())}
    for q, value in zip(LATENCY_PERCENTILES, np.percentile(values, LATENCY_PERCENTILES)):
        summary[f"latency_ms_p{q}"] = float(value)
    return summary


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float


def _resample_means(values: np.ndarray, samples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(values), size=(samples, len(values)))
    return values[index].mean(axis=1)


def bootstrap_interval(values: Sequence[float], *, samples: int = 1000, seed: int = 0,
                       confidence: float = 0.95) -> Interval:
    """Percentile bootstrap interval of the mean; same seed, same interval."""
    array = np.asarray(values, dtype=float)
    if len(array) == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    means = _resample_means(array, samples, seed)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(array.mean()), float(low), float(high))


def paired_bootstrap_delta(candidate: Sequence[float], baseline: Sequence[float], *, samples: int = 1000,
                           seed: int = 0, confidence: float = 0.95) -> Interval:
    """Interval of mean(candidate - baseline) resampling questions jointly, so shared difficulty cancels out."""
    a, b = np.asarray(candidate, dtype=float), np.asarray(baseline, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores must align: {a.shape} vs {b.shape}")
    return bootstrap_interval(a - b, samples=samples, seed=seed, confidence=confidence)


def counted_percentiles(counts: Mapping[int, int], percents: Sequence[float]) -> list[float]:
    """`np.percentile` (linear interpolation) of values held as value -> how many times it occurs: a streamed
    million lengths kept as one entry per distinct length, not one per row."""
    values = sorted(value for value, count in counts.items() if count)
    ends = list(itertools.accumulate(counts[value] for value in values))  # 1 + index of each value's last copy
    last = ends[-1] - 1 if ends else -1
    if last < 0:
        raise ValueError("no values")

    def nth(index: int) -> float:  # the index-th smallest value, counting copies
        return float(values[bisect.bisect_right(ends, index)])

    results = []
    for percent in percents:
        position = last * (percent / 100)  # numpy's virtual index for the linear method
        below = math.floor(position)
        fraction, low, high = position - below, nth(below), nth(min(below + 1, last))
        # numpy's lerp: from the nearer end, so the result is exact at either end
        results.append(high - (high - low) * (1 - fraction) if fraction >= 0.5 else low + (high - low) * fraction)
    return results
