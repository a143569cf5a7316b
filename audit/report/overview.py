"""The overview page (the run, its data and zoo, its stages and errors) and the synthetic
sets page."""

from __future__ import annotations

import numpy as np

from audit.pipeline.stages import STAGE_NAMES
from audit.report.common import _page
from audit.report.context import ReportContext
from audit.report.images import _safe
from audit.report.site import Site
from audit.synthetic import generator_label, is_oracle


def _set_entry(ctx: ReportContext, s: dict) -> dict:
    titles, modes = ctx.titles, ctx.modes
    entry = {
        **s,
        "anchor": _safe(s["set_id"]),
        "scope_href": _page(s["scope"]) if s["scope"] in titles else None,
        "scope_title": titles.get(s["scope"], s["scope"]),
        **{"prompts": [], "shown": 0, "missing": "", "params": ""},
    }
    t = modes.set_table(s["set_id"])
    if t is None:
        entry["missing"] = f"synthetic/{s['set_id']} not found"
        return entry
    rows = t.slice(0, ctx.opts.max_set_images).to_pylist()
    entry["shown"] = len(rows)
    entry["params"] = rows[0].get("params", "") if rows else ""
    by_prompt: dict[str, list] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt"], []).append(r)
    entry["prompts"] = [
        {"prompt": p, "images": modes.set_thumbs(rs)} for p, rs in by_prompt.items()
    ]
    return entry


def write_sets(ctx: ReportContext, site: Site) -> int:
    """The sets page; returns how many synthetic images the run holds."""
    sets = [_set_entry(ctx, s) for s in ctx.modes.sets]
    n = sum(int(s.get("n_images") or 0) for s in ctx.modes.sets)
    site.render("sets.html", "sets.html", "sets", title="Synthetic sets", sets=sets, n_images=n)
    return n


def _stage_rows(ctx: ReportContext) -> list[dict]:
    order = {name: i for i, name in enumerate(STAGE_NAMES)}
    stages = sorted(
        (ctx.view.manifest.get("stages") or {}).items(),
        key=lambda kv: (order.get(kv[0], len(order)), kv[1].get("time", "")),
    )
    rows = []
    for name, st in stages:
        status, line = st.get("status", ""), st.get("line", "")
        if name == "report" and status == "running":
            status, line = "done", "this report"
        keep = {k: st.get(k, "") for k in ("time", "reason")}
        rows.append(
            {"name": name, "status": status, "line": line, "seconds": st.get("seconds"), **keep}
        )
    return rows


def _error_rows(ctx: ReportContext) -> dict:
    err = ctx.view.store.errors()
    rows = []
    for r in err.slice(0, 200).to_pylist():
        reason = (r.get("reason") or "").strip()
        first = reason.splitlines()[0] if reason else ""
        rows.append({**r, "first": first, "reason": reason, "more": reason != first})
    return {"n": err.num_rows, "rows": rows}


def _data_box(ctx: ReportContext) -> dict:
    view, data = ctx.view, ctx.view.data
    dm = view.manifest.get("data") or {}
    classes = view.classes
    splits = []
    if data is not None:
        vals, counts = np.unique(data.column("split").astype(str), return_counts=True)
        splits = [(v, int(c)) for v, c in zip(vals, counts, strict=True)]
    return {
        "n": int(dm.get("n") or (len(data) if data is not None else 0)),
        "n_classes": len(classes),
        "classes": classes[:60],
        "more_classes": max(0, len(classes) - 60),
        "splits": splits,
        "source": dm.get("source", ""),
        "world": bool(dm.get("world_dir")),
        "fit_split": view.fit_split,
        "eval_split": view.eval_split,
    }


def _zoo_box(ctx: ReportContext) -> dict:
    view, titles = ctx.view, ctx.titles
    rows = []
    for name in view.models:
        o = ctx.overall.get(name) or {}
        n, top, top_cv = ctx.mode_summary(name)
        cl = view.clusters.get(name)
        rows.append(
            {"name": name, "href": _page(name), "family": view.families.get(name, "")}
            | {
                "cluster": titles.get(cl, "") if cl else "",
                "cluster_href": _page(cl) if cl else None,
            }
            | {k: o.get(k) for k in ("acc", "lo", "hi")}
            | {"n_modes": n, "top": top, "top_cv": top_cv, "gain": ctx.gain_of(name)}
        )
    return {
        "name": (view.manifest.get("zoo") or {}).get("name", ""),
        "models": rows,
        "n_families": len({view.families.get(x, "") for x in view.models}),
        "n_clusters": len(ctx.scopes),
        "missing": [x for x in view.zoo_models if x not in view.models],
    }


def write_overview(ctx: ReportContext, site: Site, n_synthetic: int) -> None:
    modes = ctx.modes
    site.render(
        "index.html",
        "index.html",
        "index",
        title="Overview",
        data=_data_box(ctx),
        zoo=_zoo_box(ctx),
        stages=_stage_rows(ctx),
        errors=_error_rows(ctx),
        n_modes=sum(len(v) for v in modes.by_scope.values()),
        n_directions=modes.n_directions,
        n_synthetic=n_synthetic,
        n_sets=len(modes.sets),
        has_mitigation=modes.mitigation is not None,
        gain_generator=_gain_generator(ctx),
    )


def _gain_generator(ctx: ReportContext) -> str:
    """The generator whose "synthetic" rows the zoo table's gain column averages: one a user has
    when the run has one (the world renderer is the data's own generator, an oracle)."""
    if ctx.modes.mitigation is None or "generator" not in ctx.modes.mitigation.column_names:
        return ""
    gens = {
        g
        for g, m in zip(
            ctx.modes.mitigation.column("generator").to_pylist(),
            ctx.modes.mitigation.column("method").to_pylist(),
            strict=True,
        )
        if m == "synthetic" and g
    }
    real = sorted(g for g in gens if not is_oracle(g))
    return ", ".join(real) if real else ", ".join(generator_label(g) for g in sorted(gens))
