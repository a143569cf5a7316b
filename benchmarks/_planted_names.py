"""The planted-naming measures of ``bench_generators.py``: per failing (model, planted group)
pair, whether the run names it (by the model's own modes, or by a zoo name it fails), from the
run's tables through RunView. Oracle measurements: only planted data has the truth."""

from __future__ import annotations

import numpy as np


def names_of(view) -> list[dict]:
    """Per failing (model, planted group): its mode named by the planted value, or unnamed, and
    the zoo's name of it (the name stage's ``planted_names.parquet``)."""
    t = view.table("planted_names.parquet")
    return [] if t is None else t.to_pylist()


def mean_of(xs) -> float:
    xs = [x for x in xs if x is not None and x == x]
    return float(np.mean(xs)) if xs else float("nan")


def failing_on_eval(view) -> set[tuple[str, str]]:
    """The (model, planted group) pairs whose group is at least ``min_gap`` below its class on
    the eval split too, where names are checked (failing pairs are found on the fit split; a
    group a few images made fail there may not fail on held-out images)."""
    from audit.pipeline.stats import accuracy_tables

    models = view.models
    acc = accuracy_tables(view.store, view.data.split(view.config.data.eval_split), models)
    return {
        (r["model"], r["value"])
        for r in acc.to_pylist()
        if r["attribute"] == "group" and r["class_accuracy"] - r["accuracy"] >= view.min_gap
    }


def naming(view) -> dict:
    """Over the failing pairs whose planted attribute the manifest carries: the share whose
    name names the planted value (and among them, those failing on the eval split too); over
    those whose attribute it does not carry (dropped, or never given): the share reported
    unnamed."""
    from audit.planted import parse_group

    rows = names_of(view)
    have = set(view.data.columns)
    kept = [r for r in rows if parse_group(r["group"])[1] in have]
    lost = [r for r in rows if parse_group(r["group"])[1] not in have]
    out = {"pairs": len(rows), "nameable_pairs": len(kept)}
    out["named_right"] = mean_of([bool(r["caption_names_group"]) for r in kept])
    # by its own modes, or by a name of the zoo's modes that the model fails (shared_names)
    out["named_right_zoo"] = mean_of(
        [bool(r["caption_names_group"] or r["zoo_caption"]) for r in kept]
    )
    out["undecided"] = sum(bool(r.get("undecided")) for r in kept)
    both = failing_on_eval(view)
    again = [r for r in kept if (r["model"], r["group"]) in both]
    out |= {"failing_on_eval": len(again)}
    out["named_right_failing_on_eval"] = mean_of([bool(r["caption_names_group"]) for r in again])
    out["named_right_zoo_failing_on_eval"] = mean_of(
        [bool(r["caption_names_group"] or r["zoo_caption"]) for r in again]
    )
    if lost:
        # a pair whose class's mode names another planted group (rightly) has no mode of its
        # own: neither misnamed nor reported unnamed; counted apart
        own = [r for r in lost if not r["names_other_group"]]
        out |= {"lost_pairs": len(lost), "lost_unnamed": mean_of([not r["named"] for r in own])}
        out |= {"lost_other_group": len(lost) - len(own)}
    return out
