"""Which rows of a head a fit moves when the model has many classes.

A fix targets a few classes (the model's hard classes, the classes of the examples it adds);
what it changes elsewhere goes through the classes they are confused with. A fit moves those
rows only, the hard ones and their main confusions, up to a cap, and leaves the rest at the
model's own weights (:class:`~audit.mitigate.head.LinearHead`'s ``active``). Confusions are
measured on the fit split under the model's own head (never on the eval split).
"""

from __future__ import annotations

import numpy as np


def confusion_mass(proba: np.ndarray, labels: np.ndarray, cls: int) -> np.ndarray:
    """``[C]`` expected confusions between class ``cls`` and every other class under
    ``proba`` (``[N, C]`` a head's probabilities on labelled rows): the probability the head
    puts on ``j`` for rows of ``cls`` plus the probability it puts on ``cls`` for rows of
    ``j``; 0 at ``cls`` itself."""
    C = proba.shape[1]
    mass = proba[labels == cls].sum(0, dtype=np.float64)
    mass += np.bincount(labels, weights=proba[:, cls].astype(np.float64), minlength=C)[:C]
    mass[cls] = 0.0
    return mass


def active_classes(
    focus: np.ndarray, masses: dict[int, np.ndarray], cap: int, n_classes: int
) -> np.ndarray | None:
    """Sorted class indexes a fit moves: every class of ``focus``, then the main confusions of
    each (``masses[c]``, :func:`confusion_mass`), taken in turns (each class's first, then
    each one's second, ...) while their mass is positive, up to ``cap`` classes in all.
    None (every class) when ``cap`` is 0 or at least ``n_classes``. ``focus`` is kept whole
    even when it alone exceeds ``cap``."""
    if cap <= 0 or cap >= n_classes:
        return None
    focus = list(dict.fromkeys(int(c) for c in focus))
    if not focus:
        raise ValueError("a restricted fit needs at least one class to focus on")
    have = set(focus)
    ranked = {c: np.argsort(-masses[c], kind="stable") for c in focus}
    for turn in range(n_classes):
        live = [c for c in focus if masses[c][ranked[c][turn]] > 0]
        if len(have) >= cap or not live:
            break
        for c in live:
            if len(have) < cap:
                have.add(int(ranked[c][turn]))
    return np.asarray(sorted(have), np.int64)


def weakest_classes(correct: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` classes with the most errors on a split (a focus for a fit that names none)."""
    errors = np.bincount(labels[~correct], minlength=int(labels.max()) + 1)
    return np.argsort(-errors, kind="stable")[:k]
