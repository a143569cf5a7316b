"""Which audited cluster a new member belongs to: the one whose members' failures it shares
most, by the run's own ``[stats] similarity`` on the fit split (the examples every model,
audited and new, predicted)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from audit.evaluate import load_predictions
from audit.failures import failure_matrix
from audit.failures.overlap import error_consistency, pair_rates
from audit.store import RunStore
from audit.transfer.tables import ASSIGN_SCHEMA


def similarity_rows(fm, metric: str) -> np.ndarray:
    """``[M, M]`` symmetric similarity of a failure matrix's models (undefined entries 0)."""
    n_fail, n_both = fm.counts()
    rates = pair_rates(n_fail, n_both)
    rates["error_consistency"] = error_consistency(
        n_fail[:, None], n_fail[None, :], n_both, fm.n_examples
    )
    s = np.asarray(rates[metric], np.float64)
    return np.nan_to_num((s + s.T) / 2, nan=0.0)


def cluster_families(members: list[str], families: dict[str, str]) -> str:
    """``"resnet x4, mixer x2, densenet"``: a cluster's families, most members first."""
    counts = Counter(families.get(m, "") for m in members).most_common()
    return ", ".join(f"{f} x{n}" if n > 1 else f for f, n in counts)


def assign_members(view, out: RunStore, members: list[str], families: dict[str, str]) -> pa.Table:
    """``transfer_assign.parquet`` rows: each new member (outputs in ``out``) against each
    audited cluster of ``view`` (a :class:`audit.view.RunView`)."""
    clusters: dict[str, list[str]] = {}
    for m, c in view.clusters.items():
        clusters.setdefault(c, []).append(m)
    audited = [m for ms in clusters.values() for m in ms]
    preds = load_predictions(view.store, audited) | load_predictions(out, members)
    common = set.intersection(*(set(t["example_id"].to_pylist()) for t in preds.values()))
    fit = view.data.split(view.fit_split).example_ids.astype(str)
    fm = failure_matrix(preds, example_ids=[e for e in fit.tolist() if e in common])
    sim = similarity_rows(fm, view.config.stats.similarity)
    pos = {m: i for i, m in enumerate(fm.models)}
    n_fail = fm.counts()[0]
    fam_all = view.families | families
    rows = []
    for m in members:
        score = {c: float(np.mean([sim[pos[m], pos[a]] for a in ms])) for c, ms in clusters.items()}
        best = max(score, key=lambda c: (score[c], -int(c.split(":")[1])))
        for c, ms in clusters.items():
            rows.append(
                {"model": m, "family": families.get(m, ""), "cluster": c}
                | {"cluster_families": cluster_families(ms, fam_all), "similarity": score[c]}
                | {"assigned": c == best, "n_fail": int(n_fail[pos[m]])}
                | {"n_examples": fm.n_examples}
            )
    return pa.Table.from_pylist(rows, schema=ASSIGN_SCHEMA)
