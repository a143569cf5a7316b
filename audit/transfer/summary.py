"""What ``zoo-audit fix`` prints: per new member, its cluster and the gain of each set on its
failing planted groups (else its cluster's attribute groups or nearest images), per generator,
the oracle labelled."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from audit.synthetic import ORACLE_NOTE, is_oracle

SHOWN = ("family_set", "other_set", "control", "own")


#: what a member's gains average over: the first of these evaluation targets its rows have
EVALS = ("planted", "attribute_group", "nearest_caption", "direction")


def first_kind(kinds) -> str | None:
    """The first of :data:`EVALS` among ``kinds`` (None: none of them)."""
    have = set(kinds)
    return next((k for k in EVALS if k in have), None)


def gain_kind(table: pa.Table) -> str | None:
    """The evaluation the summary reads: planted groups, else attribute groups, else nearest
    images, else the directions' hardest images."""
    return first_kind(table["eval"].to_pylist() if table.num_rows else [])


def share(part: float, own: float) -> float:
    """A gain as a fraction of the member's own per-model gain (nan without a positive one)."""
    return float(part / own) if np.isfinite(own) and own > 0 else float("nan")


def mean_gains(table: pa.Table) -> dict[tuple[str, str, str], tuple[float, float]]:
    """``{(model, generator, method): (mean gain, mean overall change)}`` over the rows of
    :func:`gain_kind`; the control (no generator) is listed under every generator."""
    kind = gain_kind(table)
    rows = [r for r in table.to_pylist() if not r["error"] and r["eval"] == kind]
    gens = sorted({r["generator"] for r in rows if r["generator"]})
    acc: dict[tuple, list] = {}
    for r in rows:
        if not np.isfinite(r["gain"]):
            continue
        for g in gens if r["method"] == "control" else [r["generator"]]:
            d = r["overall_after"] - r["overall_before"]
            acc.setdefault((r["model"], g, r["method"]), []).append((r["gain"], d))
    return {k: tuple(np.mean(v, axis=0).tolist()) for k, v in acc.items()}


def share_of_own(gains: dict, model: str, generator: str, method: str) -> float:
    """``method``'s gain as a fraction of the member's own per-model gain (nan without one)."""
    own = gains.get((model, generator, "own"), (np.nan,))[0]
    return share(gains.get((model, generator, method), (np.nan,))[0], own)


def fix_summary(outcome) -> str:
    """The console's table (``outcome``: a :class:`audit.transfer.FixOutcome`)."""
    t, a = outcome.table, outcome.assign
    kind = gain_kind(t)
    gains = mean_gains(t)
    lines = [f"\nNew members fixed by their cluster's shared set (gain in points on {kind}):"]
    assigned = {r["model"]: r for r in a.to_pylist() if r["assigned"]}
    info = {r["model"]: r for r in t.to_pylist() if not r["error"]}
    for m, r in assigned.items():
        own = "" if m not in info or info[m]["family_in_cluster"] else " (family not in it)"
        lines.append(
            f"  {m:22s} {r['family']:10s} -> {r['cluster']} ({r['cluster_families']}; "
            f"similarity {r['similarity']:.2f}){own}"
        )
    for g in sorted({k[1] for k in gains}):
        lines.append(f"  generator {g}{f' ({ORACLE_NOTE})' if is_oracle(g) else ''}:")
        for m in assigned:
            parts = [
                f"{meth} {100 * gains[(m, g, meth)][0]:+.1f}"
                for meth in SHOWN
                if (m, g, meth) in gains
            ]
            share = share_of_own(gains, m, g, "family_set")
            tail = f"; family set = {share:.0%} of own" if np.isfinite(share) else ""
            fam = gains.get((m, g, "family_set"))
            tail += f"; overall {100 * fam[1]:+.1f}" if fam else ""
            lines.append(f"    {m:22s} {', '.join(parts)}{tail}")
    if outcome.errors:
        lines.append(f"  not fixed ({len(outcome.errors)}):")
        lines += [f"    {m}: {why[:160]}" for m, why in sorted(outcome.errors.items())]
    return "\n".join(lines)
