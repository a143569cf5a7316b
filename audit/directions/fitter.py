"""Fitting one failure mode: cross-validated C search, final fit, bootstrap CI, permutations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from sklearn.model_selection import StratifiedKFold

from audit.directions.svm import _balanced_accuracy, _balanced_weights, _svm_fit

if TYPE_CHECKING:
    from audit.directions.estimator import FailureDirections


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

    def __init__(
        self, Zp: np.ndarray, K: np.ndarray | None, est: FailureDirections, rng: np.random.Generator
    ):
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
                rec.append(
                    np.where(tot > 0, (m * (pp == c)).sum(1) / np.maximum(tot, 1e-300), np.nan)
                )
            with np.errstate(invalid="ignore"):
                total += np.nanmean(np.stack(rec), axis=0)
        boot = total / est.cv
        a = (1 - est.ci_level) / 2
        return float(np.nanquantile(boot, a)), float(np.nanquantile(boot, 1 - a))

    def p_value(
        self,
        err: np.ndarray,
        fold_of_ex: np.ndarray,
        C: float,
        observed: float,
        resolve: bool = True,
    ) -> float:
        """Permutation p-value of the CV score (sequential: stops once it cannot reach alpha,
        goes on while the draw leaves it near alpha).

        A permutation moves the error fractions across examples and carries each example's
        fold along, which keeps the folds stratified. The search stops at the first ``h``
        exceedances that already decide "not significant" and reports Besag and Clifford's
        sequential p-value ``h / permutations done``, so chance modes cost a few refits. A
        p-value within a factor of two of alpha is the Monte Carlo draw's call more than the
        data's (with 50 permutations, one exceedance more or less moves it across 0.05): the
        test goes on with twice as many permutations at a time, up to ``max_permutations``, when
        ``resolve`` (the caller's evidence that the score is above chance: its bootstrap
        interval; a chance mode's draw lands near alpha one time in eight, and resolving all
        of those was most of the directions' time at ImageNet shape).
        """
        est = self.est
        n, limit = int(est.n_permutations), est._permutation_limit()
        if not n:
            return float("nan")
        grid = [C] if est.permutation_search == "best" else list(est._Cs())
        hits = done = 0
        while True:
            h_stop = max(1, int(np.ceil(est.alpha * (n + 1))))
            while done < n and hits < h_stop:
                perm = self.rng.permutation(len(err))
                score = float(self.cv(err[perm], grid, fold_of_ex[perm])[0].max())
                hits += score >= observed - 1e-12
                done += 1
            p = hits / done if hits >= h_stop and done < n else (1 + hits) / (1 + done)
            if n >= limit or not resolve or not est.alpha / 2 < p <= 2 * est.alpha:
                return p
            n = min(limit, 2 * n)  # a chance mode near alpha leaves after a few more
