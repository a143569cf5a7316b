"""Checking an audit against planted ground truth (the world's ``group`` column).

Two checks from Jain et al. (Section 4): does the top hard caption of a failure direction
name the planted attribute, and does ranking a class's images by the direction's decision
value find the planted group more precisely than ranking by the model's confidence.
Pure functions over tables and arrays.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa

PLANTED_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("group", pa.string()),
        ("gap", pa.float64()),
        ("top_hard_caption", pa.string()),
        ("caption_names_group", pa.bool_()),
        ("precision_svm", pa.float64()),
        ("precision_confidence", pa.float64()),
        ("n_errors", pa.int64()),
    ]
)


def parse_group(group: str) -> tuple[str, str, str, bool]:
    """``"pullover:color=blue"`` -> (class, attribute, value, negated=False)."""
    cls, _, cond = group.partition(":")
    neg = "!=" in cond
    attr, value = cond.split("!=" if neg else "=", 1)
    return cls, attr, value, neg


def caption_names(caption: str, value: str, negated: bool) -> bool:
    """Whether a caption names a planted group: it mentions ``value`` (e.g. "blue"), or, for a
    negated group ("not on grass"), it names a background and not that one."""
    padded = f" {caption.lower().rstrip('.')} "
    if negated:
        return " on " in padded and f" {value} " not in padded
    return f" {value} " in padded


def precision_at_errors(score: np.ndarray, in_group: np.ndarray, n: int) -> float:
    """Share of the planted group among the ``n`` lowest-scoring examples."""
    if n <= 0:
        return float("nan")
    order = np.argsort(score, kind="stable")[:n]
    return float(np.mean(in_group[order]))


def planted_evaluation(
    accuracy: pa.Table,
    captions: pa.Table,
    decisions: Mapping[tuple[str, str], np.ndarray],
    confidence: Mapping[str, np.ndarray],
    correct: Mapping[str, np.ndarray],
    labels: np.ndarray,
    groups: np.ndarray,
    classes: list[str],
    min_gap: float = 0.15,
) -> pa.Table:
    """One row per (model, planted group) whose group really fails (>= ``min_gap`` below class).

    ``decisions[(model, class)]`` are mode-0 decision values of the class's debug images (in
    the order of ``labels == class``); ``confidence``/``correct`` are the model's on all debug
    images. Columns: model, group, gap, top_hard_caption, caption_names_group,
    precision_svm, precision_confidence, n_errors.
    """
    acc = [r for r in accuracy.to_pylist() if r["attribute"] == "group"]
    top_hard = _top_hard_captions(captions)
    rows = []
    for r in acc:
        gap = r["class_accuracy"] - r["accuracy"]
        if gap < min_gap:
            continue
        model, group = r["model"], r["value"]
        cls, attr, value, neg = parse_group(group)
        cap = top_hard.get((model, cls))
        in_c = labels == classes.index(cls)
        member = np.array([group in str(g).split("|") for g in groups[in_c]])
        n_err = int((~correct[model][in_c]).sum())
        dec = decisions.get((model, cls))
        rows.append(
            {
                "model": model,
                "group": group,
                "gap": float(gap),
                "top_hard_caption": cap,
                "caption_names_group": None if cap is None else caption_names(cap, value, neg),
                "precision_svm": precision_at_errors(dec, member, n_err)
                if dec is not None
                else float("nan"),
                "precision_confidence": precision_at_errors(confidence[model][in_c], member, n_err),
                "n_errors": n_err,
            }
        )
    return pa.Table.from_pylist(rows, schema=PLANTED_SCHEMA)


def _top_hard_captions(captions: pa.Table) -> dict[tuple[str, str], str]:
    """``{(scope, class): caption}`` of the first-ranked hard caption of each mode-0 direction."""
    top_hard = {}
    for r in captions.to_pylist():
        if r["polarity"] == "hard" and r["rank"] == 1 and r["mode"] == 0:
            top_hard[(r["scope"], r["class"])] = r["caption"]
    return top_hard


def summarize_planted(table: pa.Table) -> dict:
    """Headline numbers: share of failing (model, group) pairs named by the top hard caption,
    and mean precision at the number of errors for SVM vs confidence ranking."""
    rows = table.to_pylist()
    named = [r["caption_names_group"] for r in rows if r["caption_names_group"] is not None]
    psvm = [r["precision_svm"] for r in rows if not np.isnan(r["precision_svm"])]
    pconf = [r["precision_confidence"] for r in rows if not np.isnan(r["precision_confidence"])]
    return {
        "pairs": len(rows),
        "named_share": float(np.mean(named)) if named else float("nan"),
        "precision_svm": float(np.mean(psvm)) if psvm else float("nan"),
        "precision_confidence": float(np.mean(pconf)) if pconf else float("nan"),
    }


NAMED_SCHEMA = pa.schema(
    [
        *[("model", pa.string()), ("group", pa.string()), ("gap", pa.float64())],
        *[("named", pa.bool_()), ("caption", pa.string()), ("specific_caption", pa.string())],
        *[("caption_names_group", pa.bool_()), ("undecided", pa.bool_())],
        ("zoo_caption", pa.string()),
        ("names_other_group", pa.bool_()),
    ]
)


def _mode_for(modes: list[dict], value: str, neg: bool) -> dict | None:
    """Of a (model, class)'s modes: the one whose name names the planted value, else an
    unnamed one (a failure the audit says it cannot name), else the first."""
    for m in modes:
        if m["named"] and caption_names(m["caption"], value, neg):
            return m
    return next((m for m in modes if not m["named"]), modes[0] if modes else None)


def named_evaluation(
    accuracy: pa.Table, modes: pa.Table, min_gap: float, shared: pa.Table | None = None
) -> pa.Table:
    """One row per (model, planted group at least ``min_gap`` below its class): whether one
    of the model's modes of that class is named by the planted value (the most general
    caption that fails as much names it), else whether one is reported unnamed; and whether
    the zoo's names checked on the model (``shared_names.parquet``) name it: a name of the
    planted value that the model fails (``zoo_caption``); ``names_other_group``: the mode
    found names another planted group of the class (a failure of its own, rightly named,
    where this one has no mode). An oracle check: only data with planted groups has it."""
    by: dict[tuple[str, str], list[dict]] = {}
    for r in modes.to_pylist():
        by.setdefault((r["scope"], r["class"]), []).append(r)
    fails: dict[tuple[str, str], list[str]] = {}
    for r in [] if shared is None else shared.to_pylist():
        if r["fails"]:
            fails.setdefault((r["model"], r["class"]), []).append(r["caption"])
    planted: dict[str, set[tuple[str, bool]]] = {}  # class -> its planted (value, negated)
    for r in accuracy.to_pylist():
        if r["attribute"] == "group" and "|" not in r["value"]:
            cls, _, value, neg = parse_group(r["value"])
            planted.setdefault(cls, set()).add((value, neg))
    rows = []
    for r in accuracy.to_pylist():
        gap = r["class_accuracy"] - r["accuracy"]
        if r["attribute"] != "group" or gap < min_gap or "|" in r["value"]:
            continue  # ("a|b": the examples in two planted groups at once, counted in each)
        cls, _, value, neg = parse_group(r["value"])
        m = _mode_for(by.get((r["model"], cls), []), value, neg)
        named = bool(m and m["named"])
        other = planted[cls] - {(value, neg)}
        zoo = [c for c in fails.get((r["model"], cls), []) if caption_names(c, value, neg)]
        rows.append(
            {"model": r["model"], "group": r["value"], "gap": float(gap), "named": named}
            | {"caption": m["caption"] if m else None}
            | {"specific_caption": m["specific_caption"] if m else None}
            | {"caption_names_group": caption_names(m["caption"], value, neg) if named else None}
            | {"undecided": bool(m and not named and m.get("undecided"))}
            | {"zoo_caption": zoo[0] if zoo else None}
            | {"names_other_group": named and any(caption_names(m["caption"], *o) for o in other)}
        )
    return pa.Table.from_pylist(rows, schema=NAMED_SCHEMA)
