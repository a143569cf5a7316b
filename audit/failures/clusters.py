"""Models clustered by shared failures, and similarity within versus between families."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from audit.failures.overlap import OverlapStats

SIMILARITIES = ("jaccard", "shared_fraction", "error_consistency")

CLUSTER_SCHEMA = pa.schema(
    [("model", pa.string()), ("family", pa.string()), ("cluster", pa.int32())]
)


def similarity_matrix(stats: OverlapStats, metric: str = "jaccard") -> np.ndarray:
    """Symmetric ``[M, M]`` similarity with unit diagonal.

    ``jaccard`` and ``error_consistency`` are symmetric already; ``shared_fraction`` is
    symmetrised as the mean of both directions. Undefined entries become 0.
    """
    if metric not in SIMILARITIES:
        raise ValueError(f"unknown similarity {metric!r}; choose one of {list(SIMILARITIES)}")
    s = np.asarray(getattr(stats, metric), np.float64)
    s = (s + s.T) / 2
    s = np.nan_to_num(s, nan=0.0)
    np.fill_diagonal(s, 1.0)
    return s


def cluster_models(
    similarity: np.ndarray,
    threshold: float | None = None,
    n_clusters: int | None = None,
    method: str = "average",
) -> np.ndarray:
    """Hierarchical clustering (scipy ``linkage`` on distance 1 - similarity), cut by a
    similarity ``threshold`` (groups joined while their linkage similarity >= threshold) or
    into ``n_clusters``. Returns int labels ``[M]``, numbered 0.. in order of first appearance.
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    s = np.asarray(similarity, np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"similarity must be a square [M, M] matrix, got shape {s.shape}")
    if (threshold is None) == (n_clusters is None):
        raise ValueError("give exactly one of threshold (a similarity cut) or n_clusters (a count)")
    m = s.shape[0]
    if m == 0:
        return np.zeros(0, np.int32)
    if m == 1:
        return np.zeros(1, np.int32)
    if n_clusters is not None and not 1 <= n_clusters <= m:
        raise ValueError(
            f"n_clusters must be between 1 and the number of models ({m}), got {n_clusters}"
        )
    d = np.clip(1.0 - (s + s.T) / 2, 0.0, None)
    np.fill_diagonal(d, 0.0)
    z = linkage(squareform(d, checks=False), method=method)
    if n_clusters is not None:
        raw = fcluster(z, t=n_clusters, criterion="maxclust")
    else:
        raw = fcluster(z, t=1.0 - float(threshold), criterion="distance")
    _, first, inv = np.unique(raw, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int32)
    rank[np.argsort(first)] = np.arange(len(first), dtype=np.int32)
    return rank[inv]


def clusters_table(
    models: Sequence[str], families: Mapping[str, str], labels: np.ndarray
) -> pa.Table:
    """``clusters.parquet``: model, family, cluster."""
    models = list(models)
    if len(labels) != len(models):
        raise ValueError(f"{len(labels)} cluster labels for {len(models)} models")
    return pa.table(
        {
            "model": pa.array(models, pa.string()),
            "family": pa.array([str(families.get(m, "")) for m in models], pa.string()),
            "cluster": pa.array(np.asarray(labels, np.int32)),
        },
        schema=CLUSTER_SCHEMA,
    )


def family_similarity(
    similarity: np.ndarray, models: Sequence[str], families: Mapping[str, str]
) -> pa.Table:
    """Within- versus between-family similarity.

    One row per family: ``within`` = mean similarity over pairs of its members (NaN for a
    single model), ``between`` = mean over pairs of one member and one non-member, ``gap`` =
    within - between. A final row ``family = "*"`` pools all within-family pairs and all
    between-family pairs of the zoo.
    """
    s = np.asarray(similarity, np.float64)
    fam = np.asarray([str(families.get(m, "")) for m in models], dtype=object)
    off = ~np.eye(len(models), dtype=bool)
    rows = []

    def mean(mask):
        return float(s[mask].mean()) if mask.any() else float("nan")

    same_all = (fam[:, None] == fam[None, :]) & off
    for f in sorted(set(fam)):
        inside = fam == f
        within = inside[:, None] & inside[None, :] & off
        between = inside[:, None] & ~inside[None, :]
        rows.append(
            {
                "family": f,
                "n_models": int(inside.sum()),
                "within": mean(within),
                "between": mean(between),
                "n_within_pairs": int(within.sum() // 2),
                "n_between_pairs": int(between.sum()),
            }
        )
    rows.append(
        {
            "family": "*",
            "n_models": len(models),
            "within": mean(same_all),
            "between": mean(~same_all & off),
            "n_within_pairs": int(same_all.sum() // 2),
            "n_between_pairs": int((~same_all & off).sum() // 2),
        }
    )
    t = pa.Table.from_pylist(rows)
    return t.append_column(
        "gap", pa.array(np.asarray(t["within"]) - np.asarray(t["between"]), pa.float64())
    )
