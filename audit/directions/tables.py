"""Many models at once, pooled clusters, and the ``directions.parquet`` table and its readers."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from audit.directions.estimator import (
    FailureDirections,
    _check_correct,
    _check_X,
    _prepare,
    standardize,
)

log = logging.getLogger(__name__)

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
        ("C_on_edge", pa.bool_()),
        ("direction", pa.list_(pa.float32())),
        ("weight_norm", pa.float64()),
        ("intercept", pa.float64()),
        ("mean", pa.list_(pa.float32())),
        ("scale", pa.list_(pa.float32())),
    ]
)


def _correct_matrix(correct_by_model: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    if not correct_by_model:
        raise ValueError(
            "correct_by_model is empty; pass {model name: correct [N]} for at least one model"
        )
    return {name: _check_correct(c, n) for name, c in correct_by_model.items()}


def fit_directions(
    X,
    correct_by_model: Mapping[str, np.ndarray],
    labels=None,
    *,
    X_stats=None,
    estimator: FailureDirections | None = None,
    n_jobs: int | None = None,
) -> dict[str, FailureDirections]:
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


def fit_collective(
    X,
    correct_by_model: Mapping[str, np.ndarray],
    clusters: Mapping[str, Sequence[str]],
    labels=None,
    *,
    X_stats=None,
    estimator: FailureDirections | None = None,
) -> dict[str, FailureDirections]:
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
        raise ValueError(
            f"a clusters table needs columns model and cluster; got {table.column_names}"
        )
    out: dict[str, list[str]] = {}
    for m, c in zip(table["model"].to_pylist(), table["cluster"].to_pylist(), strict=True):
        out.setdefault(str(c), []).append(str(m))
    return out


def directions_table(
    fitted: Mapping[str, FailureDirections], class_names: Sequence[str] | None = None
) -> pa.Table:
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
            rows.append(
                {
                    "scope": str(scope),
                    "class": name,
                    "class_index": int(m.label),
                    "mode": m.mode,
                    "status": m.status,
                    "cv_score": m.cv_score,
                    "ci_low": m.ci_low,
                    "ci_high": m.ci_high,
                    "p_value": m.p_value,
                    "n_errors": m.n_errors,
                    "n_correct": m.n_correct,
                    "C": m.C,
                    "C_on_edge": bool(m.C_on_edge),
                    "direction": m.direction.astype(np.float32).tolist() if has else None,
                    "weight_norm": m.weight_norm if has else None,
                    "intercept": m.intercept if has else None,
                    "mean": mean,
                    "scale": scale,
                }
            )
    return pa.Table.from_pylist(rows, schema=DIRECTIONS_SCHEMA)


def decision_from_row(row: Mapping, X) -> np.ndarray:
    """Decision values ``[N]`` of embeddings ``X [N, D]`` under one ``directions.parquet`` row."""
    if row.get("direction") is None:
        return np.full(len(X), np.nan)
    Z = standardize(
        _check_X(X), np.asarray(row["mean"], np.float64), np.asarray(row["scale"], np.float64)
    )
    return float(row["weight_norm"]) * (Z @ np.asarray(row["direction"], np.float64)) + float(
        row["intercept"]
    )


def direction_similarity(
    directions: pa.Table, mode: int = 0, scopes: Sequence[str] | None = None
) -> pa.Table:
    """Cosine similarity between scopes' directions for the same class and mode.

    Rows (class, mode, scope_a, scope_b, cosine) for every unordered pair a < b of scopes that
    both have a direction; high values across a family mean a shared failure mode.
    """
    by_class: dict[str, list[tuple[str, np.ndarray]]] = {}
    for r in directions.to_pylist():
        if (
            r["mode"] != mode
            or r["direction"] is None
            or (scopes is not None and r["scope"] not in scopes)
        ):
            continue
        by_class.setdefault(r["class"], []).append(
            (r["scope"], np.asarray(r["direction"], np.float64))
        )
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
        schema=pa.schema(
            [
                ("class", pa.string()),
                ("mode", pa.int32()),
                ("scope_a", pa.string()),
                ("scope_b", pa.string()),
                ("cosine", pa.float64()),
            ]
        ),
    )


def with_q_values(dirs: pa.Table) -> pa.Table:
    """Add Benjamini-Hochberg q-values over every direction of the run: with many models
    and classes, some permutation p-values are small by chance; the q-value bounds the
    share of false discoveries among the directions reported at or below it."""
    from scipy.stats import false_discovery_control

    p = np.asarray(dirs["p_value"].to_numpy(zero_copy_only=False), float)
    q = np.full(len(p), np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        q[ok] = false_discovery_control(p[ok], method="bh")
    return dirs.append_column("q_value", pa.array(q, pa.float64()))
