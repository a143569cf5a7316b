"""The page of ``zoo-audit fix``: new members, never audited, each assigned to the audited
cluster whose failures it shares most and its linear head retrained with that cluster's shared
synthetic set (``transfer.parquet`` and ``transfer_assign.parquet``, described in
:mod:`audit.transfer.tables`). Written only when the run has ``transfer.parquet``."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from audit.report.common import METRIC_LABELS, _f, _page
from audit.report.context import ReportContext
from audit.report.site import Site
from audit.synthetic import ORACLE_NOTE, generator_label, is_oracle
from audit.transfer.summary import first_kind, share
from audit.transfer.tables import ASSIGN, METHODS, TRANSFER

EVAL_TEXT = {
    "planted": "the member's failing planted groups",
    "attribute_group": "the assigned cluster's failing attribute groups (the data has no planted groups)",
    "nearest_caption": "the eval images nearest the assigned cluster's hard captions (the data has "
    "no planted groups and the run no attribute groups)",
    "direction": "the eval images the assigned cluster's failure directions find hardest (the data "
    "has no planted groups, attribute groups or captions)",
}


def _mean(xs: list[float]) -> float:
    v = np.asarray([x for x in xs if x is not None], np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def _pts(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:+.1f}"


def _cell(rows: list[dict]) -> dict | None:
    """A member's gain under one method: the mean over ``rows`` (its targets), with the row's
    bootstrap interval when there is a single one; None without rows."""
    if not rows:
        return None
    lo = _f(rows[0].get("gain_ci_low")) if len(rows) == 1 else math.nan
    hi = _f(rows[0].get("gain_ci_high")) if len(rows) == 1 else math.nan
    first = rows[0]
    how = f"λ = {_f(first.get('lambda')):.2f}, {first.get('n_added') or 0} images added"
    return {
        "gain": _mean([_f(r.get("gain")) for r in rows]),
        "n": len(rows),
        "ci": "" if math.isnan(lo) else f"[{_pts(lo)}, {_pts(hi)}]",
        "sure": 1 if lo > 0 else (-1 if hi < 0 else 0),
        "how": how + (f"; {first['choice']}" if first.get("choice") else ""),
        "set": first.get("set_scope") or "",
    }


def _share(part: dict | None, own: dict | None) -> float:
    """``part``'s gain as a share of the own fix's gain (NaN without a positive own gain)."""
    return math.nan if part is None or own is None else share(part["gain"], own["gain"])


def _member_row(model: str, rows: list[dict]) -> dict:
    """One member's line of a generator's table, from its rows of the chosen evaluation target."""
    by = {m: [r for r in rows if r.get("method") == m] for m in METHODS}
    cells = {m: _cell(by[m]) for m in METHODS}
    fam = by["family_set"]
    delta = [_f(r.get("overall_after")) - _f(r.get("overall_before")) for r in fam]
    return {
        "model": model,
        "family": rows[0].get("family") or "",
        **cells,
        "family_share": _share(cells["family_set"], cells["own"]),
        "other_share": _share(cells["other_set"], cells["own"]),
        "overall": _mean(delta),
    }


def _generator_table(gen: str, rows: list[dict], models: list[str]) -> dict:
    """The table of one generator: rows with no generator (the control) belong to every one."""
    mine = [r for r in rows if (r.get("generator") or "") in (gen, "")]
    have = {r.get("eval") for r in mine if (r.get("generator") or "") == gen} or {
        r.get("eval") for r in mine
    }
    ev = first_kind(have) or (sorted(x or "" for x in have)[0] if have else "")
    members = []
    for m in models:
        sel = [r for r in mine if r["model"] == m and r.get("eval") == ev]
        if sel:
            members.append(_member_row(m, sel))
    shares = [r["family_share"] for r in members if not math.isnan(r["family_share"])]
    return {
        "generator": gen,
        "label": generator_label(gen) if gen else "no generator",
        "oracle": is_oracle(gen),
        "eval": ev,
        "eval_text": EVAL_TEXT.get(ev, ev),
        "members": members,
        "has_own": any(r["own"] is not None for r in members),
        "mean_share": _mean(shares),
        "n_share": len(shares),
        "mean_family": _mean([r["family_set"]["gain"] for r in members if r["family_set"]]),
        "mean_control": _mean([r["control"]["gain"] for r in members if r["control"]]),
    }


def _cluster_link(ctx: ReportContext, scope: str) -> dict:
    """A cluster's title and its card page (None when the run has no card for it)."""
    title = ctx.titles.get(scope) or scope.replace("cluster:", "Cluster ")
    return {"scope": scope, "title": title, "href": _page(scope) if scope in ctx.members else None}


def _in_families(family: str, cluster_families: str) -> bool:
    """Whether ``family`` is one of ``"resnet x4, mixer x2, densenet"``."""
    return family in {f.strip().split(" x")[0] for f in cluster_families.split(",")}


def _assignment(ctx: ReportContext, model: str, ok: list[dict], assign: list[dict]) -> dict:
    """A member's family, assigned cluster (with its families) and similarity with each cluster."""
    first = (ok or assign or [{}])[0]
    chosen = [a for a in assign if a.get("assigned")]
    scope = (chosen[0] if chosen else first).get("cluster") or ""
    fams = (chosen[0] if chosen else first).get("cluster_families") or ""
    family = first.get("family") or ctx.view.families.get(model, "")
    known = [r["family_in_cluster"] for r in ok if r.get("family_in_cluster") is not None]
    sims = sorted(assign, key=lambda a: -_f(a.get("similarity")))
    top = max([_f(a.get("similarity")) for a in assign if _f(a.get("similarity")) > 0] or [1.0])
    return {
        "model": model,
        "family": family,
        "cluster": _cluster_link(ctx, scope) if scope else None,
        "cluster_families": fams,
        "in_cluster": bool(known[0]) if known else _in_families(family, fams),
        "sims": [
            _cluster_link(ctx, a["cluster"])
            | {"sim": _f(a.get("similarity")), "assigned": bool(a.get("assigned"))}
            | {"width": round(100 * max(0.0, _f(a.get("similarity"))) / top, 1)}
            for a in sims
        ],
    }


def _error(r: dict) -> dict:
    reason = (r.get("error") or "").strip()
    first = reason.splitlines()[0] if reason else ""
    return {"model": r.get("model") or "", "family": r.get("family") or ""} | {
        "first": first,
        "reason": reason,
        "more": reason != first,
    }


def transfer_page(ctx: ReportContext) -> dict | None:
    """The page's context, or None when the run has no ``transfer.parquet``."""
    t = ctx.view.table(TRANSFER)
    if t is None:
        return None
    rows = t.to_pylist()
    a = ctx.view.table(ASSIGN)
    assign = [] if a is None else a.to_pylist()
    models = list(dict.fromkeys([r["model"] for r in rows] + [r["model"] for r in assign]))
    ok = [r for r in rows if not (r.get("error") or "").strip()]
    errors = [_error(r) for r in rows if (r.get("error") or "").strip()]
    failed = {e["model"] for e in errors}
    by_model, assign_by = defaultdict(list), defaultdict(list)
    for r in ok:
        by_model[r["model"]].append(r)
    for r in assign:
        assign_by[r["model"]].append(r)
    members = [
        _assignment(ctx, m, by_model[m], assign_by[m])
        for m in models
        if m in by_model or m not in failed
    ]
    gens = {r.get("generator") or "" for r in ok if r.get("method") != "control"} - {""}
    order = sorted(gens, key=lambda g: (is_oracle(g), g)) or [""]
    tables = [_generator_table(g, ok, models) for g in order]
    metric = ctx.view.config.stats.similarity
    return {
        "members": members,
        "n_in_cluster": sum(m["in_cluster"] for m in members if m["cluster"]),
        "n_assigned": sum(1 for m in members if m["cluster"]),
        "tables": [t for t in tables if t["members"]],
        "errors": errors,
        "metric_label": METRIC_LABELS.get(metric, metric),
        "oracle_note": ORACLE_NOTE,
    }


def write_transfer(ctx: ReportContext, site: Site) -> int:
    """The page of new members fixed with their cluster's shared set, when the run has
    ``transfer.parquet``; returns how many members it shows (0 without the table)."""
    page = transfer_page(ctx)
    if page is None:
        return 0
    site.render("transfer.html", "transfer.html", "transfer", title="Fixing new members", **page)
    return len(page["members"]) + len(page["errors"])
