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

The package: :mod:`~audit.failures.matrix` (the failure matrix), :mod:`~audit.failures.overlap`
(pairwise statistics), :mod:`~audit.failures.clusters` (clustering, families) and
:mod:`~audit.failures.summary` (the text summary); every name is importable from here.
"""

from audit.failures.clusters import (
    CLUSTER_SCHEMA,
    SIMILARITIES,
    cluster_models,
    clusters_table,
    family_similarity,
    similarity_matrix,
)
from audit.failures.matrix import FailureMatrix, failure_matrix
from audit.failures.overlap import (
    OVERLAP_SCHEMA,
    OverlapStats,
    bootstrap_error_consistency,
    error_consistency,
    overlap_statistics,
    overlap_table,
    pair_rates,
)
from audit.failures.summary import extreme_pairs, format_stats

__all__ = [
    "CLUSTER_SCHEMA",
    "OVERLAP_SCHEMA",
    "SIMILARITIES",
    "FailureMatrix",
    "OverlapStats",
    "bootstrap_error_consistency",
    "cluster_models",
    "clusters_table",
    "error_consistency",
    "extreme_pairs",
    "failure_matrix",
    "family_similarity",
    "format_stats",
    "overlap_statistics",
    "overlap_table",
    "pair_rates",
    "similarity_matrix",
]
