"""Build the static HTML report of a run directory: Jinja2 templates, matplotlib figures,
thumbnails as small files, one page per model and per cluster. It reads only the run
directory (and the dataset the manifest names, for real images) and writes only the report
folder, so ``zoo-audit report RUN`` works on any finished or partial run."""

from __future__ import annotations

import logging
import math
import os
import time
from collections import defaultdict

import numpy as np
import pyarrow as pa

from audit.report.common import (  # noqa: F401 - re-exported: the report's public names
    MARKER,
    METRIC_LABELS,
    NAV,
    STAGE_ORDER,
    ReportOptions,
    ReportResult,
    _bootstrap_mean,
    _cluster_title,
    _env,
    _f,
    _page,
    _pct,
    _Run,
    open_dataset,
)
from audit.report.images import Thumbs, _safe
from audit.report.modes import _Modes
from audit.store import RunStore

log = logging.getLogger(__name__)


# -- accuracy ----------------------------------------------------------------------------------
def _accuracy(acc: pa.Table | None) -> tuple[dict, dict, dict]:
    """``(overall, classes, groups)``: per model its overall row, class rows, attribute-group rows."""
    overall, classes, groups = {}, defaultdict(list), defaultdict(list)
    if acc is None:
        return overall, classes, groups
    d = acc.to_pydict()
    for i in range(acc.num_rows):
        r = {
            "cls": d["class"][i],
            "attribute": d["attribute"][i],
            "value": d["value"][i],
            "n": int(d["n"][i]),
            "acc": _f(d["accuracy"][i]),
            "lo": _f(d["ci_low"][i]),
            "hi": _f(d["ci_high"][i]),
            "class_acc": _f(d["class_accuracy"][i]),
        }
        m = d["model"][i]
        if r["cls"] == "*":
            overall[m] = r
        elif r["attribute"] == "*":
            classes[m].append(r)
        else:
            r["gap"] = r["acc"] - r["class_acc"]
            groups[m].append(r)
    return overall, classes, groups


# -- shared failures -----------------------------------------------------------------------------
def _ec_mean(
    ec: np.ndarray, lo: np.ndarray, hi: np.ndarray, mask: np.ndarray
) -> tuple[float, float, float]:
    """Mean error consistency over the pairs in ``mask`` with a bootstrap interval over pairs;
    a single pair keeps its own interval (its bootstrap over examples)."""
    v = ec[mask]
    ok = np.isfinite(v)
    if ok.sum() == 1:
        return float(v[ok][0]), float(lo[mask][ok][0]), float(hi[mask][ok][0])
    return _bootstrap_mean(v)


def _shared(run: _Run, out: RunStore) -> dict:
    from audit.report import figures

    ov = run.opt("overlap.parquet")
    ctx: dict = {"heatmap": None, "families": []}
    if ov is None or not ov.num_rows:
        return ctx
    d = ov.to_pydict()
    names = [m for m in run.models if m in set(d["model_a"]) | set(d["model_b"])]
    pos = {m: i for i, m in enumerate(names)}
    n = len(names)
    metric = run.metric if run.metric in d else "jaccard"
    s = np.full((n, n), np.nan)
    ec, lo, hi = (np.full((n, n), np.nan) for _ in range(3))
    for i in range(ov.num_rows):
        a, b = pos.get(d["model_a"][i]), pos.get(d["model_b"][i])
        if a is None or b is None:
            continue
        s[a, b] = _f(d[metric][i])
        ec[a, b], lo[a, b], hi[a, b] = (
            _f(d["error_consistency"][i]),
            _f(d["ci_low"][i]),
            _f(d["ci_high"][i]),
        )
    sim = np.nan_to_num(
        (s + s.T) / 2 if metric == "shared_fraction" else np.where(np.isnan(s), s.T, s), nan=0.0
    )
    np.fill_diagonal(sim, 1.0)
    label = METRIC_LABELS.get(metric, metric)
    z, order = figures.linkage_order(sim, run.method)
    fams = [run.families.get(m, "") for m in names]
    out.write_bytes(
        "figures/heatmap.png",
        figures.heatmap_png(sim, names, order, run.families, run.clusters, label),
    )
    out.write_bytes("figures/dendrogram.png", figures.dendrogram_png(z, names, run.families, label))
    iu = np.triu_indices(n, 1)
    same = np.asarray([fams[i] == fams[j] for i, j in zip(*iu, strict=True)], bool)
    ok = np.isfinite(ec[iu])
    out.write_bytes(
        "figures/consistency.png",
        figures.consistency_png(ec[iu][ok], lo[iu][ok], hi[iu][ok], same[ok]),
    )
    rows, fig_rows = [], []
    F = np.asarray(fams, dtype=object)
    off = ~np.eye(n, dtype=bool)
    ec_sym, lo_sym, hi_sym = (np.where(np.isnan(x), x.T, x) for x in (ec, lo, hi))
    for f in sorted(set(fams)):
        inside = F == f
        within = np.triu(inside[:, None] & inside[None, :], 1)
        between = inside[:, None] & ~inside[None, :] & off
        w, b = _bootstrap_mean(sim[within]), _bootstrap_mean(sim[between])
        fig_rows.append(
            {
                "family": f,
                "within": sim[within].tolist(),
                "between": sim[between].tolist(),
                "within_mean": w[0],
                "within_lo": w[1],
                "within_hi": w[2],
                "between_mean": b[0],
                "between_lo": b[1],
                "between_hi": b[2],
            }
        )
        rows.append(
            {
                "family": f,
                "n_models": int(inside.sum()),
                "within": w[0],
                "within_lo": w[1],
                "within_hi": w[2],
                "between": b[0],
                "between_lo": b[1],
                "between_hi": b[2],
                "gap": w[0] - b[0],
                "ec_within": _ec_mean(ec_sym, lo_sym, hi_sym, within),
                "ec_between": _ec_mean(ec_sym, lo_sym, hi_sym, between),
            }
        )
    out.write_bytes("figures/families.png", figures.family_png(fig_rows, label))
    ctx.update(
        heatmap="figures/heatmap.png",
        dendrogram="figures/dendrogram.png",
        families_fig="figures/families.png",
        consistency_fig="figures/consistency.png",
        families=rows,
        metric_label=label,
    )
    return ctx


# -- failure modes ---------------------------------------------------------------------------------
def write_report(
    store: RunStore, out_dir: str | None = None, *, data=None, cfg=None
) -> ReportResult:
    """Write the report of the run in ``store`` to ``out_dir`` (default ``RUN/report``).

    ``data`` is the run's dataset (an ``ImageTable``; default: opened from the manifest) for
    the real images of each failure mode; without it the cards show no real images.
    """
    t0 = time.perf_counter()
    opts = ReportOptions.of(cfg)
    if out_dir is None:
        out_dir = store.path("report") if store.local else f"{store.uri.rstrip('/')}/report"
    out = RunStore(out_dir)
    if out.exists("index.html") and MARKER.encode() in out.read_bytes("index.html"):
        for sub in (
            "img",
            "models",
            "clusters",
            "figures",
        ):  # a previous build's pages and thumbnails
            out.delete(sub)
    run = _Run(store)
    if data is None:
        data = open_dataset(run.manifest)
    status = run.manifest.get("status", "unknown")
    if status == "running" and all(
        v.get("status") == "done"
        for k, v in (run.manifest.get("stages") or {}).items()
        if k != "report"
    ):
        status = "done"  # written by the run's last stage: every stage before it is done
    env = _env()
    thumbs = Thumbs(out, opts.thumb_size)
    n_bytes = 0

    def render(rel: str, template: str, page: str, **ctx) -> None:
        nonlocal n_bytes
        root = "../" * rel.count("/")
        m = run.manifest
        html = env.get_template(template).render(
            root=root,
            nav=NAV,
            page=page,
            fit_split=run.fit_split,
            eval_split=run.eval_split,
            k=run.k,
            run={
                "name": os.path.basename(store.uri.rstrip("/")),
                "path": store.uri,
                "updated": m.get("updated", ""),
                "status": status,
                "seconds": sum(
                    float(v.get("seconds") or 0) for v in (m.get("stages") or {}).values()
                ),
            },
            **ctx,
        )
        b = (html + "\n" + MARKER + "\n").encode()
        out.write_bytes(rel, b)
        n_bytes += len(b)

    for name in ("report.css", "report.js"):
        from importlib.resources import files

        b = files("audit.report").joinpath("static", name).read_bytes()
        out.write_bytes(f"static/{name}", b)
        n_bytes += len(b)

    overall, class_acc, group_acc = _accuracy(run.acc)
    modes = _Modes(run, data, opts, thumbs)
    shared = _shared(run, out)
    members: dict[str, list[str]] = defaultdict(list)
    for m in run.models:
        if m in run.clusters:
            members[run.clusters[m]].append(m)
    scopes = sorted(members, key=lambda s: int(s.split(":")[1]) if s.split(":")[1].isdigit() else s)
    titles = {s: _cluster_title(s, members[s], run.families) for s in scopes}
    sets_by_scope = {s["scope"]: s for s in modes.sets}

    def gain_of(model):
        """Mean gain of the model's targeted fix ("synthetic" when the run has it, else every non-control method)."""
        rows = modes.mitigation_rows(model)
        pick = "synthetic" if any(r.get("method") == "synthetic" for r in rows) else None
        g = [
            r["gain"]
            for r in rows
            if r.get("gain") is not None
            and (r.get("method") == pick if pick else r.get("method") != "control")
        ]
        return float(np.nanmean(g)) if g else math.nan

    def mode_summary(scope):
        ms = modes.by_scope.get(scope, [])
        top = ms[0] if ms else None
        return (
            len(ms),
            (f"{top['cls']} (strength {top['cv']:.2f})" if top else ""),
            (top["cv"] if top else math.nan),
        )

    # model and cluster pages
    cards, n_model_pages = [], 0
    for scope in [*run.models, *scopes]:
        is_cluster = scope.startswith("cluster:")
        mem = members[scope] if is_cluster else [scope]
        page = _page(scope)
        full, others, mit_other = modes.card_modes(scope, mem, page)
        if is_cluster:
            rows = [overall[m] for m in mem if m in overall]
            acc = (
                {
                    "acc": float(np.mean([r["acc"] for r in rows])),
                    "lo": min(r["acc"] for r in rows),
                    "hi": max(r["acc"] for r in rows),
                }
                if rows
                else {"acc": None, "lo": None, "hi": None}
            )
            per = defaultdict(list)
            for m in mem:
                for r in class_acc.get(m, []):
                    per[r["cls"]].append(r)
            crow = [
                {
                    "cls": c,
                    "n": rs[0]["n"],
                    "acc": float(np.mean([r["acc"] for r in rs])),
                    "lo": min(r["acc"] for r in rs),
                    "hi": max(r["acc"] for r in rs),
                }
                for c, rs in per.items()
            ]
            grows = []
        else:
            o = overall.get(scope)
            acc = (
                {"acc": o["acc"], "lo": o["lo"], "hi": o["hi"]}
                if o
                else {"acc": None, "lo": None, "hi": None}
            )
            crow = list(class_acc.get(scope, []))
            grows = sorted(group_acc.get(scope, []), key=lambda r: r["gap"])
        crow.sort(key=lambda r: r["acc"])
        cl = run.clusters.get(scope)
        set_row = sets_by_scope.get(scope if is_cluster else cl)
        card = {
            "kind": "cluster" if is_cluster else "model",
            "name": scope,
            "title": titles[scope] if is_cluster else scope,
            "family": run.families.get(scope, ""),
            "cluster_href": f"../{_page(cl)}" if cl else None,
            "cluster_title": titles.get(cl, cl),
            "peers": ", ".join(m for m in members.get(cl, []) if m != scope) or "no other model",
            "members": [
                {"name": m, "href": f"../{_page(m)}", "family": run.families.get(m, "")}
                for m in mem
            ],
            "n_modes": len(modes.by_scope.get(scope, [])),
            **acc,
            "worst_class": crow[0] if crow else None,
            "worst_group": grows[0] if grows else None,
            "set_href": f"../sets.html#{_safe(set_row['set_id'])}" if set_row else None,
            "set_images": set_row["n_images"] if set_row else 0,
            "set_scope": titles.get(set_row["scope"], "") if set_row else "",
        }
        n_all = len(modes.by_scope.get(scope, []))
        render(
            page,
            "card.html",
            "cards",
            title=card["title"],
            card=card,
            modes=full,
            other_modes=others,
            more_modes=max(0, n_all - len(full) - len(others)),
            mitigation_other=mit_other,
            class_rows=crow[: opts.max_rows],
            more_classes=max(0, len(crow) - opts.max_rows),
            group_rows=grows[: opts.max_rows],
            more_groups=max(0, len(grows) - opts.max_rows),
            has_directions=modes.dirs is not None,
        )
        n, _, top_cv = mode_summary(scope)
        cards.append(
            {
                "href": page,
                "title": card["title"],
                "kind": card["kind"],
                "family": ", ".join(sorted({run.families.get(m, "") for m in mem})),
                **acc,
                "n_modes": n,
                "top_cv": top_cv,
                "classes": ", ".join(sorted({m["cls"] for m in modes.by_scope.get(scope, [])}))[
                    :200
                ],
            }
        )
        n_model_pages += not is_cluster

    # cards page: every card, and every significant mode (strongest first)
    all_modes = sorted(
        (m for s in [*run.models, *scopes] for m in modes.by_scope.get(s, [])),
        key=lambda m: -m["cv"],
    )
    shown = {
        (m["scope"], m["row"])
        for s in [*run.models, *scopes]
        for m in modes.by_scope.get(s, [])[: opts.max_modes]
    }
    index_rows = []
    for m in all_modes[: opts.max_index_rows]:
        fam = run.families.get(m["scope"]) or ", ".join(
            sorted({run.families.get(x, "") for x in members.get(m["scope"], [])})
        )
        anchor = f"#{_safe(m['cls'])}-mode-{m['mode']}" if (m["scope"], m["row"]) in shown else ""
        index_rows.append(
            {
                **m,
                "family": fam,
                "href": _page(m["scope"]) + anchor,
                "title": titles.get(m["scope"], m["scope"]),
                "top_hard": next(
                    iter(modes.captions.get((m["scope"], m["cls"], m["mode"], "hard"), [])), ""
                ),
            }
        )
    render(
        "cards.html",
        "cards.html",
        "cards",
        title="Models and clusters",
        cards=cards,
        modes=index_rows,
        more_rows=max(0, len(all_modes) - len(index_rows)),
    )

    # shared failures
    clusters_ctx = [
        {
            "href": _page(s),
            "title": titles[s],
            "n_modes": len(modes.by_scope.get(s, [])),
            "members": [{"name": m, "href": _page(m)} for m in members[s]],
            "families": ", ".join(sorted({run.families.get(m, "") for m in members[s]})),
        }
        for s in scopes
    ]
    render(
        "shared.html",
        "shared.html",
        "shared",
        title="Shared failures",
        clusters=clusters_ctx,
        **{
            **shared,
            "metric_label": shared.get("metric_label", METRIC_LABELS.get(run.metric, run.metric)),
        },
    )

    # synthetic sets
    sets_ctx, n_syn = [], 0
    for s in modes.sets:
        t = modes.set_table(s["set_id"])
        n_syn += int(s.get("n_images") or 0)
        entry = {
            **s,
            "anchor": _safe(s["set_id"]),
            "scope_href": _page(s["scope"]) if s["scope"] in titles else None,
            "scope_title": titles.get(s["scope"], s["scope"]),
            "prompts": [],
            "shown": 0,
            "missing": "",
            "params": "",
        }
        if t is None:
            entry["missing"] = f"synthetic/{s['set_id']} not found"
        else:
            rows = t.slice(0, opts.max_set_images).to_pylist()
            entry["shown"] = len(rows)
            entry["params"] = rows[0].get("params", "") if rows else ""
            by_prompt: dict[str, list] = {}
            for r in rows:
                by_prompt.setdefault(r["prompt"], []).append(r)
            entry["prompts"] = [
                {"prompt": p, "images": modes.set_thumbs(rs)} for p, rs in by_prompt.items()
            ]
        sets_ctx.append(entry)
    render("sets.html", "sets.html", "sets", title="Synthetic sets", sets=sets_ctx, n_images=n_syn)

    # overview
    m = run.manifest
    order = {name: i for i, name in enumerate(STAGE_ORDER)}
    stages = sorted(
        (m.get("stages") or {}).items(),
        key=lambda kv: (order.get(kv[0], len(order)), kv[1].get("time", "")),
    )
    stage_rows = []
    for name, st in stages:
        status = st.get("status", "")
        line = st.get("line", "")
        if name == "report" and status == "running":
            status, line = "done", "this report"
        stage_rows.append(
            {
                "name": name,
                "status": status,
                "line": line,
                "seconds": st.get("seconds"),
                "time": st.get("time", ""),
                "reason": st.get("reason", ""),
            }
        )
    err = store.errors()
    err_rows = []
    for r in err.slice(0, 200).to_pylist():
        reason = (r.get("reason") or "").strip()
        first = reason.splitlines()[0] if reason else ""
        err_rows.append({**r, "first": first, "reason": reason, "more": reason != first})
    dm = m.get("data") or {}
    classes = list(dm.get("classes") or (data.classes if data is not None else []))
    splits = []
    if data is not None:
        vals, counts = np.unique(data.column("split").astype(str), return_counts=True)
        splits = [(v, int(c)) for v, c in zip(vals, counts, strict=True)]
    zoo_rows = []
    for name in run.models:
        o = overall.get(name) or {}
        n, top, top_cv = mode_summary(name)
        cl = run.clusters.get(name)
        zoo_rows.append(
            {
                "name": name,
                "href": _page(name),
                "family": run.families.get(name, ""),
                "cluster": titles.get(cl, "") if cl else "",
                "cluster_href": _page(cl) if cl else None,
                "acc": o.get("acc"),
                "lo": o.get("lo"),
                "hi": o.get("hi"),
                "n_modes": n,
                "top": top,
                "top_cv": top_cv,
                "gain": gain_of(name),
            }
        )
    render(
        "index.html",
        "index.html",
        "index",
        title="Overview",
        data={
            "n": int(dm.get("n") or (len(data) if data is not None else 0)),
            "n_classes": len(classes),
            "classes": classes[:60],
            "more_classes": max(0, len(classes) - 60),
            "splits": splits,
            "source": dm.get("source", ""),
            "world": bool(dm.get("world_dir")),
            "fit_split": run.fit_split,
            "eval_split": run.eval_split,
        },
        zoo={
            "name": (m.get("zoo") or {}).get("name", ""),
            "models": zoo_rows,
            "n_families": len({run.families.get(x, "") for x in run.models}),
            "n_clusters": len(scopes),
            "missing": [x for x in run.zoo_models if x not in run.models],
        },
        stages=stage_rows,
        errors={"n": err.num_rows, "rows": err_rows},
        n_modes=sum(len(v) for v in modes.by_scope.values()),
        n_directions=modes.n_directions,
        n_synthetic=n_syn,
        n_sets=len(modes.sets),
        has_mitigation=modes.mitigation is not None,
    )

    n_bytes += thumbs.n_bytes + sum(
        len(out.read_bytes(f"figures/{f}")) for f in out.listdir("figures")
    )
    return ReportResult(
        out.path("index.html"), n_model_pages, len(scopes), n_bytes, time.perf_counter() - t0
    )


def build_report(run_dir: str, out_dir: str | None = None, *, data=None, cfg=None) -> str:
    """Write the static HTML report of the run at ``run_dir`` (default into ``RUN/report``);
    returns the path of its ``index.html``. ``cfg``: a ``[report]`` section (or None)."""
    return write_report(RunStore(run_dir), out_dir, data=data, cfg=cfg).index


def report_stage(store: RunStore, inputs, cfg) -> str:
    """Stage: ``report/index.html`` (``[report]`` section). Returns the stage's line."""
    return write_report(store, None, data=inputs.data, cfg=cfg).line()
