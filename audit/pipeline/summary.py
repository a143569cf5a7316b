"""The printed summary of a run, built from its run directory through :class:`RunView` (so a
rerun that skips every stage prints the same summary, and every threshold is the config's)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from audit.view import RunView


def _pts(x: float) -> str:
    return f"{100 * x:.0f} points"


def planted_summary(acc: pa.Table, min_gap: float) -> list[dict]:
    """Per planted group: mean accuracy on the group and on its class across models, and in
    how many models the group is at least ``min_gap`` below its class."""
    out: dict[str, dict] = {}
    for r in acc.to_pylist():
        if r["attribute"] != "group":
            continue
        g = out.setdefault(r["value"], {"group": r["value"], "group_acc": [], "class_acc": []})
        g["group_acc"].append(r["accuracy"])
        g["class_acc"].append(r["class_accuracy"])
    rows = []
    for g in sorted(out.values(), key=lambda g: g["group"]):
        gap = np.asarray(g["class_acc"]) - np.asarray(g["group_acc"])
        rows.append(
            {
                "group": g["group"],
                "group_acc": float(np.mean(g["group_acc"])),
                "class_acc": float(np.mean(g["class_acc"])),
                "shows": int((gap >= min_gap).sum()),
                "models": len(gap),
            }
        )
    return rows


def format_accuracy(view: RunView) -> str:
    """Per-model accuracy and, on a world, the planted groups' accuracy against their class."""
    acc, fam = view.table("accuracy.parquet"), view.families
    lines = [f"Accuracy per model ({view.fit_split} split):"]
    for r in acc.to_pylist():
        if r["class"] == "*":
            lines.append(f"  {r['model']:22s} {fam.get(r['model'], ''):10s} {r['accuracy']:6.1%}")
    groups = planted_summary(acc, view.min_gap)
    if groups:
        lines.append(
            "\nPlanted failure modes (mean over models; 'shows' = models with the group "
            f"{_pts(view.min_gap)} or more below its class):"
        )
        lines.append(f"  {'group':32s} {'group acc':>9s} {'class acc':>9s}  shows")
        for g in groups:
            lines.append(
                f"  {g['group']:32s} {g['group_acc']:9.1%} {g['class_acc']:9.1%}  "
                f"{g['shows']}/{g['models']}"
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
        "Failure directions shared across the zoo: mean cosine between two models' directions "
        f"for the same class {np.mean(within):.2f} within a family vs {np.mean(between):.2f} "
        "between families"
    )


def _strongest_by_group(
    dirs: pa.Table, families: Mapping[str, str], names: Mapping[tuple, dict]
) -> dict[str, list[dict]]:
    """Significant modes per cluster or family: named ones first, by how much their named
    subpopulation fails, then by strength (by strength alone before the name stage)."""
    from audit.naming import worst_first

    by_group: dict[str, list] = {}
    for r in dirs.to_pylist():
        if r["status"] == "ok":
            s = r["scope"]
            by_group.setdefault(s if s.startswith("cluster:") else families.get(s, s), []).append(r)

    def key(r):
        nm = names.get((r["scope"], r["class"], r["mode"]))
        return worst_first(nm) if nm else (True, -r["cv_score"])

    return {g: sorted(rs, key=key) for g, rs in sorted(by_group.items())}


def _name_line(nm: dict | None) -> list[str]:
    """The mode's name (modes.parquet): the caption that fails, or why it has none."""
    if nm is None:
        return []
    check = (
        f"{nm['accuracy_on_nearest']:.0%} [{nm['ci_low']:.0%}, {nm['ci_high']:.0%}] vs class "
        f"{nm['class_accuracy']:.0%} on {nm['n_checked']} eval images ({nm['checked_on']})"
    )
    if nm["named"]:
        return [f"      name: {nm['caption']!r}  {check}"]
    why = "no caption fails"
    if nm.get("undecided"):
        more = nm.get("images_to_decide")
        why = "too few images to tell" + (f"; about {more} would, at this accuracy" if more else "")
    return [f"      name: unnamed ({why})  {check}"]


def _mode_lines(r: dict, caps_by: dict, sub: dict, names: dict) -> list[str]:
    lines = [
        f"    {r['scope']:18s} {r['class']:10s} mode {r['mode']}  cv {r['cv_score']:.2f}  "
        f"p={r['p_value']:.3f} q={r.get('q_value', float('nan')):.3f}"
    ]
    lines += _name_line(names.get((r["scope"], r["class"], r["mode"])))
    for pol in ("hard", "easy"):
        top = sorted(
            caps_by.get((r["scope"], r["class"], r["mode"], pol), []), key=lambda c: c["rank"]
        )
        for c in top[:1]:
            s = sub.get((r["scope"], r["class"], c["caption"]))
            acc = (
                f"  nearest {s['accuracy_on_nearest']:.0%} vs class {s['class_accuracy']:.0%}"
                if s
                else ""
            )
            lines.append(f"      {pol:4s}: {c['caption']!r}{acc}")
    return lines


def format_planted_naming(planted: pa.Table, min_gap: float) -> str:
    """How the audit's names and directions compare with the planted truth (an oracle check:
    only a dataset with planted groups has it)."""
    from audit.planted import summarize_planted

    lines = [f"\nAgainst the planted truth (groups {_pts(min_gap)} or more below their class):"]
    for scoring in dict.fromkeys(planted["caption_scoring"].to_pylist()):
        s = summarize_planted(planted.filter(pc.equal(planted["caption_scoring"], scoring)))
        lines.append(
            f"  captions scored on {scoring:6s}: the top-1 hard caption names the planted "
            f"attribute for {s['named_share']:.1%} of {s['pairs']} (model, group) pairs"
        )
    lines.append(
        "  ranking a class's images by the direction finds the planted group with precision "
        f"{s['precision_svm']:.2f} at the number of errors, vs {s['precision_confidence']:.2f} "
        "ranking by the model's confidence"
    )
    return "\n".join(lines)


def format_directions(view: RunView, per_family: int = 1) -> str:
    """The strongest failure modes per family (or cluster), with captions and nearest-image accuracy."""
    sub = {
        (r["scope"], r["class"], r["caption"]): r
        for r in view.table("subpopulations.parquet").to_pylist()
    }
    caps_by: dict[tuple, list] = {}
    for r in view.table("captions.parquet").to_pylist():
        caps_by.setdefault((r["scope"], r["class"], r["mode"], r["polarity"]), []).append(r)
    from audit.naming import by_mode

    names = by_mode(view.table("modes.parquet"))
    lines = [
        "Worst failure modes (named ones by how much their name fails, then by CV score, the",
        "SVM's balanced accuracy; the name is the most general caption that fails on the eval",
        "split, or unnamed; top hard / easy captions with the accuracy on their",
        f"{view.config.directions.k} nearest eval images vs the class):",
    ]
    groups = _strongest_by_group(view.table("directions.parquet"), view.families, names)
    for g, rows in groups.items():
        lines.append(f"  {g}:")
        for r in rows[:per_family]:
            lines += _mode_lines(r, caps_by, sub, names)
    sim = view.table("direction_similarity.parquet")
    if sim is not None and (line := format_direction_similarity(sim, view.families)):
        lines.append("\n" + line)
    planted = view.table("planted.parquet")
    if planted is not None and planted.num_rows:
        lines.append(format_planted_naming(planted, view.min_gap))
    names = view.table("planted_names.parquet")
    if names is not None and names.num_rows:
        lines.append(format_named_planted(names))
    return "\n".join(lines)


def format_named_planted(names: pa.Table) -> str:
    """How the modes' names (the most general captions that fail as much) compare with the
    planted truth: named and naming the planted value, or unnamed."""
    rows = names.to_pylist()
    named = [r for r in rows if r["named"]]
    right = sum(bool(r["caption_names_group"]) for r in named)
    few = sum(bool(r.get("undecided")) for r in rows)
    zoo = sum(bool(r["caption_names_group"] or r.get("zoo_caption")) for r in rows)
    return (
        f"  the mode's name (the most general caption that fails as much) names the planted value "
        f"for {right} of {len(rows)} pairs ({right / len(rows):.1%}); {len(rows) - len(named)} "
        "reported unnamed"
        + (f" ({few} of them: too few eval images to tell)" if few else "")
        + f"; with the zoo's names each model fails (shared_names.parquet): {zoo} of {len(rows)}"
    )


def format_sets(table: pa.Table) -> str:
    """The clusters' shared sets with their captions; the per-model and probe sets in one line."""
    from audit.synthetic import is_oracle

    rows = table.to_pylist()
    lines = ["Shared synthetic sets (one per cluster and generator, k images per named caption):"]
    for r in rows:
        if r["scope"].startswith("cluster:"):
            gen = f"{r['generator']}{' (oracle)' if is_oracle(r['generator']) else ''}"
            lines.append(f"  {r['scope']:10s} {gen:22s} {r['n_images']:3d} images  {r['captions']}")
    own = [r for r in rows if not r["scope"].startswith("cluster:")]
    if own:
        lines.append(
            f"  and {len(own)} more sets (each model's hard captions, the probe set): "
            f"{sum(r['n_images'] for r in own):,} images"
        )
    return "\n".join(lines)


def _method_line(label: str, rs: list[dict], width: int = 28) -> str:
    def mean(k: str) -> float:
        return float(np.nanmean([r[k] for r in rs]))

    change = [r["overall_after"] - r["overall_before"] for r in rs]
    return (
        f"  {label:{width}s} {len(rs):5d} {mean('hard_before'):11.1%} {mean('hard_after'):10.1%} "
        f"{100 * mean('gain'):+7.1f} [{100 * mean('gain_ci_low'):+5.1f}, "
        f"{100 * mean('gain_ci_high'):+5.1f}] {100 * float(np.mean(change)):+7.2f} "
        f"(worst {100 * min(change):+.2f})"
    )


def _eval_kind(table: pa.Table) -> str:
    kinds = set(table["eval"].to_pylist())
    return next(
        k for k in ("planted", "attribute_group", "nearest_caption", "direction") if k in kinds
    )


HARD_OF = {
    "planted": "the planted group",
    "attribute_group": "the class's eval images with the named caption's attributes",
    "nearest_caption": "nearest images of the named caption",
    "direction": "the eval images the direction finds hardest",
}


def oracle_line(by: dict[tuple[str, str], list[dict]]) -> str:
    """The oracle figure (the data's own generator) beside the best a user's generator gives."""
    from audit.synthetic import ORACLE_NOTE, is_oracle

    def gain(key):
        return float(np.nanmean([r["gain"] for r in by[key]]))

    syn = [k for k in by if k[0] in ("synthetic", "synthetic_cluster") and k[1]]
    oracle = [k for k in syn if is_oracle(k[1])]
    real = [k for k in syn if not is_oracle(k[1])]
    parts = []
    if oracle:
        best = max(oracle, key=gain)
        parts.append(f"{best[0]} with {best[1]} {100 * gain(best):+.1f} ({ORACLE_NOTE})")
    if real:
        best = max(real, key=gain)
        parts.append(
            f"best without the data's own generator: {best[0]} with {best[1]} {100 * gain(best):+.1f}"
        )
    return ("  " + "; ".join(parts)) if parts else ""


def format_mitigation(view: RunView) -> str:
    """Mean gain per method and generator on the eval split's hard subpopulations, the worst
    overall drop, the oracle figure beside the best real one, and what the clusters' shared
    sets keep of the per-model gain."""
    from audit.synthetic import is_oracle

    table = view.table("mitigation.parquet")
    kind = _eval_kind(table)
    ci = f"{view.config.stats.ci:.0%}"
    lines = [
        f"Mitigation on the held-out eval split (hard = {HARD_OF[kind]}; heads retrained on cached "
        f"features; gain in points with mean {ci} interval):",
    ]
    by: dict[tuple[str, str], list[dict]] = {}
    for r in table.to_pylist():
        if r["eval"] == kind:
            by.setdefault((r["method"], r.get("generator") or ""), []).append(r)
    labels = {
        k: f"{k[0]} ({k[1]}{', oracle' if is_oracle(k[1]) else ''})" if k[1] else k[0] for k in by
    }
    w = max([28, *map(len, labels.values())])
    lines.append(
        f"  {'method (generator)':{w}s} {'pairs':>5s} {'hard before':>11s} {'hard after':>10s} "
        f"{'gain':>7s} {'interval':>15s} {'overall change':>14s}"
    )
    for k, rs in by.items():
        lines.append(_method_line(labels[k], rs, w))
    if line := oracle_line(by):
        lines.append(line)
    for g in dict.fromkeys(g for _, g in by if g):
        own, shared = by.get(("synthetic", g)), by.get(("synthetic_cluster", g))
        if own and shared and (o := float(np.nanmean([r["gain"] for r in own]))) > 0:
            kept = float(np.nanmean([r["gain"] for r in shared])) / o
            lines.append(f"  the clusters' shared sets ({g}) keep {kept:.0%} of the per-model gain")
    return "\n".join(lines)


def format_confirmations(view: RunView) -> str:
    """How many hard captions generation confirms, and (with planted truth) how many of the
    planted modes the audit names."""
    from audit.synthetic import generator_label

    c = view.table("confirmations.parquet").to_pylist()
    parts = []
    for gen in dict.fromkeys(r.get("generator") or "" for r in c):
        ok = [r["confirmed"] for r in c if (r.get("generator") or "") == gen]
        parts.append(
            f"{sum(ok)} of {len(ok)} ({np.mean(ok):.0%}) with {generator_label(gen) or 'its generator'}"
        )
    line = (
        f"Confirmed by generation (the named caption's images fail at least {_pts(view.min_gap)} "
        f"more than a typical caption's of the class): {'; '.join(parts)}"
    )
    cf = [
        r["counterfactual_delta"]
        for r in c
        if r["confirmed"] and r["counterfactual_delta"] == r["counterfactual_delta"]
    ]
    if cf:
        line += f"; swapping the attribute word back recovers {100 * float(np.mean(cf)):+.1f} points on average"
    lines = [line]
    planted = view.table("planted_names.parquet")
    if planted is not None and planted.num_rows:
        from audit.synthetic import generator_label

        named = {
            (r["model"], r["caption"]) for r in planted.to_pylist() if r["caption_names_group"]
        }
        for gen in dict.fromkeys(r.get("generator") or "" for r in c):
            conf_by = {
                (r["scope"], r["caption"]): r["confirmed"]
                for r in c
                if (r.get("generator") or "") == gen
            }
            hits = [conf_by[k] for k in named if k in conf_by]
            if hits:
                lines.append(
                    f"  planted modes the audit names, confirmed with {generator_label(gen) or 'its generator'}: "
                    f"{sum(hits)} of {len(hits)} ({np.mean(hits):.0%})"
                )
    return "\n".join(lines)


def run_summary(view: RunView) -> str:
    """Every part whose tables exist in the run, in stage order."""
    from audit.failures import format_stats
    from audit.shared_names import format_shared_names

    parts = []
    if view.has("accuracy.parquet"):
        parts.append(format_accuracy(view))
    if view.has("clusters.parquet"):
        t = {n: view.table(f"{n}.parquet") for n in ("overlap", "clusters", "family_similarity")}
        stats = view.config.stats
        parts.append(
            format_stats(
                t["overlap"], t["clusters"], t["family_similarity"], stats.similarity, ci=stats.ci
            )
        )
    if view.has("captions.parquet") and view.has("subpopulations.parquet"):
        parts.append(format_directions(view))
    if line := format_shared_names(view.table("shared_names.parquet")):
        parts.append(line)
    if view.has("synthetic_sets.parquet"):
        parts.append(format_sets(view.table("synthetic_sets.parquet")))
    mit = view.table("mitigation.parquet")
    if mit is not None and mit.num_rows:
        parts.append(format_mitigation(view))
    conf = view.table("confirmations.parquet")
    if conf is not None and conf.num_rows:
        parts.append(format_confirmations(view))
    return "\n\n".join(parts)
