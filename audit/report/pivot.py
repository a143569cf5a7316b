"""A class's mitigation rows as one table on a mode's card: a row per (model, method and
generator), a column per evaluation target."""

from __future__ import annotations


def _method_label(method: str | None, generator: str | None) -> str:
    """``synthetic (world, oracle: the data's own generator)``: which images a fix used."""
    from audit.synthetic import is_oracle

    if not generator:
        return str(method)
    oracle = ", oracle: the data's own generator" if is_oracle(generator) else ""
    return f"{method} ({generator}{oracle})"


def _pivot(rows: list[dict]) -> dict | None:
    """Mitigation rows of one class as a table: one row per (model, method), one column per
    evaluation target (the planted group, the nearest images of a hard caption)."""
    if not rows:
        return None
    targets = list(dict.fromkeys((r.get("eval") or "", r.get("target") or "") for r in rows))
    table: dict[tuple, dict] = {}
    for r in rows:
        key = (r.get("model"), r.get("method"), r.get("generator") or "")
        t = table.setdefault(
            key,
            {
                "model": r.get("model"),
                "method": _method_label(r.get("method"), r.get("generator")),
                "lam": r.get("lam"),
                "n_added": r.get("n_added"),
                "overall_before": r.get("overall_before"),
                "overall_after": r.get("overall_after"),
                "cells": [None] * len(targets),
            },
        )
        t["cells"][targets.index((r.get("eval") or "", r.get("target") or ""))] = r
    heads = []
    for e, t in targets:
        heads.append(
            f"planted group {t}"
            if e == "planted"
            else (
                f"nearest images of '{t}'"
                if e == "nearest_caption"
                else HEADS.get(e, f"{e} {t}".strip())
            )
        )
    return {
        "targets": heads,
        "rows": list(table.values()),
        "models": len({k[0] for k in table}) > 1,
    }


HEADS = {"direction": "the images its direction finds hardest (unnamed mode)"}
