"""The percentile bootstrap of a mean, written once (the report's family similarities, the
mitigation's paired gains, the confirmation's accuracy gaps and the benchmarks use it)."""

from __future__ import annotations

import math

import numpy as np


def bootstrap_means(values, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """``[n_boot]`` means of resamples (with replacement) of ``values [N]``, ``N >= 1``."""
    v = np.asarray(values, float)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not v.size:
        raise ValueError("bootstrap_means needs at least one value")
    rng = np.random.default_rng(seed)
    return v[rng.integers(0, v.size, (int(n_boot), v.size))].mean(axis=1)


def bootstrap_mean_ci(
    values, n_boot: int = 1000, ci: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean, low, high)`` of the finite ``values`` with a percentile bootstrap interval;
    NaN for the mean without values, NaN for the interval below 2 values (one value has no
    spread to resample)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if not v.size:
        return math.nan, math.nan, math.nan
    if v.size < 2:
        return float(v.mean()), math.nan, math.nan
    means = bootstrap_means(v, n_boot, seed)
    a = (1 - ci) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))
