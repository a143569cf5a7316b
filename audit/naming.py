"""Naming a failure mode honestly: the most general caption that fails as much, or none.

The directions stage ranks captions by a failure direction; the top hard caption often
names more than the failure ("a cyan coat on astronaut" where the failure is cyan coats).
Here every significant mode's top hard caption is checked on the held-out eval split: on
the images of the class whose attribute columns show every slot the caption names (exact)
when the data has those columns, else on its nearest images of the class (as
``subpopulations.parquet`` checks every caption), with a Wilson interval:

- **generalise**: a slot is dropped when the caption without it fails as much (its nearest
  images are not clearly less hard: their accuracy is not above the interval of the fuller
  caption's), greedily, hardest first, while a slot is left. The shortest such caption is
  the mode's name, the one generated and retrained on; the fuller one is kept as
  ``specific_caption``.
- **unnamed**: a mode whose named caption's nearest images are not worse than the class
  (its interval reaches the class's accuracy) is *unnamed*: no caption of the vocabulary
  explains it. It is never handed to a generator under a caption that does not fail; the
  methods that need no caption (pool selection, upweighting) still apply, and the report
  shows its hardest images.

Writes ``modes.parquet``: one row per significant (scope, class, mode), ordered within each
scope by how much the named subpopulation fails (named first, largest gap first).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

import pyarrow as pa

from audit.slots import SlotGrammar, drop_one

MODES_SCHEMA = pa.schema(
    [
        *[("scope", pa.string()), ("class", pa.string()), ("mode", pa.int32())],
        *[("named", pa.bool_()), ("caption", pa.string()), ("specific_caption", pa.string())],
        *[("slots", pa.string()), ("dropped", pa.string()), ("cv_score", pa.float64())],
        *[
            ("accuracy_on_nearest", pa.float64()),
            ("ci_low", pa.float64()),
            ("ci_high", pa.float64()),
        ],
        *[("class_accuracy", pa.float64()), ("gap", pa.float64()), ("order", pa.int32())],
        *[("checked_on", pa.string()), ("n_checked", pa.int64())],
    ]
)

#: ``check(scope, class, captions) -> {caption: subpopulations row}`` on the eval split
Check = Callable[[str, str, list[str]], Mapping[str, Mapping]]


def generalise(scope: str, cls: str, caption: str, grammar: SlotGrammar, check: Check) -> tuple:
    """``(most general caption, its slots, its check row, the slots dropped in order)``."""
    slots = grammar.parse(caption)
    cur, row = caption, check(scope, cls, [caption])[caption]
    dropped: list[str] = []
    while len(slots) > 1:
        options = {grammar.compose(cls, rest): (a, rest) for a, rest in drop_one(slots)}
        rows = check(scope, cls, list(options))
        # not clearly less hard: the shorter caption's accuracy is inside (or below) the interval
        same = [c for c in options if rows[c]["accuracy_on_nearest"] <= row["ci_high"]]
        if not same:
            break
        cur = min(same, key=lambda c: (rows[c]["accuracy_on_nearest"], c))
        attr, slots = options[cur]
        row = rows[cur]
        dropped.append(attr)
    return cur, slots, row, dropped


def is_named(row: Mapping) -> bool:
    """Its nearest images are worse than the class: the interval lies below the class accuracy."""
    return bool(row["ci_high"] < row["class_accuracy"])


def name_modes(
    hard: Mapping[tuple, str | None],
    cv: Mapping[tuple, float],
    grammar: SlotGrammar,
    check: Check,
    direction_check: Callable[[tuple], Mapping] | None = None,
) -> pa.Table:
    """``modes.parquet`` for ``hard[(scope, class, mode)] = top hard caption`` (None: the
    space has no text; the mode is unnamed and ``direction_check(key)`` says how much the
    images its direction finds hardest fail)."""
    rows = []
    for (scope, cls, mode), caption in hard.items():
        if caption is None:
            chk = direction_check((scope, cls, mode))
            general, slots, dropped, named = None, {}, [], False
        else:
            general, slots, chk, dropped = generalise(scope, cls, caption, grammar, check)
            named = is_named(chk)
        rows.append(
            {"scope": scope, "class": cls, "mode": int(mode), "named": named}
            | {"caption": general if named else None, "specific_caption": caption}
            | {"slots": json.dumps(slots if named else {}), "dropped": json.dumps(dropped)}
            | {"cv_score": float(cv.get((scope, cls, mode), float("nan")))}
            | {
                k: float(chk[k])
                for k in ("accuracy_on_nearest", "ci_low", "ci_high", "class_accuracy")
            }
            | {"gap": float(chk["class_accuracy"] - chk["accuracy_on_nearest"])}
            | {
                "checked_on": chk.get("checked_on", "nearest images"),
                "n_checked": chk.get("n", chk.get("k")),
            }
        )
    return _ordered(rows)


def _ordered(rows: list[dict]) -> pa.Table:
    """Within each scope: named modes by how much they fail (largest gap first), then the
    unnamed ones by strength."""

    def key(r):
        return (r["scope"], not r["named"], -(r["gap"] if r["named"] else r["cv_score"]))

    rows = sorted(rows, key=key)
    order: dict[str, int] = {}
    for r in rows:
        r["order"] = order[r["scope"]] = order.get(r["scope"], -1) + 1
    return pa.Table.from_pylist(rows, schema=MODES_SCHEMA)


def named_captions(modes: pa.Table, mode: int | None = 0) -> dict[tuple[str, str], str]:
    """``{(scope, class): named caption}`` of the named modes (of ``mode``; None: the first
    named mode of each class in the table's order)."""
    out: dict[tuple[str, str], str] = {}
    for r in modes.to_pylist():
        if r["named"] and (mode is None or r["mode"] == mode):
            out.setdefault((r["scope"], r["class"]), r["caption"])
    return out
