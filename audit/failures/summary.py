"""A short human summary of a run's failure overlap, clusters and families."""

from __future__ import annotations

import pyarrow as pa


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
