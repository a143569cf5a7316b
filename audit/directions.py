"""Failure directions: where in a joint image/text space a model's errors lie.

Jain et al., "Distilling Model Failures as Directions in Latent Space" (Sections 2, A.3):
per class, standardise the embeddings with train-split statistics, L2-normalise them, and
fit a linear SVM with balanced class weights that predicts whether the model got each
example right; the regularisation ``C`` comes from a log grid by 2-fold cross-validated
balanced accuracy, and that CV score is the failure's strength. The SVM's normal vector
is the failure *direction*: negative decision values are hard, positive ones easy.

Beyond the paper, per class and mode :class:`FailureDirections` reports a bootstrap
confidence interval of the CV score, a permutation p-value (so that with many models and
classes a chance "failure mode" is not reported as real), a status instead of an
exception for classes with too few errors or correct examples, and several failure modes
per class: the errors that the directions so far do not explain (by their held-out
decision values) seed a new direction, errors are then reassigned to the direction that
explains each best (k-planes, a few rounds), and each further mode is grid-searched and
scored on the correct examples plus its own errors; the search stops at the first mode
that is not significant. Mode 0 is always the paper's direction over all errors. ``correct`` may also hold several
models' columns ``[N, M]``: the fit then pools their failures (a *collective* direction
of a cluster of models); see :func:`fit_collective`.

Why an SVC on a Gram matrix and not ``LinearSVC``: the paper's code fits
``SVC(kernel="linear")`` (hinge loss, unregularised intercept). ``LinearSVC`` solves a
different problem (squared hinge or a penalised intercept); on the demo's sizes its best
CV scores differ from the paper's by up to 0.04, and one flipped prediction of a minority
example already moves a 2-fold balanced accuracy by ~0.01. So this module solves the same
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from sklearn.base import BaseEstimator
from sklearn.model_selection import StratifiedKFold

log = logging.getLogger(__name__)

#: the C grid of the paper's code: 1e-6 ... 1
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-6, 0, 7))
STATUSES = ("ok", "not_significant", "insufficient_errors", "insufficient_correct")
#: above this many examples in a class the SVM computes dot products itself instead of a Gram matrix
GRAM_LIMIT = 6000

DIRECTIONS_SCHEMA = pa.schema(
    [
        ("scope", pa.string()),
        ("class", pa.string()),
        ("class_index", pa.int32()),
        ("mode", pa.int32()),
        ("status", pa.string()),
        ("cv_score", pa.float64()),
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("p_value", pa.float64()),
        ("n_errors", pa.int32()),
        ("n_correct", pa.int32()),
        ("C", pa.float64()),
        ("direction", pa.list_(pa.float32())),
        ("weight_norm", pa.float64()),
        ("intercept", pa.float64()),
        ("mean", pa.list_(pa.float32())),
        ("scale", pa.list_(pa.float32())),
    ]
)


# --------------------------------------------------------------------------------------
# The SVM core: one binary hinge-loss SVM with an unregularised intercept (libsvm's C-SVC)
# --------------------------------------------------------------------------------------
_LOWLEVEL: object = None  # None: not yet checked; False: unusable; else sklearn.svm._libsvm
_LOWLEVEL_LOCK = threading.Lock()


def _fit_lowlevel(lib, data: np.ndarray, y: np.ndarray, sw: np.ndarray | None, C: float,
                  class_weight: np.ndarray, tol: float, kernel: str):  # fmt: skip
    out = lib.fit(
        data, y, svm_type=0, kernel=kernel, degree=3, gamma=1.0, coef0=0.0, tol=tol, C=C,
        nu=0.5, epsilon=0.1, class_weight=class_weight,
        sample_weight=np.empty(0) if sw is None else np.ascontiguousarray(sw, np.float64),
        shrinking=1, probability=0, cache_size=200.0, max_iter=-1, random_seed=0,
    )  # fmt: skip
    # (support, support_vectors, n_class_SV, sv_coef, intercept, ...); libsvm's sign is the
    # opposite of sklearn's for two classes (sklearn flips it in BaseLibSVM.fit)
    return np.asarray(out[0]), -np.asarray(out[3])[0], -float(np.asarray(out[4])[0])


def _fit_public(data, y, sw, C, class_weight, tol, kernel):
    from sklearn.svm import SVC

    clf = SVC(kernel=kernel, C=C, tol=tol, class_weight={0.0: class_weight[0], 1.0: class_weight[1]})
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
            s1, c1, b1 = _fit_lowlevel(_libsvm, np.ascontiguousarray(data), y, None, 0.3, cw, 1e-3, kernel)
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


# --------------------------------------------------------------------------------------
# One failure mode of one class
# --------------------------------------------------------------------------------------
@dataclass
class FailureMode:
    """One direction of one class: strength, significance and the SVM that defines it.

    ``direction`` is the unit normal ``[D]`` in the standardised, normalised space; the SVM
    decision value of a standardised, normalised embedding ``z`` is
    ``weight_norm * direction @ z + intercept`` (negative: predicted error, i.e. hard).
    """

    label: int
    mode: int
    status: str
    n_errors: int
    n_correct: int
    cv_score: float = float("nan")
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    p_value: float = float("nan")
    C: float = float("nan")
    direction: np.ndarray | None = None
    weight_norm: float = float("nan")
    intercept: float = float("nan")
    cv_scores: list[float] = field(default_factory=list)

    def decision(self, z: np.ndarray) -> np.ndarray:
        if self.direction is None:
            return np.full(len(z), np.nan)
        return self.weight_norm * (np.asarray(z, np.float64) @ self.direction) + self.intercept


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
        raise ValueError(f"{name} must be a non-empty 2-D array of embeddings [N, D]; got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.number):
        raise TypeError(f"{name} must be numeric embeddings; got dtype {X.dtype}")
    if not np.isfinite(X).all():
        bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
        raise ValueError(f"{name} has non-finite values in {len(bad)} row(s) (first: {bad[:5].tolist()}); drop or re-embed them")
    return X


def _check_correct(correct, n: int) -> np.ndarray:
    c = np.asarray(correct)
    if c.ndim not in (1, 2) or c.shape[0] != n:
        raise ValueError(
            f"correct must be [N] (one model) or [N, M] (a cluster of M models) with N={n} rows like X; got shape {c.shape}"
        )
    if c.dtype != bool:
        if not np.issubdtype(c.dtype, np.number) or not np.isin(c, (0, 1)).all():
            raise ValueError("correct must hold booleans or 0/1 (1 = the model got the example right)")
    c = c.astype(np.float64)
    return c[:, None] if c.ndim == 1 else c


def _prepare(X, labels, X_stats, gram_limit: int = GRAM_LIMIT) -> _Prepared:
    X = _check_X(X)
    if labels is None:
        labels = np.zeros(len(X), np.int64)
    labels = np.asarray(labels)
    if labels.shape != (len(X),):
        raise ValueError(f"labels must be [N] class labels with N={len(X)} like X; got shape {labels.shape}")
    if X_stats is None:
        stats = X
    else:
        stats = _check_X(X_stats, "X_stats")
        if stats.shape[1] != X.shape[1]:
            raise ValueError(f"X_stats has {stats.shape[1]} features but X has {X.shape[1]}; both must come from one embedder")
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


def _rows(err: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per example error fraction ``err [n]`` -> training rows (example, y, weight).

    One model: one row per example, y = 1 if correct, no weights. Several: an example that
    some models get wrong and others right gives an error row and a correct row, weighted
    by the fractions, which is the pooled set of all models' rows up to a factor M.
    """
    if np.isin(err, (0.0, 1.0)).all():
        return np.arange(len(err)), (err == 0).astype(np.float64), None
    ex_e = np.flatnonzero(err > 0)
    ex_c = np.flatnonzero(err < 1)
    ex = np.concatenate([ex_e, ex_c])
    y = np.concatenate([np.zeros(len(ex_e)), np.ones(len(ex_c))])
    w = np.concatenate([err[ex_e], 1 - err[ex_c]])
    order = np.argsort(ex, kind="stable")
    return ex[order], y[order], w[order]


class _ModeFitter:
    """Cross-validated grid search, final fit, bootstrap CI and permutations for one mode."""

    def __init__(self, Zp: np.ndarray, K: np.ndarray | None, est: FailureDirections, rng: np.random.Generator):
        self.Zp, self.K, self.est, self.rng = Zp, K, est, rng
        self.kernel = "precomputed" if K is not None else "linear"

    def _train_data(self, ex: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.K[np.ix_(ex, ex)] if self.K is not None else self.Zp[ex])

    def fit_one(self, ex, y, sw, C, data=None):
        """One SVM on rows (example ``ex``, label ``y``, weight ``sw``): direction ``w [D]``, intercept."""
        data = self._train_data(ex) if data is None else data
        sup, coef, b = _svm_fit(data, y, sw, C, _balanced_weights(y, sw), self.est.tol, self.kernel)
        return coef @ self.Zp[ex[sup]], b

    def folds(self, err: np.ndarray) -> np.ndarray:
        """Fold of each example: StratifiedKFold on the (majority) label, as cross_val_score splits."""
        fold = np.empty(len(err), int)
        skf = StratifiedKFold(n_splits=self.est.cv)
        for f, (_, te) in enumerate(skf.split(np.zeros((len(err), 1)), (err < 0.5).astype(int))):
            fold[te] = f
        return fold

    def cv(self, err: np.ndarray, Cs: Sequence[float], fold_of_ex: np.ndarray | None = None):
        """Mean fold balanced accuracy per C ``[len(Cs)]``, held-out decisions ``[len(Cs), n]``, rows."""
        ex, y, sw = _rows(err)
        fold_of_ex = self.folds(err) if fold_of_ex is None else fold_of_ex
        fold_of_row = fold_of_ex[ex]
        scores = np.zeros((len(Cs), self.est.cv))
        oof = np.zeros((len(Cs), len(err)))
        for f in range(self.est.cv):
            tr, te = fold_of_row != f, fold_of_row == f
            te_ex = np.flatnonzero(fold_of_ex == f)
            ex_tr, y_tr, sw_tr = ex[tr], y[tr], None if sw is None else sw[tr]
            data = self._train_data(ex_tr)  # shared by every C of this fold
            Z_te = self.Zp[te_ex]
            for k, C in enumerate(Cs):
                w, b = self.fit_one(ex_tr, y_tr, sw_tr, C, data)
                oof[k, te_ex] = Z_te @ w + b
                pred = (oof[k, ex[te]] >= 0).astype(float)
                scores[k, f] = _balanced_accuracy(y[te], pred, None if sw is None else sw[te])
        return scores.mean(axis=1), oof, (ex, y, sw, fold_of_row)

    def bootstrap_ci(self, rows, oof_ex: np.ndarray) -> tuple[float, float]:
        """Percentile interval of the CV score, resampling held-out predictions within folds."""
        est = self.est
        if not est.n_bootstrap:
            return float("nan"), float("nan")
        ex, y, sw, fold_of_row = rows
        pred = (oof_ex[ex] >= 0).astype(float)
        w = np.ones(len(ex)) if sw is None else sw
        total = np.zeros(est.n_bootstrap)
        for f in range(est.cv):
            r = np.flatnonzero(fold_of_row == f)
            pick = r[self.rng.integers(0, len(r), size=(est.n_bootstrap, len(r)))]
            yy, pp, ww = y[pick], pred[pick], w[pick]
            rec = []
            for c in (0, 1):
                m = ww * (yy == c)
                tot = m.sum(1)
                rec.append(np.where(tot > 0, (m * (pp == c)).sum(1) / np.maximum(tot, 1e-300), np.nan))
            with np.errstate(invalid="ignore"):
                total += np.nanmean(np.stack(rec), axis=0)
        boot = total / est.cv
        a = (1 - est.ci_level) / 2
        return float(np.nanquantile(boot, a)), float(np.nanquantile(boot, 1 - a))

    def p_value(self, err: np.ndarray, fold_of_ex: np.ndarray, C: float, observed: float) -> float:
        """Permutation p-value of the CV score (sequential: stops once it cannot reach alpha).

        A permutation moves the error fractions across examples and carries each example's
        fold along, which keeps the folds stratified. The search stops at the first ``h``
        exceedances that already decide "not significant" and reports Besag and Clifford's
        sequential p-value ``h / permutations done``, so chance modes cost a few refits.
        """
        est = self.est
        n = int(est.n_permutations)
        if not n:
            return float("nan")
        grid = [C] if est.permutation_search == "best" else list(est._Cs())
        h_stop = max(1, int(np.ceil(est.alpha * (n + 1))))
        hits = 0
        for done in range(1, n + 1):
            perm = self.rng.permutation(len(err))
            score = float(self.cv(err[perm], grid, fold_of_ex[perm])[0].max())
            hits += score >= observed - 1e-12
            if hits >= h_stop and done < n:
                return hits / done
        return (1 + hits) / (1 + n)


class FailureDirections(BaseEstimator):
    """Per-class failure directions of one model (or a pooled cluster) in an embedding space.

    Parameters
    ----------
    Cs : the C grid (default :data:`DEFAULT_CS`, 1e-6 ... 1 as in the paper's code).
    cv : folds of the cross-validation that picks C and scores the direction (paper: 2).
    max_modes : at most this many directions per class.
    n_permutations : label permutations for the p-value (0: no p-value, every fit is "ok").
    permutation_search : ``"best"`` refits each permutation at the chosen C only (cheap,
        slightly optimistic because the observed score is a maximum over the grid);
        ``"grid"`` repeats the whole grid search per permutation (exact, ``len(Cs)`` x dearer).
    alpha : a mode whose p-value exceeds this is ``not_significant`` and ends the search.
    min_errors, min_correct : fewer (examples) than this gives a status, not a fit.
    ci_level, n_bootstrap : the bootstrap interval of the CV score (over held-out predictions).
    tol : libsvm's stopping tolerance (``SVC``'s default, as in the paper's code).
    explained_fpr : an error counts as explained by a direction when its held-out decision
        is below this quantile of the correct examples' (and below 0); unexplained errors
        seed the next mode.
    n_refine : rounds of reassigning errors to the direction that explains each best
        (k-planes) before a further mode is scored.
    n_jobs : threads over classes (libsvm releases the GIL).
    random_state : seeds permutations and bootstrap.

    Fitted attributes: ``classes_``, ``mean_``, ``scale_`` (standardisation, ``[D]``),
    ``n_features_in_``, ``modes_`` (list of :class:`FailureMode`, class-major),
    ``coef_`` ``[n_classes, max_modes, D]`` and ``intercept_`` ``[n_classes, max_modes]``
    (NaN where a class has no such mode), ``cv_score_`` and ``p_value_`` ``[n_classes]`` of
    the first mode.
    """

    def __init__(self, Cs=None, cv: int = 2, max_modes: int = 3, n_permutations: int = 20,
                 permutation_search: str = "best", alpha: float = 0.05, min_errors: int = 10,
                 min_correct: int = 10, ci_level: float = 0.95, n_bootstrap: int = 500,
                 tol: float = 1e-3, explained_fpr: float = 0.2, n_refine: int = 3,
                 n_jobs: int | None = None,
                 random_state: int | None = 0):  # fmt: skip
        self.Cs = Cs
        self.cv = cv
        self.max_modes = max_modes
        self.n_permutations = n_permutations
        self.permutation_search = permutation_search
        self.alpha = alpha
        self.min_errors = min_errors
        self.min_correct = min_correct
        self.ci_level = ci_level
        self.n_bootstrap = n_bootstrap
        self.tol = tol
        self.explained_fpr = explained_fpr
        self.n_refine = n_refine
        self.n_jobs = n_jobs
        self.random_state = random_state

    # -- parameters ----------------------------------------------------------------------
    def _Cs(self) -> tuple[float, ...]:
        return DEFAULT_CS if self.Cs is None else tuple(float(c) for c in np.ravel(self.Cs))

    def _check_params(self) -> None:
        Cs = self._Cs()
        if not Cs or min(Cs) <= 0:
            raise ValueError(f"Cs must be a non-empty list of positive numbers; got {self.Cs!r}")
        if int(self.cv) != self.cv or self.cv < 2:
            raise ValueError(f"cv must be an integer >= 2; got {self.cv!r}")
        if int(self.max_modes) != self.max_modes or self.max_modes < 1:
            raise ValueError(f"max_modes must be an integer >= 1; got {self.max_modes!r}")
        if self.n_permutations < 0 or self.n_bootstrap < 0:
            raise ValueError("n_permutations and n_bootstrap must be >= 0")
        if self.permutation_search not in ("best", "grid"):
            raise ValueError(f"permutation_search must be 'best' or 'grid'; got {self.permutation_search!r}")
        if not 0 < self.alpha < 1 or not 0 < self.ci_level < 1:
            raise ValueError(f"alpha and ci_level must lie in (0, 1); got {self.alpha!r}, {self.ci_level!r}")

    # -- fitting -------------------------------------------------------------------------
    def fit(self, X, correct, labels=None, X_stats=None):
        """Fit directions.

        X : ``[N, D]`` embeddings of the examples the model was evaluated on (debug split).
        correct : ``[N]`` bool (1 = right), or ``[N, M]`` for the pooled failures of M models.
        labels : ``[N]`` class labels (None: one class).
        X_stats : ``[N', D]`` embeddings whose mean and scale standardise (the paper uses the
            train split's); default ``X``.
        """
        self._check_params()
        prep = _prepare(X, labels, X_stats)
        return self._fit_prepared(prep, _check_correct(correct, prep.n))

    def _fit_prepared(self, prep: _Prepared, correct: np.ndarray):
        self._check_params()
        if correct.shape[0] != prep.n:
            raise ValueError(f"correct has {correct.shape[0]} rows; X has {prep.n}")
        err = 1.0 - correct.mean(axis=1)  # fraction of the models that got each example wrong
        n_jobs = self.n_jobs if self.n_jobs not in (None, 0) else 1
        if n_jobs == 1 or len(prep.per_class) == 1:
            per = [self._fit_class(cd, err[cd.index], i) for i, cd in enumerate(prep.per_class)]
        else:
            from joblib import Parallel, delayed

            per = Parallel(n_jobs=n_jobs, prefer="threads")(
                delayed(self._fit_class)(cd, err[cd.index], i) for i, cd in enumerate(prep.per_class)
            )
        D = prep.mean.shape[0]
        self.classes_ = prep.classes
        self.mean_ = prep.mean
        self.scale_ = prep.scale
        self.n_features_in_ = D
        self.modes_ = [m for modes in per for m in modes]
        self.coef_ = np.full((len(prep.classes), self.max_modes, D), np.nan)
        self.intercept_ = np.full((len(prep.classes), self.max_modes), np.nan)
        self.cv_score_ = np.full(len(prep.classes), np.nan)
        self.p_value_ = np.full(len(prep.classes), np.nan)
        for ci, modes in enumerate(per):
            for m in modes:
                if m.direction is not None:
                    self.coef_[ci, m.mode] = m.weight_norm * m.direction
                    self.intercept_[ci, m.mode] = m.intercept
            self.cv_score_[ci] = modes[0].cv_score
            self.p_value_[ci] = modes[0].p_value
        return self

    def _fit_class(self, cd: _ClassData, err: np.ndarray, class_pos: int) -> list[FailureMode]:
        seed = np.random.SeedSequence([0 if self.random_state is None else int(self.random_state), class_pos])
        rng = np.random.default_rng(seed)
        min_err, min_cor = max(int(self.min_errors), self.cv), max(int(self.min_correct), self.cv)
        n_err, n_cor = int((err > 0).sum()), int((err < 1).sum())
        if n_err < min_err or n_cor < min_cor:
            status = "insufficient_errors" if n_err < min_err else "insufficient_correct"
            return [FailureMode(int(cd.label), 0, status, n_err, n_cor)]
        everyone = np.arange(len(err))
        fm, oof0, folds = self._fit_mode(cd, everyone, err, 0, rng)
        modes = [fm]
        if fm.status != "ok" or self.max_modes == 1:
            return modes
        # Further modes: errors the directions so far do not explain seed a new direction;
        # then errors are reassigned to the direction that explains each best (k-planes),
        # so each mode is fitted on the correct examples and its own errors only.
        is_err = err > 0
        planes = [(everyone, fm.C)]
        heldout = [self._heldout(cd, everyone, err, fm.C, folds)]
        for mode in range(1, int(self.max_modes)):
            unexplained = is_err.copy()
            for dec in heldout:
                cut = min(0.0, float(np.quantile(dec[err < 1], self.explained_fpr)))
                unexplained &= dec >= cut
            if unexplained.sum() < min_err:
                break
            planes.append((np.flatnonzero(~is_err | unexplained), planes[0][1]))
            heldout.append(self._heldout(cd, planes[-1][0], err, planes[-1][1], folds))
            for _ in range(self.n_refine):
                owner = np.argmin(np.stack(heldout), axis=0)
                planes = [(np.flatnonzero(~is_err | (is_err & (owner == m))), C) for m, (_, C) in enumerate(planes)]
                heldout = [self._heldout(cd, sub, err, C, folds) for sub, C in planes]
            owner = np.argmin(np.stack(heldout), axis=0)
            sub = np.flatnonzero(~is_err | (owner == mode))
            if int(is_err[sub].sum()) < min_err:
                break
            fm, _, _ = self._fit_mode(cd, sub, err, mode, rng)
            modes.append(fm)
            if fm.status != "ok":
                break
            planes[-1] = (sub, fm.C)
            heldout[-1] = self._heldout(cd, sub, err, fm.C, folds)
        return modes

    def _fit_mode(self, cd: _ClassData, sub: np.ndarray, err: np.ndarray, mode: int, rng):
        """Grid-searched SVM on the class's examples ``sub``; (mode, held-out decisions, folds)."""
        e = err[sub]
        K = None if cd.K is None else (cd.K if len(sub) == len(err) else cd.K[np.ix_(sub, sub)])
        fitter = _ModeFitter(cd.Z[sub], K, self, rng)
        Cs = self._Cs()
        folds = fitter.folds(e)
        scores, oof, rows = fitter.cv(e, Cs, folds)
        best = int(np.argmax(scores))  # the first maximum, as the paper's strict '>' loop
        C = Cs[best]
        ex, y, sw, _ = rows
        w, b = fitter.fit_one(ex, y, sw, C)
        norm = float(np.linalg.norm(w))
        lo, hi = fitter.bootstrap_ci(rows, oof[best])
        p = fitter.p_value(e, folds, C, float(scores[best]))
        significant = not (p > self.alpha) and norm > 0  # NaN (no permutations) counts as significant
        fm = FailureMode(
            int(cd.label), mode, "ok" if significant else "not_significant",
            int((e > 0).sum()), int((e < 1).sum()),
            cv_score=float(scores[best]), ci_low=lo, ci_high=hi, p_value=p, C=C,
            direction=(w / norm) if norm > 0 else None, weight_norm=norm, intercept=b,
            cv_scores=[float(s) for s in scores],
        )  # fmt: skip
        full_folds = np.empty(len(err), int)
        full_folds[sub] = folds
        return fm, oof[best], full_folds

    def _heldout(self, cd: _ClassData, sub: np.ndarray, err: np.ndarray, C: float, folds: np.ndarray) -> np.ndarray:
        """Held-out signed distance ``[n]`` of every example to an SVM trained on ``sub`` (2-fold cross-fit)."""
        out = np.zeros(len(err))
        fitter = _ModeFitter(cd.Z, cd.K, self, None)
        for f in range(self.cv):
            tr = sub[folds[sub] != f]
            ex, y, sw = _rows(err[tr])
            if len(np.unique(y)) < 2:
                continue
            w, b = fitter.fit_one(tr[ex], y, sw, C)
            te = np.flatnonzero(folds == f)
            out[te] = (cd.Z[te] @ w + b) / max(float(np.linalg.norm(w)), 1e-12)
        return out

    # -- using a fit ---------------------------------------------------------------------
    def _check_fitted(self):
        if not hasattr(self, "modes_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("this FailureDirections is not fitted yet; call fit(X, correct, labels) first")

    def transform_embeddings(self, X) -> np.ndarray:
        """``[N, D]`` embeddings -> the standardised, L2-normalised space of the directions."""
        self._check_fitted()
        X = _check_X(X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features; this fit has {self.n_features_in_}")
        return standardize(X, self.mean_, self.scale_)

    def mode(self, label, mode: int = 0) -> FailureMode | None:
        """The fitted :class:`FailureMode` of a class (None if there is no such mode)."""
        self._check_fitted()
        for m in self.modes_:
            if m.label == label and m.mode == mode:
                return m
        return None

    def decision_function(self, X, labels=None, mode: int = 0) -> np.ndarray:
        """SVM decision value of each row under its class's direction ``mode``: ``[N]``.

        Negative = predicted error (hard), positive = easy; NaN where the class has no such
        direction (too few errors, or an unseen class).
        """
        self._check_fitted()
        Z = self.transform_embeddings(X)
        labels = np.full(len(Z), self.classes_[0]) if labels is None else np.asarray(labels)
        if labels.shape != (len(Z),):
            raise ValueError(f"labels must be [N] with N={len(Z)}; got shape {labels.shape}")
        if not 0 <= mode < self.max_modes:
            raise ValueError(f"mode must be in [0, {self.max_modes}); got {mode}")
        out = np.full(len(Z), np.nan)
        for ci, c in enumerate(self.classes_):
            m = labels == c
            if m.any() and np.isfinite(self.intercept_[ci, mode]):
                out[m] = Z[m] @ self.coef_[ci, mode] + self.intercept_[ci, mode]
        return out

    def predict(self, X, labels=None, mode: int = 0) -> np.ndarray:
        """1 where the direction predicts the model is right, 0 where wrong (NaN decision -> 1)."""
        return (~(self.decision_function(X, labels, mode) < 0)).astype(int)


# --------------------------------------------------------------------------------------
# Many models, clusters, similarity, tables
# --------------------------------------------------------------------------------------
def _correct_matrix(correct_by_model: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    if not correct_by_model:
        raise ValueError("correct_by_model is empty; pass {model name: correct [N]} for at least one model")
    return {name: _check_correct(c, n) for name, c in correct_by_model.items()}


def fit_directions(X, correct_by_model: Mapping[str, np.ndarray], labels=None, *, X_stats=None,
                   estimator: FailureDirections | None = None, n_jobs: int | None = None
                   ) -> dict[str, FailureDirections]:  # fmt: skip
    """One :class:`FailureDirections` per model on shared embeddings ``X [N, D]``.

    The standardisation and each class's Gram matrix are computed once for all models.
    ``n_jobs`` threads run models in parallel. Returns ``{model: fitted estimator}``.
    """
    from sklearn.base import clone

    template = estimator if estimator is not None else FailureDirections()
    prep = _prepare(X, labels, X_stats)
    mats = _correct_matrix(correct_by_model, prep.n)

    def one(c):
        return clone(template).set_params(n_jobs=1)._fit_prepared(prep, c)

    if n_jobs in (None, 0, 1) or len(mats) == 1:
        fitted = [one(c) for c in mats.values()]
    else:
        from joblib import Parallel, delayed

        fitted = Parallel(n_jobs=n_jobs, prefer="threads")(delayed(one)(c) for c in mats.values())
    return dict(zip(mats, fitted, strict=True))


def fit_collective(X, correct_by_model: Mapping[str, np.ndarray], clusters: Mapping[str, Sequence[str]],
                   labels=None, *, X_stats=None, estimator: FailureDirections | None = None
                   ) -> dict[str, FailureDirections]:  # fmt: skip
    """Directions of each cluster's pooled failures: ``{"cluster:<id>": fitted estimator}``.

    ``clusters`` maps a cluster id to its member models (e.g. from ``clusters.parquet``);
    members without a ``correct`` vector are skipped with a warning, empty clusters too.
    """
    from sklearn.base import clone

    template = estimator if estimator is not None else FailureDirections()
    prep = _prepare(X, labels, X_stats)
    mats = _correct_matrix(correct_by_model, prep.n)
    out = {}
    for cid, members in clusters.items():
        missing = [m for m in members if m not in mats]
        if missing:
            log.warning("cluster %s: no predictions for %s; pooling the others", cid, missing)
        have = [mats[m] for m in members if m in mats]
        if not have:
            log.warning("cluster %s has no member with predictions; skipped", cid)
            continue
        out[f"cluster:{cid}"] = clone(template)._fit_prepared(prep, np.concatenate(have, axis=1))
    return out


def clusters_from_table(table: pa.Table) -> dict[str, list[str]]:
    """``clusters.parquet`` (model, family, cluster) -> ``{cluster id: [models]}``."""
    if "model" not in table.column_names or "cluster" not in table.column_names:
        raise ValueError(f"a clusters table needs columns model and cluster; got {table.column_names}")
    out: dict[str, list[str]] = {}
    for m, c in zip(table["model"].to_pylist(), table["cluster"].to_pylist(), strict=True):
        out.setdefault(str(c), []).append(str(m))
    return out


def directions_table(fitted: Mapping[str, FailureDirections], class_names: Sequence[str] | None = None) -> pa.Table:
    """The ``directions.parquet`` rows: one per scope x class x mode (schema :data:`DIRECTIONS_SCHEMA`).

    ``fitted`` maps a scope (model name or ``"cluster:<id>"``) to a fitted estimator;
    ``class_names[label]`` names the classes (default: the label as a string). Rows without a
    direction (insufficient data) have null direction, weight_norm and intercept.
    """
    rows = []
    for scope, est in fitted.items():
        est._check_fitted()
        mean = est.mean_.astype(np.float32).tolist()
        scale = est.scale_.astype(np.float32).tolist()
        for m in est.modes_:
            name = str(class_names[int(m.label)]) if class_names is not None else str(m.label)
            has = m.direction is not None
            rows.append({
                "scope": str(scope), "class": name, "class_index": int(m.label), "mode": m.mode,
                "status": m.status, "cv_score": m.cv_score, "ci_low": m.ci_low, "ci_high": m.ci_high,
                "p_value": m.p_value, "n_errors": m.n_errors, "n_correct": m.n_correct, "C": m.C,
                "direction": m.direction.astype(np.float32).tolist() if has else None,
                "weight_norm": m.weight_norm if has else None, "intercept": m.intercept if has else None,
                "mean": mean, "scale": scale,
            })  # fmt: skip
    return pa.Table.from_pylist(rows, schema=DIRECTIONS_SCHEMA)


def decision_from_row(row: Mapping, X) -> np.ndarray:
    """Decision values ``[N]`` of embeddings ``X [N, D]`` under one ``directions.parquet`` row."""
    if row.get("direction") is None:
        return np.full(len(X), np.nan)
    Z = standardize(_check_X(X), np.asarray(row["mean"], np.float64), np.asarray(row["scale"], np.float64))
    return float(row["weight_norm"]) * (Z @ np.asarray(row["direction"], np.float64)) + float(row["intercept"])


def direction_similarity(directions: pa.Table, mode: int = 0, scopes: Sequence[str] | None = None) -> pa.Table:
    """Cosine similarity between scopes' directions for the same class and mode.

    Rows (class, mode, scope_a, scope_b, cosine) for every unordered pair a < b of scopes that
    both have a direction; high values across a family mean a shared failure mode.
    """
    by_class: dict[str, list[tuple[str, np.ndarray]]] = {}
    for r in directions.to_pylist():
        if r["mode"] != mode or r["direction"] is None or (scopes is not None and r["scope"] not in scopes):
            continue
        by_class.setdefault(r["class"], []).append((r["scope"], np.asarray(r["direction"], np.float64)))
    out = {"class": [], "mode": [], "scope_a": [], "scope_b": [], "cosine": []}
    for cls, items in by_class.items():
        items.sort(key=lambda t: t[0])
        if len(items) < 2:
            continue
        V = np.stack([v / max(np.linalg.norm(v), 1e-12) for _, v in items])
        S = V @ V.T
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                out["class"].append(cls)
                out["mode"].append(mode)
                out["scope_a"].append(items[i][0])
                out["scope_b"].append(items[j][0])
                out["cosine"].append(float(S[i, j]))
    return pa.table(
        out,
        schema=pa.schema([("class", pa.string()), ("mode", pa.int32()), ("scope_a", pa.string()),
                          ("scope_b", pa.string()), ("cosine", pa.float64())]),
    )  # fmt: skip
