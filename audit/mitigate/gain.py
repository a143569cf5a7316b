"""A fix's gain on held-out examples: the paired difference of per-example correctness."""

from __future__ import annotations

import math

import numpy as np

from audit.bootstrap import bootstrap_mean_ci


def paired_gain(
    before: np.ndarray, after: np.ndarray, n_boot: int = 1000, ci: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``after - before`` (per-example correctness, 0/1) with a bootstrap interval over
    the examples (:func:`audit.bootstrap.bootstrap_mean_ci`). NaNs when there are no examples."""
    before, after = np.asarray(before, float), np.asarray(after, float)
    if len(before) == 0:
        return math.nan, math.nan, math.nan
    return bootstrap_mean_ci(after - before, n_boot=n_boot, ci=ci, seed=seed)
