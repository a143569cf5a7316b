"""Which examples to add and which candidate to keep: selections return indices, and
:func:`choose` picks a candidate on the fit split (never on the evaluation split)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def select_lowest(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` lowest scores (stable: ties by position)."""
    return np.argsort(np.asarray(scores), kind="stable")[: max(0, int(k))]


def stratified_subsample(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``n`` examples, each class keeping its share (all when fewer)."""
    labels = np.asarray(labels)
    if n <= 0 or len(labels) <= n:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(
            rng.choice(idx, size=max(1, int(round(n * len(idx) / len(labels)))), replace=False)
        )
    return np.sort(np.concatenate(keep))


def select_random(n: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(int(k), n), replace=False))


def choose(
    candidates: Sequence,
    score: Callable[[object], tuple[float, float]],
    baseline_overall: float,
    max_drop: float = 0.005,
) -> tuple[object, list[tuple]]:
    """The candidate with the best hard-subpopulation accuracy among those whose overall
    accuracy stays within ``max_drop`` of ``baseline_overall`` (all scored on the *fit*
    split, never on the evaluation split); the first candidate wins ties, and when none
    keeps the overall accuracy the one that drops it least. ``score(c) -> (hard, overall)``.
    Returns the choice and every ``(candidate, hard, overall)`` tried."""
    tried = [(c, *score(c)) for c in candidates]
    ok = [t for t in tried if t[2] >= baseline_overall - max_drop]
    best = max(ok, key=lambda t: t[1]) if ok else max(tried, key=lambda t: (t[2], t[1]))
    return best[0], tried
