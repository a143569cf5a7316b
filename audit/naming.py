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
- **undecided**: an unnamed mode whose interval reaches both the class's accuracy and
  ``min_gap`` below it: its images are too few to tell whether it fails, which the console,
  the tables and the cards say (where a caption's images are plainly not worse, they say so),
  with ``images_to_decide``: how many images at the accuracy seen would name it.

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
        *[("checked_on", pa.string()), ("n_checked", pa.int64()), ("undecided", pa.bool_())],
        ("images_to_decide", pa.int64()),
        ("easy_caption", pa.string()),
    ]
)

#: ``check(scope, class, captions) -> {caption: subpopulations row}`` on the eval split
Check = Callable[[str, str, list[str]], Mapping[str, Mapping]]
#: ``beyond((scope, class, mode), earlier names) -> row | None``: how much the eval images the
#: mode's direction finds hardest fail once those the names cover are set aside (a check row
#: with ``share_covered``, the share set aside; None: nothing left)
Beyond = Callable[[tuple, list[str]], Mapping | None]


def refines(slots: Mapping[str, str], taken: list[Mapping[str, str]]) -> bool:
    """The slots name every slot of a name already taken: the same subpopulation or a part."""
    return any(t.items() <= slots.items() for t in taken)


def generalise(
    scope: str,
    cls: str,
    caption: str,
    grammar: SlotGrammar,
    check: Check,
    taken: list[Mapping[str, str]] = (),
) -> tuple:
    """``(most general caption, its slots, its check row, the slots dropped in order)``; a
    shorter caption that names (or refines) one of ``taken`` (the names earlier modes of the
    class hold) is not a candidate."""
    slots = grammar.parse(caption)
    cur, row = caption, check(scope, cls, [caption])[caption]
    dropped: list[str] = []
    while len(slots) > 1:
        options = {
            grammar.compose(cls, rest): (a, rest)
            for a, rest in drop_one(slots)
            if not refines(rest, taken)
        }
        if not options:
            break
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


def name_one(
    scope: str,
    cls: str,
    captions: list[str],
    grammar: SlotGrammar,
    check: Check,
    taken: list[Mapping[str, str]],
) -> tuple:
    """``(name, slots, check row, dropped, specific caption, named)`` of a mode from its ranked
    hard captions: the top one generalised. When that names (or refines) a subpopulation an
    earlier mode of the class already named (two planted failures of one class often share a
    top caption, "an orange coat on coins"), the mode is named by the first of its other hard
    captions whose most general form fails and names another one; failing that, it keeps the
    top caption's name. A last item says whether the name is the mode's own."""
    for cap in captions:
        general, slots, chk, dropped = generalise(scope, cls, cap, grammar, check, taken)
        named = is_named(chk)
        if (named and not refines(slots, taken)) or (not named and cap == captions[0]):
            return general, slots, chk, dropped, cap, named, True
    general, slots, chk, dropped = generalise(scope, cls, captions[0], grammar, check)
    return general, slots, chk, dropped, captions[0], is_named(chk), False


#: ``checked_on`` of a check row on the images a later mode's direction finds hardest, once
#: those its class's earlier names cover are set aside (the report's cards read it)
BEYOND_EARLIER = "direction, beyond the earlier names"

#: at most this share of a later mode's hardest images may lie in the earlier names' images for
#: the rest to count as a failure of its own (at least 10 of the ``k`` = 50 images left)
MAX_COVERED = 0.8


def beyond_earlier(row: Mapping | None) -> bool:
    """The images a mode's direction finds hardest, once those the earlier names of its class
    cover are set aside, are enough and still fail clearly: a failure of its own that no
    caption of the vocabulary names (the earlier failure found twice leaves images that fail
    no more than the class). Two failures of one class often share the directions (both of
    the coat's: half the images are orange coats, the rest coats on coins)."""
    return row is not None and row["share_covered"] <= MAX_COVERED and is_named(row)


def is_named(row: Mapping) -> bool:
    """Its nearest images are worse than the class: the interval lies below the class accuracy."""
    return bool(row["ci_high"] < row["class_accuracy"])


def images_to_decide(row: Mapping, z: float = 1.96) -> int | None:
    """The fewest images at which the accuracy seen would have a Wilson interval below the
    class's accuracy (one model's trials: for a cluster an upper bound), or None when it is
    not below the class. The Wilson interval inverts the score test, so its upper end is below
    ``c`` exactly when ``c - p > z * sqrt(c (1 - c) / n)``, i.e. ``n > z^2 c (1 - c) / (c - p)^2``."""
    import math

    p, c = float(row["accuracy_on_nearest"]), float(row["class_accuracy"])
    if not p < c:  # also NaN
        return None
    return math.floor(z * z * c * (1 - c) / (c - p) ** 2) + 1


def is_undecided(row: Mapping, min_gap: float) -> bool:
    """Not named, yet the interval reaches a failure of ``min_gap`` below the class as well:
    the images checked are too few to tell whether it fails (not "it does not fail")."""
    return not is_named(row) and bool(row["ci_low"] <= row["class_accuracy"] - min_gap)


def name_modes(
    hard: Mapping[tuple, str | list[str] | None],
    cv: Mapping[tuple, float],
    grammar: SlotGrammar,
    check: Check,
    direction_check: Callable[[tuple], Mapping] | None = None,
    beyond: Beyond | None = None,
    min_gap: float = 0.15,
) -> pa.Table:
    """``modes.parquet`` for ``hard[(scope, class, mode)]`` = the mode's hard captions, best
    first (or its top one; None: the space has no text, the mode is unnamed and
    ``direction_check(key)`` says how much the images its direction finds hardest fail).
    The modes of a class are named in mode order, each by a subpopulation the earlier ones
    have not named when its captions offer one that fails; a later mode whose captions only
    name an earlier mode's failure is unnamed when ``beyond`` shows a failure of its own. An
    unnamed mode is ``undecided`` when its check cannot rule out a failure of ``min_gap``."""
    rows, earlier = [], {}  # (scope, class) -> [(slots, name)] of its modes named so far
    for (scope, cls, mode), caps in sorted(hard.items()):
        before = earlier.setdefault((scope, cls), [])
        caps = [caps] if isinstance(caps, str) else list(caps or [])
        if not caps:
            chk = direction_check((scope, cls, mode))
            general, specific, slots, dropped, named = None, None, {}, [], False
        else:
            general, slots, chk, dropped, specific, named, own = name_one(
                scope, cls, caps, grammar, check, [s for s, _ in before]
            )
            if named and not own and beyond is not None:
                if beyond_earlier(b := beyond((scope, cls, mode), [n for _, n in before])):
                    chk, named = b, False
            if named and own and slots:
                before.append((slots, general))
        rows.append(
            {"scope": scope, "class": cls, "mode": int(mode), "named": named}
            | {"caption": general if named else None, "specific_caption": specific}
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
                "undecided": (few := is_undecided(chk, min_gap)),
                "images_to_decide": images_to_decide(chk) if few else None,
            }
        )
    return _ordered(rows)


def with_comparisons(modes: pa.Table, captions: pa.Table, grammar: SlotGrammar) -> pa.Table:
    """``modes`` with ``easy_caption``: the caption a mode's generated images are compared with
    (confirmation): its first easy caption that shows no named failure of its class (no name
    of any scope's mode whose slots it holds). The top easy caption of a class with two
    failures is often the other failure ("a five on moon" as lime fives' comparison: both
    fail, nothing is confirmed); with none left, the class's reference caption ("a photo of a
    five": its typical images)."""
    names: dict[str, list[dict]] = {}
    for r in modes.to_pylist():
        if r["named"]:
            names.setdefault(r["class"], []).append(json.loads(r["slots"] or "{}"))
    easy: dict[tuple, list[tuple[int, str]]] = {}
    for r in captions.to_pylist():
        if r["polarity"] == "easy":
            easy.setdefault((r["scope"], r["class"], r["mode"]), []).append(
                (r["rank"], r["caption"])
            )
    out = []
    for r in modes.to_pylist():
        ranked = [c for _, c in sorted(easy.get((r["scope"], r["class"], r["mode"]), []))]
        failures = [n for n in names.get(r["class"], []) if n]
        typical = [c for c in ranked if not refines(grammar.parse(c), failures)]
        if ranked and not typical:  # the class's reference caption: its typical images
            typical = [grammar.compose(r["class"], {})]
        out.append(r | {"easy_caption": (typical or [None])[0]})
    return pa.Table.from_pylist(out, schema=MODES_SCHEMA)


def worst_first(row: Mapping) -> tuple:
    """Sort key of a ``modes.parquet`` row: named modes by how much they fail (largest gap
    first), then the unnamed ones by strength."""
    return (not row["named"], -(row["gap"] if row["named"] else row["cv_score"]))


def by_mode(modes: pa.Table | None) -> dict[tuple, dict]:
    """``{(scope, class, mode): its modes.parquet row}`` (empty before the name stage)."""
    return (
        {} if modes is None else {(r["scope"], r["class"], r["mode"]): r for r in modes.to_pylist()}
    )


def _ordered(rows: list[dict]) -> pa.Table:
    """Within each scope, :func:`worst_first`."""
    rows = sorted(rows, key=lambda r: (r["scope"], *worst_first(r)))
    order: dict[str, int] = {}
    for r in rows:
        r["order"] = order[r["scope"]] = order.get(r["scope"], -1) + 1
    return pa.Table.from_pylist(rows, schema=MODES_SCHEMA)
