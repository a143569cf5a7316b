"""What a labelled dataset says about itself: class names and attribute columns.

- :func:`name_classes`: class names from a column (given, or auto-detected as a string
  column in one-to-one correspondence with ``label``) or a list, when the labels were
  integers without names (ImageFolder directory names and string labels name themselves).
- :func:`detect_attributes`: the low-cardinality string columns that describe an image
  (a colour, a background), which become slots of the caption grammar.
- :func:`attribute_slots`: one template per attribute that places its value around the class
  noun (``"{value} {noun}"`` for colour-like attributes, ``"{noun} on {value}"`` for
  place-like ones), overridable per attribute.
- :func:`compose_caption` / :func:`with_captions`: captions composed from the attribute
  values, so a caption-less dataset can still train the world encoder.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from audit.data.table import CORE_COLUMNS, ImageTable

log = logging.getLogger(__name__)

#: columns that are never attributes: the table's own, free text, and planted ground truth
NOT_ATTRIBUTES = {
    *CORE_COLUMNS,
    "caption",
    "captions",
    "text",
    "group",
    "groups",
    "filename",
    "file",
    "index",
    "fold",
}
MIN_VALUES, MAX_VALUES = 2, 50

_COLOUR_NAMES = {
    "color",
    "colour",
    "colors",
    "colours",
    "hue",
    "tint",
    "material",
    "pattern",
    "texture_type",
    "shape",
    "size",
    "style",
    "finish",
    "fabric",
    "state",
    "age",
    "gender",
}
_PLACE_NAMES = {
    "background",
    "backgrounds",
    "bg",
    "place",
    "scene",
    "location",
    "setting",
    "environment",
    "habitat",
    "surface",
    "texture",
    "backdrop",
    "terrain",
    "weather",
    "site",
    "where",
}
_COLOUR_WORDS = {
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "white",
    "black",
    "pink",
    "brown",
    "grey",
    "gray",
    "cyan",
    "magenta",
    "violet",
    "beige",
    "gold",
    "silver",
    "teal",
    "navy",
}
#: places written with "in" rather than "on"
_IN_WORDS = {
    "water",
    "snow",
    "forest",
    "sky",
    "rain",
    "fog",
    "dark",
    "night",
    "city",
    "desert",
    "field",
    "jungle",
    "ocean",
    "sea",
    "lake",
    "river",
    "room",
    "kitchen",
    "house",
    "cave",
    "space",
    "stars",
    "cells",
    "shade",
    "mud",
}
_NUMERIC = re.compile(r"^\d+$")


def _is_numeric_names(classes: Sequence[str]) -> bool:
    return all(_NUMERIC.match(str(c)) for c in classes)


def _string_column(table: ImageTable, name: str) -> np.ndarray | None:
    t = table.table[name].type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t)):
        return None
    return np.asarray(
        [None if v is None else str(v) for v in table.table[name].to_pylist()], dtype=object
    )


def class_names_from_column(table: ImageTable, column: str) -> list[str] | None:
    """The class names ``column`` gives each label, or None when it is not one-to-one with ``label``."""
    vals = table.table[column].to_pylist()
    by_label: dict[int, set] = {}
    for lab, v in zip(table.labels.tolist(), vals, strict=True):
        by_label.setdefault(int(lab), set()).add(None if v is None else str(v))
    if any(len(s) != 1 or None in s for s in by_label.values()):
        return None
    names = {lab: next(iter(s)) for lab, s in by_label.items()}
    if len(set(names.values())) != len(names):
        return None
    return [names.get(i, str(c)) for i, c in enumerate(table.classes)]


def name_classes(
    table: ImageTable, class_column: str = "", classes: Sequence[str] = ()
) -> ImageTable:
    """``table`` with its classes named, in order of preference:

    1. ``class_column``: a column whose value names each row's class (one-to-one with ``label``);
    2. a string column one-to-one with ``label``, auto-detected when the labels had no names
       (integer labels without a class list; logged);
    3. the names the table already has (ImageFolder directory names, string labels, a world);
    4. ``classes``: names in label order, when nothing in the data names the labels.

    Raises ValueError naming the column and the fix when ``class_column`` is missing or not
    one-to-one with ``label``, or ``classes`` has the wrong length.
    """
    if class_column:
        if class_column not in table.columns:
            raise ValueError(
                f"[data] class_column {class_column!r} is not a column of the dataset; its columns are "
                f"{table.columns}"
            )
        names = class_names_from_column(table, class_column)
        if names is None:
            raise ValueError(
                f"[data] class_column {class_column!r} does not name one class per label: some label has "
                "several (or no) values, or two labels share one; give a column with exactly one name per label"
            )
        return _renamed(table, names)
    if _is_numeric_names(table.classes):
        for col in table.columns:
            if col in NOT_ATTRIBUTES or _string_column(table, col) is None:
                continue
            names = class_names_from_column(table, col)
            if names is not None and not _is_numeric_names(names):
                log.info(
                    "class names from column %r (one-to-one with label): %s", col, ", ".join(names)
                )
                return _renamed(table, names)
        if classes:
            if len(classes) != len(table.classes):
                raise ValueError(
                    f"[data] classes has {len(classes)} names but the labels have {len(table.classes)} classes "
                    f"(0..{len(table.classes) - 1}); give one name per label, in label order"
                )
            return _renamed(table, [str(c) for c in classes])
    elif classes and list(classes) != list(table.classes):
        log.warning(
            "[data] classes is ignored: the data names its classes (%s)", ", ".join(table.classes)
        )
    return table


def _renamed(table: ImageTable, names: Sequence[str]) -> ImageTable:
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be distinct; got {list(names)}")
    return ImageTable(table.table, list(names), table.root)


def _class_copy(table: ImageTable, col: str) -> bool:
    """A column that only repeats the class (its values are the class names, or one per label)."""
    vals = set(table.table[col].to_pylist())
    classes = {c.lower() for c in table.classes}
    return {str(v).lower() for v in vals} <= classes or class_names_from_column(
        table, col
    ) is not None


def detect_attributes(table: ImageTable, exclude: Sequence[str] = ()) -> list[str]:
    """String columns with 2-50 distinct values that are not ids, splits, labels, class names,
    captions or planted ground truth (``group``), in column order."""
    out = []
    for col in table.columns:
        low = col.lower()
        if (
            col in NOT_ATTRIBUTES
            or low in NOT_ATTRIBUTES
            or col in exclude
            or low.endswith("id")
            or low.endswith("_path")
        ):
            continue
        vals = _string_column(table, col)
        if vals is None:
            continue
        n = len({v for v in vals if v})
        unique_per_row = n == len(vals) and n > MIN_VALUES  # an id or free text, not a property
        if not MIN_VALUES <= n <= MAX_VALUES or unique_per_row or _class_copy(table, col):
            continue
        out.append(col)
    return out


def resolve_attributes(
    table: ImageTable, attributes: Sequence[str] | None = None, class_column: str = ""
) -> list[str]:
    """``attributes`` checked against the table's columns, or (None) the detected ones, logged."""
    if attributes is None:
        found = detect_attributes(table, exclude=[class_column] if class_column else [])
        if found:
            log.info(
                "caption attributes detected: %s",
                ", ".join(f"{a} ({len(attribute_values(table, a))} values)" for a in found),
            )
        return found
    missing = [a for a in attributes if a not in table.columns]
    if missing:
        close = difflib.get_close_matches(missing[0], table.attributes, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"[data] attributes names column(s) {missing}{hint} that the dataset lacks; "
            f"its columns are {table.columns}"
        )
    return list(attributes)


def attribute_values(table: ImageTable, attribute: str) -> list[str]:
    """The distinct non-empty values of an attribute column, sorted."""
    return sorted(
        {str(v) for v in table.table[attribute].to_pylist() if v is not None and str(v).strip()}
    )


def default_template(attribute: str, values: Sequence[str] = ()) -> str:
    """Where an attribute's value goes around the noun: before it for colour-like attributes
    (and for any attribute of single words that is not place-like), ``on``/``in`` a place after it."""
    a = attribute.lower()
    vals = {str(v).lower() for v in values}
    place = a in _PLACE_NAMES or any(
        k in a for k in ("background", "scene", "place", "location", "habitat", "setting")
    )
    colour = a in _COLOUR_NAMES or "colo" in a or (vals and vals <= _COLOUR_WORDS)
    if place and not colour:
        ins = sum(any(w in _IN_WORDS for w in v.split()) for v in vals)
        return "{noun} in {value}" if vals and ins > len(vals) / 2 else "{noun} on {value}"
    if colour or all(len(v.split()) == 1 for v in vals):
        return "{value} {noun}"
    return "{noun} with {value}"


def attribute_slots(
    table: ImageTable, attributes: Sequence[str], templates: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``{attribute: template}``: ``templates`` where given (each must hold ``{noun}`` and
    ``{value}``), else :func:`default_template`."""
    templates = dict(templates or {})
    unknown = set(templates) - set(attributes)
    if unknown:
        raise ValueError(
            f"[data] attribute_templates names {sorted(unknown)}, which are not caption attributes {list(attributes)}"
        )
    out = {}
    for a in attributes:
        t = templates.get(a) or default_template(a, attribute_values(table, a))
        if "{noun}" not in t or "{value}" not in t:
            raise ValueError(
                f"the caption template of attribute {a!r} must contain {{noun}} and {{value}}; got {t!r}"
            )
        out[a] = t
    return out


def _article(words: str) -> str:
    return "an" if words[:1].lower() in "aeiou" else "a"


def compose_caption(noun: str, values: Mapping[str, str | None], slots: Mapping[str, str]) -> str:
    """``"a photo of a blue pullover on grass"`` from ``{color: blue, background: grass}``.

    Slots whose template puts the value before the noun are applied first (nearest the noun
    last), so adjectives stay before the noun and phrases after it; a None value is left out.
    """
    before = [a for a in slots if slots[a].index("{value}") < slots[a].index("{noun}")]
    after = [a for a in slots if a not in before]
    phrase = noun
    for a in [*reversed(before), *after]:
        v = values.get(a)
        if v is None or not str(v).strip():
            continue
        phrase = slots[a].replace("{noun}", phrase).replace("{value}", str(v))
    return f"a photo of {_article(phrase)} {phrase}"


def with_captions(table: ImageTable, slots: Mapping[str, str]) -> ImageTable:
    """``table`` with a ``caption`` column composed from its attribute columns (``slots``)."""
    if not slots:
        raise ValueError("no attribute columns to compose captions from")
    cols = {a: table.table[a].to_pylist() for a in slots}
    labels = table.labels
    caps = [
        compose_caption(table.classes[int(labels[i])], {a: cols[a][i] for a in slots}, slots)
        for i in range(len(table))
    ]
    t = table.table.drop_columns(["caption"]) if "caption" in table.columns else table.table
    return ImageTable(
        t.append_column("caption", pa.array(caps, pa.string())), table.classes, table.root, True
    )
