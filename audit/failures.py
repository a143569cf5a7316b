"""Failure matrix, pairwise failure overlap and clustering of models by shared failures.

Pure numpy/scipy over arrays and Arrow tables: no I/O, no Ray.

The failure matrix is bit-packed (models x examples, ``np.packbits`` along examples, rows
padded to whole 64-bit words); every pairwise statistic comes from the pair counts, which
:mod:`audit.stats_blocks` computes as blocked 0/1 matrix products (1,000 models x
1,000,000 examples in seconds, memory bounded by the block).

Pair statistics, for models A and B over the same N examples, with F_A the set of examples
A gets wrong:

- ``jaccard``            |F_A & F_B| / |F_A | F_B|
- ``p_b_fails_given_a``  |F_A & F_B| / |F_A|, the empirical P(B fails | A fails)
- ``shared_fraction``    the "similarity of failures" of arXiv 2312.05464 (Sec. 5.2.2, the
                         model x model heatmap; "models of one category share over 80% of
                         their failures"): the fraction of A's failure samples that B also
                         fails, |F_A & F_B| / |F_A|. It is row-normalised by A, hence not
                         symmetric, and by construction equals ``p_b_fails_given_a``; it is
                         kept as its own column so reports can quote the paper's quantity.
- ``error_consistency``  Geirhos et al. (2020) kappa: observed agreement on which examples
                         are right/wrong, c_obs, against the agreement c_exp = p_A p_B +
                         (1-p_A)(1-p_B) expected from the accuracies alone:
                         (c_obs - c_exp) / (1 - c_exp).

Undefined values (a model with no failures, accuracies of exactly 0 or 1) are NaN.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from audit.stats_blocks import pair_chunks

SIMILARITIES = ("jaccard", "shared_fraction", "error_consistency")

OVERLAP_SCHEMA = pa.schema(
    [
        ("model_a", pa.string()),
        ("model_b", pa.string()),
        ("jaccard", pa.float64()),
        ("p_b_fails_given_a", pa.float64()),
        ("shared_fraction", pa.float64()),
        ("error_consistency", pa.float64()),
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("n_fail_a", pa.int64()),
        ("n_fail_b", pa.int64()),
        ("n_both", pa.int64()),
        ("n_examples", pa.int64()),
    ]
)

CLUSTER_SCHEMA = pa.schema(
    [("model", pa.string()), ("family", pa.string()), ("cluster", pa.int32())]
)


# -- the failure matrix --------------------------------------------------------------------
@dataclass(frozen=True)
class FailureMatrix:
    """Which model fails on which example, bit-packed.

    ``packed``: uint8 ``[M, 8 * ceil(N / 64)]``; bit ``j`` of row ``i`` (``np.packbits`` order)
    is 1 when model ``i`` misclassifies example ``j``. Padding bits are 0.
    """

    models: tuple[str, ...]
    example_ids: np.ndarray  # [N] str
    packed: np.ndarray
    n_dropped: int = 0  # examples left out because some model has no prediction for them

    @property
    def n_models(self) -> int:
        return len(self.models)

    @property
    def n_examples(self) -> int:
        return len(self.example_ids)

    @classmethod
    def from_dense(
        cls,
        fails: np.ndarray,
        models: Sequence[str],
        example_ids: Sequence | None = None,
        n_dropped: int = 0,
    ) -> FailureMatrix:
        """From a boolean ``[M, N]`` array (True = the model fails on the example)."""
        fails = np.asarray(fails)
        if fails.ndim != 2:
            raise ValueError(f"fails must be 2-D [models, examples], got shape {fails.shape}")
        if fails.dtype != bool:
            if not np.isin(fails, (0, 1)).all():
                raise ValueError(
                    "fails must be boolean (or 0/1): True where the model misclassifies"
                )
            fails = fails.astype(bool)
        models = tuple(str(m) for m in models)
        if len(models) != fails.shape[0]:
            raise ValueError(
                f"{len(models)} model names for a failure matrix with {fails.shape[0]} rows"
            )
        if len(set(models)) != len(models):
            raise ValueError(
                f"duplicate model names: {sorted({m for m in models if models.count(m) > 1})}"
            )
        n = fails.shape[1]
        ids = (
            np.arange(n).astype(str) if example_ids is None else np.asarray(example_ids).astype(str)
        )
        if len(ids) != n:
            raise ValueError(f"{len(ids)} example ids for a failure matrix with {n} columns")
        words = (n + 63) // 64
        packed = np.zeros((fails.shape[0], words * 8), np.uint8)
        packed[:, : (n + 7) // 8] = np.packbits(fails, axis=1)
        return cls(models, ids, packed, n_dropped)

    def dense(self) -> np.ndarray:
        """Boolean ``[M, N]``."""
        return np.unpackbits(self.packed, axis=1, count=self.n_examples).astype(bool)

    def select(self, models: Sequence[str]) -> FailureMatrix:
        idx = [self._index(m) for m in models]
        return FailureMatrix(tuple(models), self.example_ids, self.packed[idx], self.n_dropped)

    def _index(self, model: str) -> int:
        try:
            return self.models.index(model)
        except ValueError:
            raise KeyError(
                f"model {model!r} is not in the failure matrix; it has {list(self.models)}"
            ) from None

    def counts(self, block: int | None = None, executor=None) -> tuple[np.ndarray, np.ndarray]:
        """``(n_fail [M], n_both [M, M])``: failures per model and per pair (diagonal = n_fail),
        as blocked 0/1 matrix products (:func:`audit.stats_blocks.pair_counts`): memory stays
        ~M x block whatever N is; ``executor`` runs ranges of blocks in parallel."""
        from audit.stats_blocks import DEFAULT_BLOCK, pair_counts

        return pair_counts(self.packed, self.n_examples, block or DEFAULT_BLOCK, executor)


def failure_matrix(
    predictions: Mapping[str, pa.Table], example_ids: Sequence | None = None
) -> FailureMatrix:
    """Build the failure matrix from per-model prediction tables (``example_id``, ``correct``).

    Tables are aligned on ``example_id``. With ``example_ids`` given, that order is used and
    every model must predict every one of them; otherwise the examples that all models
    predicted are used, in the first model's order (``n_dropped`` counts the rest).
    """
    if not predictions:
        raise ValueError(
            "no prediction tables given; run the sweep first (zoo-audit run CONFIG --out RUN)"
        )
    names = list(predictions)
    for name in names:
        missing = {"example_id", "correct"} - set(predictions[name].column_names)
        if missing:
            raise ValueError(f"predictions of model {name!r} lack column(s) {sorted(missing)}")
    first = predictions[names[0]]["example_id"].cast(pa.string())
    if example_ids is not None:
        ref = pa.array(np.asarray(example_ids).astype(str), pa.string())
        keep = None
    else:
        all_ids = [first.combine_chunks()]
        mask = np.ones(len(first), bool)
        for name in names[1:]:
            mask &= pc.is_in(
                first, value_set=predictions[name]["example_id"].cast(pa.string()).combine_chunks()
            ).to_numpy(zero_copy_only=False)
        ref = pc.filter(all_ids[0], pa.array(mask))
        keep = int((~mask).sum())
    if pc.count_distinct(ref).as_py() != len(ref):
        raise ValueError("example_id values must be unique")
    fails = np.zeros((len(names), len(ref)), bool)
    for i, name in enumerate(names):
        t = predictions[name]
        ids = t["example_id"].cast(pa.string()).combine_chunks()
        if pc.count_distinct(ids).as_py() != len(ids):
            raise ValueError(f"predictions of model {name!r} repeat example ids")
        pos = pc.index_in(ref, value_set=ids)
        if pos.null_count:
            raise ValueError(
                f"model {name!r} has no prediction for {pos.null_count} of the {len(ref)} requested examples; "
                "rerun the sweep for it or leave example_ids unset to use the common examples"
            )
        correct = t["correct"].combine_chunks().to_numpy(zero_copy_only=False).astype(bool)
        fails[i] = ~correct[pos.to_numpy(zero_copy_only=False)]
    n_dropped = 0 if keep is None else keep
    return FailureMatrix.from_dense(fails, names, ref.to_numpy(zero_copy_only=False), n_dropped)


# -- pairwise statistics -------------------------------------------------------------------
@dataclass(frozen=True)
class OverlapStats:
    """Pairwise statistics, each ``[M, M]`` with row = model A, column = model B."""

    models: tuple[str, ...]
    n_examples: int
    n_fail: np.ndarray
    n_both: np.ndarray
    jaccard: np.ndarray
    p_b_fails_given_a: np.ndarray
    shared_fraction: np.ndarray
    error_consistency: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray


def pair_rates(n_fail: np.ndarray, n_both: np.ndarray) -> dict[str, np.ndarray]:
    """Jaccard and conditional rates ``[M, M]`` from failure counts (row = A, column = B)."""
    n_fail = np.asarray(n_fail, np.float64)
    n_both = np.asarray(n_both, np.float64)
    union = n_fail[:, None] + n_fail[None, :] - n_both
    with np.errstate(invalid="ignore", divide="ignore"):
        jaccard = np.where(union > 0, n_both / union, np.nan)
        cond = np.where(n_fail[:, None] > 0, n_both / n_fail[:, None], np.nan)
    return {"jaccard": jaccard, "p_b_fails_given_a": cond, "shared_fraction": cond.copy()}


def error_consistency(n_a, n_b, n_ab, n) -> np.ndarray:
    """Geirhos et al. error consistency (kappa) from failure counts; broadcasts, NaN if undefined."""
    n_a, n_b, n_ab, n = (np.asarray(x, np.float64) for x in (n_a, n_b, n_ab, n))
    with np.errstate(invalid="ignore", divide="ignore"):
        c_obs = (n - n_a - n_b + 2 * n_ab) / n
        p_a, p_b = 1 - n_a / n, 1 - n_b / n
        c_exp = p_a * p_b + (1 - p_a) * (1 - p_b)
        return np.where(np.isclose(c_exp, 1.0), np.nan, (c_obs - c_exp) / (1 - c_exp))


def bootstrap_error_consistency(
    n_fail: np.ndarray,
    n_both: np.ndarray,
    n: int,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of error consistency for every pair, ``(low [M,M], high [M,M])``.

    Resampling the N examples with replacement changes a pair's statistic only through its
    2x2 table (both fail / only A / only B / neither), and that table under resampling is
    exactly Multinomial(N, observed cell frequencies). So each pair's bootstrap is drawn as
    ``n_boot`` multinomials over 4 cells: the same distribution as resampling examples, at a
    cost of ``n_boot x M^2`` instead of ``n_boot x M^2 x N``. Seeded and deterministic.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise ValueError(
            f"n_boot must be an int >= 1 (or 0: no intervals, NaN on purpose), got {n_boot!r}; "
            "[stats] n_boot in an audit config must be >= 1"
        )
    m = len(n_fail)
    low = np.full((m, m), np.nan)
    high = np.full((m, m), np.nan)
    if n_boot <= 0 or n <= 0 or m == 0:
        return low, high
    iu, ju = np.triu_indices(m)
    n11 = n_both[iu, ju]
    n10 = n_fail[iu] - n11
    n01 = n_fail[ju] - n11
    n00 = n - n11 - n10 - n01
    cells = np.stack([n11, n10, n01, n00], axis=1).astype(np.float64) / n  # [P, 4]
    rng = np.random.default_rng(seed)
    alpha = (1 - ci) / 2
    lo, hi = np.empty(len(cells)), np.empty(len(cells))
    for a, b in pair_chunks(
        len(cells), n_boot
    ):  # memory bounded for a large zoo; one chunk for a small one
        draws = rng.multinomial(n, cells[a:b], size=(n_boot, b - a))  # [B, P, 4]
        kappa = error_consistency(
            draws[..., 0] + draws[..., 1], draws[..., 0] + draws[..., 2], draws[..., 0], n
        )
        with np.errstate(invalid="ignore"), _quiet_nan():
            lo[a:b], hi[a:b] = np.nanquantile(kappa, [alpha, 1 - alpha], axis=0)
    low[iu, ju] = lo
    high[iu, ju] = hi
    low[ju, iu] = lo
    high[ju, iu] = hi
    return low, high


class _quiet_nan:
    """Silence numpy's all-NaN-slice warning (pairs whose kappa is undefined in every draw)."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def overlap_statistics(
    fm: FailureMatrix, n_boot: int = 1000, ci: float = 0.95, seed: int = 0, executor=None
) -> OverlapStats:
    """All pairwise statistics of a failure matrix, with bootstrap CIs for error consistency
    (``executor``: runs the blocked pair counts in parallel, see :meth:`FailureMatrix.counts`)."""
    n_fail, n_both = fm.counts(executor=executor)
    rates = pair_rates(n_fail, n_both)
    n = fm.n_examples
    kappa = error_consistency(n_fail[:, None], n_fail[None, :], n_both, n)
    lo, hi = bootstrap_error_consistency(n_fail, n_both, n, n_boot, ci, seed)
    return OverlapStats(
        fm.models,
        n,
        n_fail,
        n_both,
        rates["jaccard"],
        rates["p_b_fails_given_a"],
        rates["shared_fraction"],
        kappa,
        lo,
        hi,
    )


def overlap_table(stats: OverlapStats) -> pa.Table:
    """``overlap.parquet``: one row per ordered pair of distinct models."""
    m = len(stats.models)
    a, b = np.nonzero(~np.eye(m, dtype=bool))
    names = np.asarray(stats.models, dtype=object)
    return pa.table(
        {
            "model_a": pa.array(names[a].tolist(), pa.string()),
            "model_b": pa.array(names[b].tolist(), pa.string()),
            "jaccard": stats.jaccard[a, b],
            "p_b_fails_given_a": stats.p_b_fails_given_a[a, b],
            "shared_fraction": stats.shared_fraction[a, b],
            "error_consistency": stats.error_consistency[a, b],
            "ci_low": stats.ci_low[a, b],
            "ci_high": stats.ci_high[a, b],
            "n_fail_a": stats.n_fail[a].astype(np.int64),
            "n_fail_b": stats.n_fail[b].astype(np.int64),
            "n_both": stats.n_both[a, b].astype(np.int64),
            "n_examples": np.full(len(a), stats.n_examples, np.int64),
        },
        schema=OVERLAP_SCHEMA,
    )


# -- clustering ----------------------------------------------------------------------------
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


def extreme_pairs(
    overlap: pa.Table, metric: str = "jaccard", k: int = 3
) -> tuple[list[dict], list[dict]]:
    """The ``k`` most and least similar unordered pairs by ``metric`` (NaN pairs skipped)."""
    rows = [
        r for r in overlap.to_pylist() if r["model_a"] < r["model_b"] and r[metric] == r[metric]
    ]
    rows.sort(key=lambda r: (-r[metric], r["model_a"], r["model_b"]))
    return rows[:k], rows[::-1][:k]


def format_stats(
    overlap: pa.Table,
    clusters: pa.Table,
    families: pa.Table,
    metric: str = "jaccard",
    k: int = 3,
    ci: float = 0.95,
) -> str:
    """A short human summary: most/least similar pairs, clusters, within vs between family."""
    top, bottom = extreme_pairs(overlap, metric, k)
    lines = [
        f"Most similar failures ({metric}; P(B fails | A fails); error consistency [{ci:.0%} CI]):"
    ]
    for title, rows in (("most", top), ("least", bottom)):
        if title == "least":
            lines.append(f"Least similar failures ({metric}):")
        for r in rows:
            lines.append(
                f"  {r['model_a']:>20s} ~ {r['model_b']:<20s} {r[metric]:6.3f}  {r['p_b_fails_given_a']:6.3f}"
                f"  {r['error_consistency']:6.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
            )
    lines.append("Clusters of models by shared failures:")
    by = {}
    for r in clusters.to_pylist():
        by.setdefault(r["cluster"], []).append(f"{r['model']} ({r['family']})")
    for c in sorted(by):
        lines.append(f"  cluster {c}: {', '.join(by[c])}")
    lines.append(f"Within- vs between-family {metric}:")
    for r in families.to_pylist():
        lines.append(
            f"  {r['family']:>12s}  n={r['n_models']:<3d} within {r['within']:6.3f}  between {r['between']:6.3f}  gap {r['gap']:+.3f}"
        )
    return "\n".join(lines)
