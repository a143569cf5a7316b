"""Input checks and the prepared data of a directions fit: embeddings standardised with
the statistics of ``X_stats``, L2-normalised and grouped by class, with each class's Gram
matrix (shared by every model fitted on the same embeddings)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: above this many examples in a class the SVM computes dot products itself instead of a Gram matrix
GRAM_LIMIT = 6000


@dataclass
class _ClassData:
    """A class's standardised, normalised embeddings and their Gram matrix (shared by models)."""

    label: int
    index: np.ndarray  # rows of X in this class
    Z: np.ndarray  # [n, D] float64
    K: np.ndarray | None  # [n, n] or None above GRAM_LIMIT


@dataclass
class _Prepared:
    mean: np.ndarray
    scale: np.ndarray
    classes: np.ndarray
    per_class: list[_ClassData]
    n: int


def standardize(X: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(X - mean) / scale`` with rows then L2-normalised: the space directions live in."""
    Z = (np.asarray(X, np.float64) - mean) / scale
    return Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)


def _check_X(X, name: str = "X") -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(
            f"{name} must be a non-empty 2-D array of embeddings [N, D]; got shape {X.shape}"
        )
    if not np.issubdtype(X.dtype, np.number):
        raise TypeError(f"{name} must be numeric embeddings; got dtype {X.dtype}")
    if not np.isfinite(X).all():
        bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
        raise ValueError(
            f"{name} has non-finite values in {len(bad)} row(s) (first: {bad[:5].tolist()}); drop or re-embed them"
        )
    return X


def _check_correct(correct, n: int) -> np.ndarray:
    c = np.asarray(correct)
    if c.ndim not in (1, 2) or c.shape[0] != n:
        raise ValueError(
            f"correct must be [N] (one model) or [N, M] (a cluster of M models) with N={n} rows like X; got shape {c.shape}"
        )
    if c.dtype != bool:
        if not np.issubdtype(c.dtype, np.number) or not np.isin(c, (0, 1)).all():
            raise ValueError(
                "correct must hold booleans or 0/1 (1 = the model got the example right)"
            )
    c = c.astype(np.float64)
    return c[:, None] if c.ndim == 1 else c


def _prepare(X, labels, X_stats, gram_limit: int = GRAM_LIMIT) -> _Prepared:
    """Check ``X [N, D]``, ``labels [N]`` (None: one class) and ``X_stats [N', D]`` (None:
    ``X``), standardise and group by class (Gram matrices up to ``gram_limit`` rows)."""
    X = _check_X(X)
    if labels is None:
        labels = np.zeros(len(X), np.int64)
    labels = np.asarray(labels)
    if labels.shape != (len(X),):
        raise ValueError(
            f"labels must be [N] class labels with N={len(X)} like X; got shape {labels.shape}"
        )
    if X_stats is None:
        stats = X
    else:
        stats = _check_X(X_stats, "X_stats")
        if stats.shape[1] != X.shape[1]:
            raise ValueError(
                f"X_stats has {stats.shape[1]} features but X has {X.shape[1]}; both must come from one embedder"
            )
    stats = np.asarray(stats, np.float64)
    mean = stats.mean(axis=0)
    scale = stats.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    Z = standardize(X, mean, scale)
    classes = np.unique(labels)
    per = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        Zc = np.ascontiguousarray(Z[idx])
        per.append(_ClassData(c, idx, Zc, Zc @ Zc.T if len(idx) <= gram_limit else None))
    return _Prepared(mean, scale, classes, per, len(X))
