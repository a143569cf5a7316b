"""One page per model and per cluster (its failure modes with images, captions, checks and
fixes), and the cards page that lists them all with every significant mode."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from audit.report.common import _page
from audit.report.context import ReportContext
from audit.report.images import _safe
from audit.report.modes import name_label
from audit.report.site import Site

NONE = {"acc": None, "lo": None, "hi": None}


def _cluster_accuracy(ctx: ReportContext, mem: list[str]) -> tuple[dict, list[dict]]:
    """A cluster's mean accuracy (range over members) and its per-class rows."""
    rows = [ctx.overall[m] for m in mem if m in ctx.overall]
    acc = NONE
    if rows:
        a = [r["acc"] for r in rows]
        acc = {"acc": float(np.mean(a)), "lo": min(a), "hi": max(a)}
    per = defaultdict(list)
    for m in mem:
        for r in ctx.class_acc.get(m, []):
            per[r["cls"]].append(r)
    crow = []
    for c, rs in per.items():
        a = [r["acc"] for r in rs]
        crow.append(
            {"cls": c, "n": rs[0]["n"], "acc": float(np.mean(a)), "lo": min(a), "hi": max(a)}
        )
    return acc, crow


def _accuracy_of(ctx: ReportContext, scope: str, mem: list[str]) -> tuple[dict, list, list]:
    """``(accuracy, class rows worst first, attribute-group rows largest drop first)``."""
    if scope.startswith("cluster:"):
        acc, crow, grows = *_cluster_accuracy(ctx, mem), []
    else:
        o = ctx.overall.get(scope)
        acc = {k: o[k] for k in ("acc", "lo", "hi")} if o else NONE
        crow = list(ctx.class_acc.get(scope, []))
        grows = sorted(ctx.group_acc.get(scope, []), key=lambda r: r["gap"])
    return acc, sorted(crow, key=lambda r: r["acc"]), grows


def _card(ctx: ReportContext, scope: str, mem: list[str], acc: dict, crow, grows) -> dict:
    view, titles = ctx.view, ctx.titles
    is_cluster = scope.startswith("cluster:")
    cl = view.clusters.get(scope)
    set_row = {s["scope"]: s for s in ctx.modes.sets}.get(scope if is_cluster else cl)
    return {
        "kind": "cluster" if is_cluster else "model",
        "name": scope,
        "title": titles[scope] if is_cluster else scope,
        "family": view.families.get(scope, ""),
        "cluster_href": f"../{_page(cl)}" if cl else None,
        "cluster_title": titles.get(cl, cl),
        "peers": ", ".join(m for m in ctx.members.get(cl, []) if m != scope) or "no other model",
        "members": [
            {"name": m, "href": f"../{_page(m)}", "family": view.families.get(m, "")} for m in mem
        ],
        "n_modes": len(ctx.modes.by_scope.get(scope, [])),
        **acc,
        "worst_class": crow[0] if crow else None,
        "worst_group": grows[0] if grows else None,
        "set_href": f"../sets.html#{_safe(set_row['set_id'])}" if set_row else None,
        "set_images": set_row["n_images"] if set_row else 0,
        "set_scope": titles.get(set_row["scope"], "") if set_row else "",
    }


def _shared_missed(ctx: ReportContext, model: str) -> list[dict]:
    """The zoo's names that ``model`` fails and its own modes do not hold, worst first."""
    import pyarrow.compute as pc

    t = ctx.view.table("shared_names.parquet")
    if t is None:
        return []
    mine = pc.and_(pc.equal(t["model"], model), pc.and_(t["fails"], pc.invert(t["own"])))
    rows = t.filter(mine).to_pylist()  # one page of 40: not the whole table per page
    return sorted(rows, key=lambda r: r["accuracy"] - r["class_accuracy"])


def write_card(ctx: ReportContext, site: Site, scope: str) -> dict:
    """Write one model's or cluster's page; returns its row for the cards page."""
    mem = ctx.members[scope] if scope.startswith("cluster:") else [scope]
    page, opts = _page(scope), ctx.opts
    full, others, mit_other = ctx.modes.card_modes(scope, mem, page)
    acc, crow, grows = _accuracy_of(ctx, scope, mem)
    card = _card(ctx, scope, mem, acc, crow, grows)
    n_all = len(ctx.modes.by_scope.get(scope, []))
    site.render(
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
        has_directions=ctx.modes.dirs is not None,
        shared_missed=_shared_missed(ctx, scope),
    )
    n, _, top_cv = ctx.mode_summary(scope)
    classes = sorted({m["cls"] for m in ctx.modes.by_scope.get(scope, [])})
    return {
        "href": page,
        "title": card["title"],
        "kind": card["kind"],
        "family": ", ".join(sorted({ctx.view.families.get(m, "") for m in mem})),
        **acc,
        "n_modes": n,
        "top_cv": top_cv,
        "classes": ", ".join(classes)[:200],
    }


def _mode_rows(ctx: ReportContext, scopes: list[str]) -> tuple[list[dict], int]:
    """Every significant mode, strongest first (at most ``max_index_rows``), and how many more."""
    modes, opts, titles = ctx.modes, ctx.opts, ctx.titles
    all_modes = sorted(
        (m for s in scopes for m in modes.by_scope.get(s, [])), key=lambda m: -m["cv"]
    )
    shown = {
        (m["scope"], m["row"]) for s in scopes for m in modes.by_scope.get(s, [])[: opts.max_modes]
    }
    rows = []
    for m in all_modes[: opts.max_index_rows]:
        anchor = f"#{_safe(m['cls'])}-mode-{m['mode']}" if (m["scope"], m["row"]) in shown else ""
        hard = modes.captions.get((m["scope"], m["cls"], m["mode"], "hard"), [])
        named = name_label(modes.names.get((m["scope"], m["cls"], m["mode"])))
        rows.append(
            {
                **m,
                "family": ctx.families_of(m["scope"]),
                "href": _page(m["scope"]) + anchor,
                "title": titles.get(m["scope"], m["scope"]),
                "top_hard": hard[0] if hard else "",
                "name": named,
            }
        )
    return rows, max(0, len(all_modes) - len(rows))


def write_cards(ctx: ReportContext, site: Site) -> int:
    """Every model's and cluster's page, then the cards page; returns the number of model pages."""
    scopes = [*ctx.view.models, *ctx.scopes]
    cards = [write_card(ctx, site, s) for s in scopes]
    rows, more = _mode_rows(ctx, scopes)
    title = "Models and clusters"
    site.render(
        "cards.html", "cards.html", "cards", title=title, cards=cards, modes=rows, more_rows=more
    )
    return len(ctx.view.models)
