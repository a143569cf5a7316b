"""Pairwise failure statistics from the pair counts of a :class:`FailureMatrix`: Jaccard,
P(B fails | A fails), shared fraction and error consistency with its bootstrap interval, and
the ``overlap.parquet`` table (the statistics are defined in :mod:`audit.failures`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from audit.failures.matrix import FailureMatrix
from audit.stats_blocks import pair_chunks

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
