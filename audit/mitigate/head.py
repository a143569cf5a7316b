"""The retrained head: a multinomial logistic regression on a frozen backbone's penultimate
features, warm-started from and anchored to the model's own head (arXiv 2312.05464 retrains
only this head, on a lambda-weighted mix of real and synthetic examples)."""

from __future__ import annotations

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
