"""The SVM core: one binary hinge-loss SVM with an unregularised intercept (libsvm's C-SVC).

Why an SVC on a Gram matrix and not ``LinearSVC``: the paper's code fits
``SVC(kernel="linear")`` (hinge loss, unregularised intercept). ``LinearSVC`` solves a
different problem (squared hinge or a penalised intercept); on the demo's sizes its best
CV scores differ from the paper's by up to 0.04, and one flipped prediction of a minority
example already moves a 2-fold balanced accuracy by ~0.01. So this package solves the same
problem with libsvm on a precomputed Gram matrix that is computed once per class and
shared by all models (the embeddings are the dataset's, not the model's), calls libsvm's
low-level binding once per fit (a sklearn ``SVC.fit`` spends ~80% of its time validating
inputs at these sizes) and predicts held-out folds with a matrix product. The low-level
binding is private to scikit-learn, so it is checked against ``SVC`` on first use and the
public ``SVC(kernel="precomputed")`` is used whenever that check fails.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

log = logging.getLogger(__name__)

_LOWLEVEL: object = None  # None: not yet checked; False: unusable; else sklearn.svm._libsvm
_LOWLEVEL_LOCK = threading.Lock()


def _fit_lowlevel(
    lib,
    data: np.ndarray,
    y: np.ndarray,
    sw: np.ndarray | None,
    C: float,
    class_weight: np.ndarray,
    tol: float,
    kernel: str,
):
    out = lib.fit(
        data,
        y,
        svm_type=0,
        kernel=kernel,
        degree=3,
        gamma=1.0,
        coef0=0.0,
        tol=tol,
        C=C,
        nu=0.5,
        epsilon=0.1,
        class_weight=class_weight,
        sample_weight=np.empty(0) if sw is None else np.ascontiguousarray(sw, np.float64),
        shrinking=1,
        probability=0,
        cache_size=200.0,
        max_iter=-1,
        random_seed=0,
    )
    # (support, support_vectors, n_class_SV, sv_coef, intercept, ...); libsvm's sign is the
    # opposite of sklearn's for two classes (sklearn flips it in BaseLibSVM.fit)
    return np.asarray(out[0]), -np.asarray(out[3])[0], -float(np.asarray(out[4])[0])


def _fit_public(data, y, sw, C, class_weight, tol, kernel):
    from sklearn.svm import SVC

    clf = SVC(
        kernel=kernel, C=C, tol=tol, class_weight={0.0: class_weight[0], 1.0: class_weight[1]}
    )
    clf.fit(data, y, sample_weight=sw)
    return clf.support_, clf.dual_coef_[0], float(clf.intercept_[0])


def _check_lowlevel():
    """sklearn's private libsvm binding, if it reproduces ``SVC`` exactly here; else False."""
    try:
        from sklearn.svm import _libsvm

        _libsvm.set_verbosity_wrap(0)
    except (ImportError, AttributeError):
        return False
    rng = np.random.default_rng(0)
    z = rng.normal(size=(40, 6))
    y = (rng.random(40) < 0.3).astype(np.float64)
    K = z @ z.T
    cw = _balanced_weights(y, None)
    try:
        for kernel, data in (("precomputed", K), ("linear", z)):
            s1, c1, b1 = _fit_lowlevel(
                _libsvm, np.ascontiguousarray(data), y, None, 0.3, cw, 1e-3, kernel
            )
            s2, c2, b2 = _fit_public(data, y, None, 0.3, cw, 1e-3, kernel)
            d1, d2 = K[:, s1] @ c1 + b1, K[:, s2] @ c2 + b2
            if not np.allclose(d1, d2, atol=1e-8):
                raise AssertionError(f"decision values differ by {np.abs(d1 - d2).max():.2e}")
    except Exception as e:  # noqa: BLE001 - any mismatch means: use the public API
        log.info("scikit-learn's low-level libsvm binding is not usable here (%s); using SVC", e)
        return False
    return _libsvm


def _svm_fit(data, y, sw, C, class_weight, tol, kernel):
    """Fit one C-SVC; returns (support row indices, signed dual coefficients, intercept)."""
    global _LOWLEVEL
    if _LOWLEVEL is None:
        with _LOWLEVEL_LOCK:
            if _LOWLEVEL is None:
                _LOWLEVEL = _check_lowlevel()
    if _LOWLEVEL is not False:
        return _fit_lowlevel(_LOWLEVEL, data, y, sw, C, class_weight, tol, kernel)
    return _fit_public(data, y, sw, C, class_weight, tol, kernel)


def _balanced_weights(y: np.ndarray, sw: np.ndarray | None) -> np.ndarray:
    """sklearn's ``class_weight='balanced'`` (total / (2 * per-class total)), weight-aware."""
    w = np.ones(len(y)) if sw is None else sw
    tot = np.array([w[y == 0].sum(), w[y == 1].sum()])
    return np.where(tot > 0, w.sum() / (2.0 * np.maximum(tot, 1e-300)), 1.0)


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray, sw: np.ndarray | None) -> float:
    w = np.ones(len(y)) if sw is None else sw
    recalls = []
    for c in (0, 1):
        m = y == c
        if w[m].sum() > 0:
            recalls.append(float((w[m] * (pred[m] == c)).sum() / w[m].sum()))
    return float(np.mean(recalls)) if recalls else float("nan")
