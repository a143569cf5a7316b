"""The printed summary of a run, built from the tables in its run directory (so a rerun
that skips every stage prints the same summary)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from audit.store import RunStore


def planted_summary(acc: pa.Table, threshold: float = 0.15) -> list[dict]:
    """Per planted group: mean accuracy on the group and on its class across models."""
    out: dict[str, dict] = {}
    for r in acc.to_pylist():
        if r["attribute"] != "group":
            continue
        g = out.setdefault(
            r["value"],
            {"group": r["value"], "group_acc": [], "class_acc": [], "shows": 0, "models": 0},
        )
        g["group_acc"].append(r["accuracy"])
        g["class_acc"].append(r["class_accuracy"])
        g["models"] += 1
        g["shows"] += int(r["class_accuracy"] - r["accuracy"] >= threshold)
    return [
        {
            **g,
            "group_acc": float(np.mean(g["group_acc"])),
            "class_acc": float(np.mean(g["class_acc"])),
        }
        for g in sorted(out.values(), key=lambda g: g["group"])
    ]


def format_accuracy(acc: pa.Table, families: Mapping[str, str], split: str) -> str:
    """Per-model accuracy and, on a world, the planted groups' accuracy against their class."""
    lines = [f"Accuracy per model ({split} split):"]
    for r in acc.to_pylist():
        if r["class"] == "*":
            lines.append(
                f"  {r['model']:22s} {families.get(r['model'], ''):10s} {r['accuracy']:6.1%}"
            )
    groups = planted_summary(acc)
    if groups:
        lines.append(
            "\nPlanted failure modes (mean over models; 'shows' = models with group >= 15 points below class):"
        )
        lines.append(f"  {'group':32s} {'group acc':>9s} {'class acc':>9s}  shows")
        for g in groups:
            lines.append(
                f"  {g['group']:32s} {g['group_acc']:9.1%} {g['class_acc']:9.1%}  {g['shows']}/{g['models']}"
            )
    return "\n".join(lines)


def format_direction_similarity(sim: pa.Table, families: Mapping[str, str]) -> str:
    """Mean cosine between two models' mode-0 directions for the same class, within vs
    between families: how much of a failure mode the zoo shares."""
    within, between = [], []
    for r in sim.to_pylist():
        a, b = r["scope_a"], r["scope_b"]
        if a == b or a not in families or b not in families:
            continue
        (within if families[a] == families[b] else between).append(r["cosine"])
    if not within or not between:
        return ""
    return (
        f"Failure directions shared across the zoo: mean cosine between two models' directions for the same "
        f"class {np.mean(within):.2f} within a family vs {np.mean(between):.2f} between families"
    )


def format_directions(
    dirs: pa.Table,
    caps: pa.Table,
    subs: pa.Table,
    planted: pa.Table | None,
    families: Mapping[str, str] | None = None,
    per_family: int = 1,
    sim: pa.Table | None = None,
    k: int = 50,
) -> str:
    """The strongest failure modes per family (or cluster), with captions and nearest-image accuracy."""
    families = families or {}
    sub = {(r["scope"], r["class"], r["caption"]): r for r in subs.to_pylist()}
    caps_by: dict[tuple, list] = {}
    for r in caps.to_pylist():
        caps_by.setdefault((r["scope"], r["class"], r["mode"], r["polarity"]), []).append(r)
    by_group: dict[str, list] = {}
    for r in dirs.to_pylist():
        if r["status"] == "ok":
            g = (
                r["scope"]
                if r["scope"].startswith("cluster:")
                else families.get(r["scope"], r["scope"])
            )
            by_group.setdefault(g, []).append(r)
    lines = [
        "Strongest failure modes (CV score = balanced accuracy of the SVM; hard / easy captions;",
        f"accuracy on the {k} nearest eval images vs the class):",
    ]
    for g in sorted(by_group):
        lines.append(f"  {g}:")
        for r in sorted(by_group[g], key=lambda r: -r["cv_score"])[:per_family]:
            lines.append(
                f"    {r['scope']:18s} {r['class']:10s} mode {r['mode']}  cv {r['cv_score']:.2f}  "
                f"p={r['p_value']:.3f} q={r.get('q_value', float('nan')):.3f}"
            )
            for pol in ("hard", "easy"):
                for c in sorted(
                    caps_by.get((r["scope"], r["class"], r["mode"], pol), []),
                    key=lambda c: c["rank"],
                )[:1]:
                    s = sub.get((r["scope"], r["class"], c["caption"]))
                    acc = (
                        f"  nearest {s['accuracy_on_nearest']:.0%} vs class {s['class_accuracy']:.0%}"
                        if s
                        else ""
                    )
                    lines.append(f"      {pol:4s}: {c['caption']!r}{acc}")
    if sim is not None and families:
        line = format_direction_similarity(sim, families)
        if line:
            lines.append("\n" + line)
    if planted is not None and planted.num_rows:
        from audit.planted import summarize_planted

        lines.append("\nAgainst the planted truth (groups at least 15 points below their class):")
        for scoring in dict.fromkeys(planted["caption_scoring"].to_pylist()):
            s = summarize_planted(planted.filter(pc.equal(planted["caption_scoring"], scoring)))
            lines.append(
                f"  captions scored on {scoring:6s}: the top-1 hard caption names the planted attribute for "
                f"{s['named_share']:.1%} of {s['pairs']} (model, group) pairs"
            )
        lines.append(
            f"  ranking a class's images by the direction finds the planted group with precision "
            f"{s['precision_svm']:.2f} at the number of errors, vs {s['precision_confidence']:.2f} "
            "ranking by the model's confidence"
        )
    return "\n".join(lines)


def format_sets(table: pa.Table) -> str:
    """The clusters' shared sets with their captions; the per-model and probe sets in one line."""
    rows = table.to_pylist()
    lines = ["Shared synthetic sets (one per cluster, k images per hard caption):"]
    for r in rows:
        if r["scope"].startswith("cluster:"):
            lines.append(
                f"  {r['scope']:10s} {r['set_id']:28s} {r['n_images']:3d} images  {r['captions']}"
            )
    own = [r for r in rows if not r["scope"].startswith("cluster:")]
    if own:
        lines.append(
            f"  and {len(own)} more sets (each model's hard captions, the probe set): "
            f"{sum(r['n_images'] for r in own):,} images"
        )
    return "\n".join(lines)


def format_mitigation(
    table: pa.Table, conf: pa.Table | None, planted: pa.Table | None = None
) -> str:
    """Mean gain per method on the eval split's hard subpopulations, the worst overall drop,
    what the clusters' shared sets keep of the per-model gain, and the confirmation rate."""
    kind = "planted" if "planted" in set(table["eval"].to_pylist()) else "nearest_caption"
    rows = [r for r in table.to_pylist() if r["eval"] == kind]
    lines = [
        f"Mitigation on the held-out eval split (hard = {'the planted group' if kind == 'planted' else 'nearest images of the hard caption'};"
        " heads retrained on cached features; gain in points with mean 95% interval):",
        f"  {'method':18s} {'pairs':>5s} {'hard before':>11s} {'hard after':>10s} {'gain':>7s} {'interval':>15s} {'overall change':>14s}",
    ]
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    for m, rs in by.items():
        f = lambda k, rs=rs: float(np.nanmean([r[k] for r in rs]))  # noqa: E731
        worst = min(r["overall_after"] - r["overall_before"] for r in rs)
        lines.append(
            f"  {m:18s} {len(rs):5d} {f('hard_before'):11.1%} {f('hard_after'):10.1%} {100 * f('gain'):+7.1f} "
            f"[{100 * f('gain_ci_low'):+5.1f}, {100 * f('gain_ci_high'):+5.1f}] "
            f"{100 * float(np.mean([r['overall_after'] - r['overall_before'] for r in rs])):+7.2f} (worst {100 * worst:+.2f})"
        )
    if by.get("synthetic") and by.get("synthetic_cluster"):
        own = float(np.nanmean([r["gain"] for r in by["synthetic"]]))
        shared = float(np.nanmean([r["gain"] for r in by["synthetic_cluster"]]))
        if own > 0:
            lines.append(
                f"  the clusters' shared sets keep {shared / own:.0%} of the per-model gain"
            )
    if conf is not None and conf.num_rows:
        c = conf.to_pylist()
        n_ok = sum(r["confirmed"] for r in c)
        cf = [
            r["counterfactual_delta"]
            for r in c
            if r["confirmed"] and r["counterfactual_delta"] == r["counterfactual_delta"]
        ]
        line = f"Confirmed by generation: {n_ok} of {len(c)} hard captions ({n_ok / len(c):.0%}) fail at least 15 points more than the easy caption"
        if cf:
            line += f"; swapping the attribute word back recovers {100 * float(np.mean(cf)):+.1f} points on average"
        lines.append(line)
        if planted is not None and planted.num_rows:
            named = {
                (r["model"], r["top_hard_caption"])
                for r in planted.to_pylist()
                if r.get("caption_names_group") and r.get("caption_scoring") == "images"
            }
            conf_by = {(r["scope"], r["caption"]): r["confirmed"] for r in c}
            hits = [conf_by[k] for k in named if k in conf_by]
            if hits:
                lines.append(
                    f"  planted modes the audit names: {sum(hits)} of {len(hits)} confirmed ({np.mean(hits):.0%})"
                )
    return "\n".join(lines)


def run_summary(store: RunStore, inputs) -> str:
    """Every part whose tables exist in the run, in stage order."""
    from audit.pipeline.stats import stats_summary

    fam = inputs.families
    parts = []
    if store.exists("accuracy.parquet"):
        parts.append(format_accuracy(store.read_table("accuracy.parquet"), fam, inputs.fit_split))
    if store.exists("clusters.parquet"):
        parts.append(stats_summary(store, inputs.config.stats))
    if store.exists("captions.parquet") and store.exists("subpopulations.parquet"):
        planted = store.read_table("planted.parquet") if store.exists("planted.parquet") else None
        parts.append(
            format_directions(
                store.read_table("directions.parquet"),
                store.read_table("captions.parquet"),
                store.read_table("subpopulations.parquet"),
                planted,
                fam,
                sim=store.read_table("direction_similarity.parquet"),
                k=inputs.config.directions.k,
            )
        )
    if store.exists("synthetic_sets.parquet"):
        parts.append(format_sets(store.read_table("synthetic_sets.parquet")))
    if store.exists("mitigation.parquet") and store.read_table("mitigation.parquet").num_rows:
        conf = (
            store.read_table("confirmations.parquet")
            if store.exists("confirmations.parquet")
            else None
        )
        planted = store.read_table("planted.parquet") if store.exists("planted.parquet") else None
        parts.append(format_mitigation(store.read_table("mitigation.parquet"), conf, planted))
    return "\n\n".join(parts)
