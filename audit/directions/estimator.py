"""``FailureDirections``: the scikit-learn estimator of one model's (or cluster's) failure directions."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator

from audit.directions.inputs import (  # noqa: F401  (re-exported: imported from here)
    GRAM_LIMIT,
    _check_correct,
    _check_X,
    _ClassData,
    _prepare,
    _Prepared,
    standardize,
)
from audit.directions.modes import FailureMode, _fit_class

#: the C grid: 1e-6 ... 1e2, one value per decade. The paper's code stops at 1, where most
#: (model, class) pairs of the demo chose the top of the grid; two more decades make the
#: choice interior for most pairs (``C_on_edge`` in directions.parquet says when it is not).
#: Going to 1e4 moved a few more pairs inside but made libsvm's fits (and their permutation
#: tests) several times slower on the demo: 87 s against 36 s for the directions stage.
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-6, 2, 9))
STATUSES = ("ok", "not_significant", "insufficient_errors", "insufficient_correct")


class FailureDirections(BaseEstimator):
    """Per-class failure directions of one model (or a pooled cluster) in an embedding space.

    Parameters
    ----------
    Cs : the C grid (default :data:`DEFAULT_CS`, 1e-6 ... 1e2; the paper's code stops at 1).
    cv : folds of the cross-validation that picks C and scores the direction (paper: 2).
    max_modes : at most this many directions per class.
    n_permutations : label permutations for the p-value (0: no p-value, every fit is "ok").
    max_permutations : a p-value that ``n_permutations`` leave within a factor of two of
        ``alpha``, of a mode whose bootstrap interval lies above 0.5, is resolved with more,
        twice as many at a time, up to this many (None: 16 x ``n_permutations``; at 50,
        two chance exceedances decide p = 0.059 for a mode whose p is 0.003 at 1,000). Clear
        cases, and chance modes whose draw lands near alpha, cost no more.
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
        max_permutations: int | None = None,
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
        self.max_permutations = max_permutations
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
        if self.max_permutations is not None and self.max_permutations < 0:
            raise ValueError(f"max_permutations must be >= 0; got {self.max_permutations!r}")
        if self.permutation_search not in ("best", "grid"):
            raise ValueError(
                f"permutation_search must be 'best' or 'grid'; got {self.permutation_search!r}"
            )
        if not 0 < self.alpha < 1 or not 0 < self.ci_level < 1:
            raise ValueError(
                f"alpha and ci_level must lie in (0, 1); got {self.alpha!r}, {self.ci_level!r}"
            )

    def _permutation_limit(self) -> int:
        n = int(self.n_permutations)
        return max(n, 16 * n if self.max_permutations is None else int(self.max_permutations))

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
            per = [_fit_class(self, cd, err[cd.index], i) for i, cd in enumerate(prep.per_class)]
        else:
            from joblib import Parallel, delayed

            per = Parallel(n_jobs=n_jobs, prefer="threads")(
                delayed(_fit_class)(self, cd, err[cd.index], i)
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
