"""A class's failure modes: mode 0 is the paper's direction over all the class's errors;
each further mode is seeded by the errors the earlier ones do not explain and refined by
reassigning errors to the direction that explains each best (k-planes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from audit.directions.fitter import _ModeFitter, _rows
from audit.directions.inputs import _ClassData

if TYPE_CHECKING:
    from audit.directions.estimator import FailureDirections


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


def _fit_class(
    est: FailureDirections, cd: _ClassData, err: np.ndarray, class_pos: int
) -> list[FailureMode]:
    """The modes of one class (``err [n]``: the fraction of models wrong on each example):
    mode 0 over all errors, then up to ``max_modes - 1`` more while they stay significant; a
    single mode with a status when the class has too few errors or correct examples."""
    seed = np.random.SeedSequence(
        [0 if est.random_state is None else int(est.random_state), class_pos]
    )
    rng = np.random.default_rng(seed)
    min_err, min_cor = max(int(est.min_errors), est.cv), max(int(est.min_correct), est.cv)
    n_err, n_cor = int((err > 0).sum()), int((err < 1).sum())
    if n_err < min_err or n_cor < min_cor:
        status = "insufficient_errors" if n_err < min_err else "insufficient_correct"
        return [FailureMode(int(cd.label), 0, status, n_err, n_cor)]
    everyone = np.arange(len(err))
    fm, oof0, folds = _fit_mode(est, cd, everyone, err, 0, rng)
    modes = [fm]
    if fm.status != "ok" or est.max_modes == 1:
        return modes
    # Further modes: errors the directions so far do not explain seed a new direction;
    # then errors are reassigned to the direction that explains each best (k-planes),
    # so each mode is fitted on the correct examples and its own errors only.
    is_err = err > 0
    planes = [(everyone, fm.C)]
    heldout = [_heldout(est, cd, everyone, err, fm.C, folds)]
    for mode in range(1, int(est.max_modes)):
        unexplained = is_err.copy()
        for dec in heldout:
            cut = min(0.0, float(np.quantile(dec[err < 1], est.explained_fpr)))
            unexplained &= dec >= cut
        if unexplained.sum() < min_err:
            break
        planes.append((np.flatnonzero(~is_err | unexplained), planes[0][1]))
        heldout.append(_heldout(est, cd, planes[-1][0], err, planes[-1][1], folds))
        for _ in range(est.n_refine):
            owner = np.argmin(np.stack(heldout), axis=0)
            planes = [
                (np.flatnonzero(~is_err | (is_err & (owner == m))), C)
                for m, (_, C) in enumerate(planes)
            ]
            heldout = [_heldout(est, cd, sub, err, C, folds) for sub, C in planes]
        owner = np.argmin(np.stack(heldout), axis=0)
        sub = np.flatnonzero(~is_err | (owner == mode))
        if int(is_err[sub].sum()) < min_err:
            break
        fm, _, _ = _fit_mode(est, cd, sub, err, mode, rng)
        modes.append(fm)
        if fm.status != "ok":
            break
        planes[-1] = (sub, fm.C)
        heldout[-1] = _heldout(est, cd, sub, err, fm.C, folds)
    return modes


def _fit_mode(
    est: FailureDirections, cd: _ClassData, sub: np.ndarray, err: np.ndarray, mode: int, rng
):
    """Grid-searched SVM on the class's examples ``sub``; (mode, held-out decisions, folds)."""
    e = err[sub]
    K = None if cd.K is None else (cd.K if len(sub) == len(err) else cd.K[np.ix_(sub, sub)])
    fitter = _ModeFitter(cd.Z[sub], K, est, rng)
    Cs = est._Cs()
    folds = fitter.folds(e)
    scores, oof, rows = fitter.cv(e, Cs, folds)
    best = int(np.argmax(scores))  # the first maximum, as the paper's strict '>' loop
    C = Cs[best]
    ex, y, sw, _ = rows
    w, b = fitter.fit_one(ex, y, sw, C)
    norm = float(np.linalg.norm(w))
    lo, hi = fitter.bootstrap_ci(rows, oof[best])
    # a draw near alpha is resolved only where the bootstrap says the score is above chance
    p = fitter.p_value(e, folds, C, float(scores[best]), resolve=not lo <= 0.5)
    significant = not (p > est.alpha) and norm > 0  # NaN (no permutations) counts as significant
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
    est: FailureDirections,
    cd: _ClassData,
    sub: np.ndarray,
    err: np.ndarray,
    C: float,
    folds: np.ndarray,
) -> np.ndarray:
    """Held-out signed distance ``[n]`` of every example to an SVM trained on ``sub`` (2-fold cross-fit)."""
    out = np.zeros(len(err))
    fitter = _ModeFitter(cd.Z, cd.K, est, None)
    for f in range(est.cv):
        tr = sub[folds[sub] != f]
        ex, y, sw = _rows(err[tr])
        if len(np.unique(y)) < 2:
            continue
        w, b = fitter.fit_one(tr[ex], y, sw, C)
        te = np.flatnonzero(folds == f)
        out[te] = (cd.Z[te] @ w + b) / max(float(np.linalg.norm(w)), 1e-12)
    return out
