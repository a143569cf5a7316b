"""``FailureDirections``: the scikit-learn estimator of one model's (or cluster's) failure directions."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.base import BaseEstimator

from audit.directions.fitter import _ModeFitter, _rows

#: the C grid: 1e-6 ... 1e2, one value per decade. The paper's code stops at 1, where most
#: (model, class) pairs of the demo chose the top of the grid; two more decades make the
#: choice interior for most pairs (``C_on_edge`` in directions.parquet says when it is not).
#: Going to 1e4 moved a few more pairs inside but made libsvm's fits (and their permutation
#: tests) several times slower on the demo: 87 s against 36 s for the directions stage.
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-6, 2, 9))
STATUSES = ("ok", "not_significant", "insufficient_errors", "insufficient_correct")
#: above this many examples in a class the SVM computes dot products itself instead of a Gram matrix
GRAM_LIMIT = 6000


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
    C_on_edge: bool = (
        False  # the chosen C is the grid's smallest or largest: widen the grid that way
    )
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


class FailureDirections(BaseEstimator):
    """Per-class failure directions of one model (or a pooled cluster) in an embedding space.

    Parameters
    ----------
    Cs : the C grid (default :data:`DEFAULT_CS`, 1e-6 ... 1e2; the paper's code stops at 1).
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

    def __init__(
        self,
        Cs=None,
        cv: int = 2,
        max_modes: int = 3,
        n_permutations: int = 20,
        permutation_search: str = "best",
        alpha: float = 0.05,
        min_errors: int = 10,
        min_correct: int = 10,
        ci_level: float = 0.95,
        n_bootstrap: int = 500,
        tol: float = 1e-3,
        explained_fpr: float = 0.2,
        n_refine: int = 3,
        n_jobs: int | None = None,
        random_state: int | None = 0,
    ):
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
            raise ValueError(
                f"permutation_search must be 'best' or 'grid'; got {self.permutation_search!r}"
            )
        if not 0 < self.alpha < 1 or not 0 < self.ci_level < 1:
            raise ValueError(
                f"alpha and ci_level must lie in (0, 1); got {self.alpha!r}, {self.ci_level!r}"
            )

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
                delayed(self._fit_class)(cd, err[cd.index], i)
                for i, cd in enumerate(prep.per_class)
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
        seed = np.random.SeedSequence(
            [0 if self.random_state is None else int(self.random_state), class_pos]
        )
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
                planes = [
                    (np.flatnonzero(~is_err | (is_err & (owner == m))), C)
                    for m, (_, C) in enumerate(planes)
                ]
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
        significant = (
            not (p > self.alpha) and norm > 0
        )  # NaN (no permutations) counts as significant
        fm = FailureMode(
            int(cd.label),
            mode,
            "ok" if significant else "not_significant",
            int((e > 0).sum()),
            int((e < 1).sum()),
            cv_score=float(scores[best]),
            ci_low=lo,
            ci_high=hi,
            p_value=p,
            C=C,
            C_on_edge=len(Cs) > 1 and C in (min(Cs), max(Cs)),
            direction=(w / norm) if norm > 0 else None,
            weight_norm=norm,
            intercept=b,
            cv_scores=[float(s) for s in scores],
        )
        full_folds = np.empty(len(err), int)
        full_folds[sub] = folds
        return fm, oof[best], full_folds

    def _heldout(
        self, cd: _ClassData, sub: np.ndarray, err: np.ndarray, C: float, folds: np.ndarray
    ) -> np.ndarray:
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

            raise NotFittedError(
                "this FailureDirections is not fitted yet; call fit(X, correct, labels) first"
            )

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
