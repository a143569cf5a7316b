"""The tables ``zoo-audit fix`` writes into the run directory.

``transfer.parquet``: one row per new member, method, generator and evaluation target:

- ``method``: ``family_set`` (the shared set of the cluster the member was assigned to),
  ``other_set`` (the set of the audited cluster whose failures it shares least), ``control``
  (its head retrained on the real examples alone, lambda = 0) and ``own`` (its own
  per-model fix, copied from a full audit of the member given as ``--reference``);
- ``eval``: ``planted`` (the member's failing planted groups, data with a ``group`` column),
  ``attribute_group`` / ``nearest_caption`` / ``direction`` (the assigned cluster's failure
  modes, on the eval split), as in ``mitigation.parquet``;
- a member that could not be fixed (another class list, an input the data does not fit, a
  failing sweep) is one row with ``error`` set and no method.

``transfer_assign.parquet``: one row per new member and audited cluster: the member's mean
failure similarity (``[stats] similarity``) with the cluster's members on the fit split, and
whether it was assigned there.
"""

from __future__ import annotations

import pyarrow as pa

TRANSFER = "transfer.parquet"
ASSIGN = "transfer_assign.parquet"
#: where the new members' outputs (predictions, features, on the generated images too) live
OUTPUTS = "transfer"

METHODS = ("family_set", "other_set", "control", "own")

TRANSFER_SCHEMA = pa.schema(
    [
        *[("model", pa.string()), ("family", pa.string()), ("cluster", pa.string())],
        *[("cluster_families", pa.string()), ("family_in_cluster", pa.bool_())],
        *[("similarity", pa.float64()), ("method", pa.string()), ("set_scope", pa.string())],
        *[("generator", pa.string()), ("oracle", pa.bool_()), ("lambda", pa.float64())],
        *[("n_added", pa.int64()), ("choice", pa.string()), ("eval", pa.string())],
        *[("class", pa.string()), ("target", pa.string()), ("n_hard", pa.int64())],
        *[("hard_before", pa.float64()), ("hard_after", pa.float64()), ("gain", pa.float64())],
        *[("gain_ci_low", pa.float64()), ("gain_ci_high", pa.float64())],
        *[("overall_before", pa.float64()), ("overall_after", pa.float64())],
        ("error", pa.string()),
    ]
)

ASSIGN_SCHEMA = pa.schema(
    [
        *[("model", pa.string()), ("family", pa.string()), ("cluster", pa.string())],
        *[("cluster_families", pa.string()), ("similarity", pa.float64())],
        *[("assigned", pa.bool_()), ("n_fail", pa.int64()), ("n_examples", pa.int64())],
    ]
)
