"""The shared-failures page: the overlap heatmap and dendrogram, error consistency, and
within- vs between-family similarity with bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from audit.bootstrap import bootstrap_mean_ci
from audit.report.common import METRIC_LABELS, _f, _page
from audit.report.context import ReportContext
from audit.report.site import Site


def _ec_mean(ec: np.ndarray, lo: np.ndarray, hi: np.ndarray, mask: np.ndarray) -> tuple:
    """Mean error consistency over the pairs in ``mask`` with a bootstrap interval over pairs;
    a single pair keeps its own interval (its bootstrap over examples)."""
    v = ec[mask]
    ok = np.isfinite(v)
    if ok.sum() == 1:
        return float(v[ok][0]), float(lo[mask][ok][0]), float(hi[mask][ok][0])
    return bootstrap_mean_ci(v)


def _matrices(ov: pa.Table, names: list[str], metric: str) -> tuple[np.ndarray, ...]:
    """``(similarity [n, n], error consistency, its low, its high)`` from ``overlap.parquet``."""
    d = ov.to_pydict()
    pos = {m: i for i, m in enumerate(names)}
    n = len(names)
    s, ec, lo, hi = (np.full((n, n), np.nan) for _ in range(4))
    for i in range(ov.num_rows):
        a, b = pos.get(d["model_a"][i]), pos.get(d["model_b"][i])
        if a is not None and b is not None:
            s[a, b] = _f(d[metric][i])
            ec[a, b], lo[a, b], hi[a, b] = (
                _f(d[k][i]) for k in ("error_consistency", "ci_low", "ci_high")
            )
    sym = (s + s.T) / 2 if metric == "shared_fraction" else np.where(np.isnan(s), s.T, s)
    sim = np.nan_to_num(sym, nan=0.0)
    np.fill_diagonal(sim, 1.0)
    return sim, ec, lo, hi


def _family_rows(sim, ec, lo, hi, fams: list[str]) -> tuple[list[dict], list[dict]]:
    """Per family: the table's row and the figure's row (similarities within and between)."""
    n = len(fams)
    F = np.asarray(fams, dtype=object)
    off = ~np.eye(n, dtype=bool)
    ec_sym, lo_sym, hi_sym = (np.where(np.isnan(x), x.T, x) for x in (ec, lo, hi))
    rows, fig_rows = [], []
    for f in sorted(set(fams)):
        inside = F == f
        within = np.triu(inside[:, None] & inside[None, :], 1)
        between = inside[:, None] & ~inside[None, :] & off
        w, b = bootstrap_mean_ci(sim[within]), bootstrap_mean_ci(sim[between])
        fig_rows.append(
            {"family": f, "within": sim[within].tolist(), "between": sim[between].tolist()}
            | dict(zip(("within_mean", "within_lo", "within_hi"), w, strict=True))
            | dict(zip(("between_mean", "between_lo", "between_hi"), b, strict=True))
        )
        rows.append(
            {"family": f, "n_models": int(inside.sum()), "gap": w[0] - b[0]}
            | dict(zip(("within", "within_lo", "within_hi"), w, strict=True))
            | dict(zip(("between", "between_lo", "between_hi"), b, strict=True))
            | {
                "ec_within": _ec_mean(ec_sym, lo_sym, hi_sym, within),
                "ec_between": _ec_mean(ec_sym, lo_sym, hi_sym, between),
            }
        )
    return rows, fig_rows


def shared_figures(ctx: ReportContext, site: Site) -> dict:
    """Writes the figures; returns the page's context (empty without overlap statistics)."""
    from audit.report import figures

    view = ctx.view
    ov = view.table("overlap.parquet")
    if ov is None or not ov.num_rows:
        return {"heatmap": None, "families": []}
    pairs = set(ov["model_a"].to_pylist()) | set(ov["model_b"].to_pylist())
    names = [m for m in view.models if m in pairs]
    stats = view.config.stats
    metric = stats.similarity if stats.similarity in ov.column_names else "jaccard"
    label = METRIC_LABELS.get(metric, metric)
    sim, ec, lo, hi = _matrices(ov, names, metric)
    z, order = figures.linkage_order(sim, stats.method)
    fams = [view.families.get(m, "") for m in names]
    heat = figures.heatmap_png(sim, names, order, view.families, view.clusters, label)
    site.write("figures/heatmap.png", heat)
    site.write("figures/dendrogram.png", figures.dendrogram_png(z, names, view.families, label))
    iu = np.triu_indices(len(names), 1)
    same = np.asarray([fams[i] == fams[j] for i, j in zip(*iu, strict=True)], bool)
    ok = np.isfinite(ec[iu])
    cons = figures.consistency_png(ec[iu][ok], lo[iu][ok], hi[iu][ok], same[ok])
    site.write("figures/consistency.png", cons)
    rows, fig_rows = _family_rows(sim, ec, lo, hi, fams)
    site.write("figures/families.png", figures.family_png(fig_rows, label))
    return {
        "heatmap": "figures/heatmap.png",
        "dendrogram": "figures/dendrogram.png",
        "families_fig": "figures/families.png",
        "consistency_fig": "figures/consistency.png",
        "families": rows,
        "metric_label": label,
    }


def write_shared(ctx: ReportContext, site: Site) -> None:
    view, titles = ctx.view, ctx.titles
    clusters = [
        {
            "href": _page(s),
            "title": titles[s],
            "n_modes": len(ctx.modes.by_scope.get(s, [])),
            "members": [{"name": m, "href": _page(m)} for m in ctx.members[s]],
            "families": ctx.families_of(s),
        }
        for s in ctx.scopes
    ]
    page = shared_figures(ctx, site) | {"names": named_across_zoo(view)}
    metric = view.config.stats.similarity
    page.setdefault("metric_label", METRIC_LABELS.get(metric, metric))
    site.render(
        "shared.html", "shared.html", "shared", title="Shared failures", clusters=clusters, **page
    )


def named_across_zoo(view) -> list[dict]:
    """The rows of the "named failures across the zoo" table (``shared_names.parquet``): per
    name, the models that fail it (worst first, with a link to each card) and those whose
    own modes hold it."""
    from audit.shared_names import shared_counts

    rows = []
    for d in shared_counts(view.table("shared_names.parquet")):
        fails = [
            {"model": r["model"], "href": _page(r["model"]), "own": r["own"]}
            | {k: r[k] for k in ("accuracy", "ci_low", "ci_high", "class_accuracy")}
            for r in d["fails"]
        ]
        rows.append(d | {"fails": fails, "beyond": sum(not f["own"] for f in fails)})
    return rows
