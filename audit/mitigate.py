"""Repairing a model's linear head with targeted data: estimators and selections on arrays.

arXiv 2312.05464 retrains only the classifier head on the frozen backbone's penultimate
features, on a mix of real training data and synthetic images of the failure mode
weighted ``(1 - lambda)`` real and ``lambda`` synthetic; Jain et al. add real images from a
pool selected by the failure direction, or upweight the direction-selected examples.
Everything here is pure numpy/scipy on arrays: :class:`LinearHead` fits one head (the
scikit-learn contract), the selections return indices, :func:`paired_gain` measures a
before/after difference with a bootstrap interval. The stage that wires it to a run is
:mod:`audit.pipeline.mitigate`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class LinearHead(ClassifierMixin, BaseEstimator):
    """A multinomial logistic head on fixed features, warm-started from (and anchored to) the
    model's own head::

        min_{W, b}  sum_i w_i CE(softmax(W x_i + b), y_i) / sum_i w_i  +  alpha/2 ||W - W0||^2

    ``fit(X [N, D], y [N], sample_weight, coef_init [C, D], intercept_init [C])``; without an
    init the anchor is 0 (plain L2). Solved with L-BFGS (scipy). The anchor keeps what the
    backbone and head learnt jointly, so a small targeted set moves the head only where the
    data asks it to.
    """

    def __init__(self, alpha: float = 1e-3, max_iter: int = 200, tol: float = 1e-7):
        self.alpha = alpha
        self.max_iter = max_iter
        self.tol = tol

    def fit(
        self,
        X,
        y,
        sample_weight=None,
        coef_init=None,
        intercept_init=None,
        n_classes: int | None = None,
    ):
        from scipy.optimize import minimize

        X = np.ascontiguousarray(
            X, np.float32
        )  # float32 products: half the time, ample precision for a head
        y = np.asarray(y, np.int64)
        if X.ndim != 2 or len(X) != len(y) or len(X) == 0:
            raise ValueError(f"X must be [N, D] with N = len(y) > 0; got X {X.shape}, y {y.shape}")
        C = int(n_classes or (len(coef_init) if coef_init is not None else y.max() + 1))
        if y.min() < 0 or y.max() >= C:
            raise ValueError(f"labels must be in [0, {C}); got {y.min()}..{y.max()}")
        w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, np.float64)
        if w.shape != y.shape or (w < 0).any() or w.sum() <= 0:
            raise ValueError("sample_weight must be [N], non-negative, with a positive sum")
        w = w / w.sum()
        D = X.shape[1]
        W0 = (
            np.zeros((C, D))
            if coef_init is None
            else np.asarray(coef_init, np.float64).reshape(C, D)
        )
        b0 = (
            np.zeros(C)
            if intercept_init is None
            else np.asarray(intercept_init, np.float64).reshape(C)
        )
        Y = np.zeros((len(y), C))
        Y[np.arange(len(y)), y] = 1.0

        def loss_grad(theta):
            W, b = theta[: C * D].reshape(C, D), theta[C * D :]
            Z = (X @ W.T.astype(np.float32)).astype(np.float64) + b
            Zs = Z - Z.max(axis=1, keepdims=True)
            logp = Zs - np.log(np.exp(Zs).sum(axis=1, keepdims=True))
            loss = -(w * (Y * logp).sum(1)).sum() + 0.5 * self.alpha * ((W - W0) ** 2).sum()
            G = (np.exp(logp) - Y) * w[:, None]
            GX = (X.T @ G.astype(np.float32)).T.astype(np.float64)  # X^T G: the fast memory order
            return loss, np.concatenate([(GX + self.alpha * (W - W0)).ravel(), G.sum(0)])

        res = minimize(
            loss_grad,
            np.concatenate([W0.ravel(), b0]),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": int(self.max_iter), "gtol": self.tol},
        )
        self.coef_ = res.x[: C * D].reshape(C, D)
        self.intercept_ = res.x[C * D :]
        self.classes_ = np.arange(C)
        self.n_iter_ = int(res.nit)
        return self

    def decision_function(self, X) -> np.ndarray:
        return np.asarray(X, np.float32) @ self.coef_.T.astype(np.float32) + self.intercept_

    def predict_proba(self, X) -> np.ndarray:
        return _softmax(self.decision_function(X))

    def predict(self, X) -> np.ndarray:
        return self.decision_function(X).argmax(1)


def mix_weights(n_real: int, n_added: int, lam: float) -> np.ndarray:
    """Per-example weights of ``n_real`` real then ``n_added`` added examples: the real ones
    share ``1 - lam`` and the added ones ``lam`` of the total (2312.05464's mix)."""
    if not 0.0 <= lam < 1.0:
        raise ValueError(f"lambda must be in [0, 1), got {lam}")
    if n_added == 0:
        return np.full(n_real, 1.0 / max(n_real, 1))
    return np.concatenate([np.full(n_real, (1 - lam) / n_real), np.full(n_added, lam / n_added)])


# -- selections ----------------------------------------------------------------------------
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


# -- choosing on the fit split -------------------------------------------------------------
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


# -- evaluation ----------------------------------------------------------------------------
def paired_gain(
    before: np.ndarray, after: np.ndarray, n_boot: int = 1000, ci: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``after - before`` (per-example correctness, 0/1) with a bootstrap interval over
    the examples. NaNs when there are no examples."""
    before, after = np.asarray(before, float), np.asarray(after, float)
    if len(before) == 0:
        return float("nan"), float("nan"), float("nan")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    d = after - before
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (int(n_boot), len(d)))].mean(1)
    a = (1 - ci) / 2
    return float(d.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))
