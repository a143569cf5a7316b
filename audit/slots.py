"""Captions as slots: which attribute values a caption names, and captions from slots.

A caption of the data's grammar ("a photo of a cyan coat on astronaut") names one value of
some of the data's attribute columns (``{color: cyan, background: astronaut}``). Reading a
caption back into its slots lets the audit drop a slot to find the most general caption
that explains a failure, evaluate a caption on the examples whose attributes match it,
check that retrieved or generated images show what the caption says, and condition a
learned generator on it. Works for any dataset whose attribute columns hold the values its
captions use (the world's colour and background columns included).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from audit.data.attributes import compose_caption

#: columns that are never caption slots (core columns, free text, ground truth, class names)
NOT_SLOTS = {"example_id", "split", "label", "image", "path", "caption", "group", "item"}


def _word(value: str) -> re.Pattern:
    return re.compile(rf"(?<![\w-]){re.escape(value.lower())}(?![\w-])")


@dataclass(frozen=True)
class SlotGrammar:
    """The data's caption slots: ``values[attribute]`` its values, ``templates[attribute]``
    where its value goes around the class noun (:func:`compose_caption`)."""

    values: Mapping[str, Sequence[str]]
    templates: Mapping[str, str]

    @classmethod
    def of(cls, data, templates: Mapping[str, str] | None = None, max_values: int = 50):
        """The grammar of an ImageTable's string attribute columns (2..``max_values`` values);
        ``templates`` (attribute -> template) where given, else the default placement."""
        from audit.data.attributes import attribute_values, default_template

        values, tmpl = {}, {}
        for a in data.attributes:
            if a in NOT_SLOTS:
                continue
            vals = attribute_values(data, a)
            if set(vals) <= set(data.classes):  # the class names again (a class column)
                continue
            if 2 <= len(vals) <= max_values and not all(v.lstrip("-").isdigit() for v in vals):
                values[a] = vals
                tmpl[a] = (templates or {}).get(a) or default_template(a, vals)
        return cls(values, tmpl)

    def parse(self, caption: str) -> dict[str, str]:
        """``{attribute: value}`` of each attribute the caption names exactly one value of
        (the longest match when values overlap, e.g. "dark blue" over "blue")."""
        text, out = caption.lower(), {}
        for a, vals in self.values.items():
            hits = [v for v in vals if _word(v).search(text)]
            hits = [v for v in hits if not any(v != w and v.lower() in w.lower() for w in hits)]
            if len(hits) == 1:
                out[a] = hits[0]
        return out

    def compose(self, noun: str, slots: Mapping[str, str]) -> str:
        """The grammar's caption of ``noun`` with ``slots`` filled (no slot: the reference)."""
        return compose_caption(noun, dict(slots), {a: t for a, t in self.templates.items()})

    def matches(self, table, slots: Mapping[str, str]) -> np.ndarray:
        """``[N]`` bool: the rows of an ImageTable whose attributes equal every slot."""
        ok = np.ones(len(table), bool)
        for a, v in slots.items():
            ok &= table.column(a).astype(str) == str(v)
        return ok


def drop_one(slots: Mapping[str, str]) -> list[tuple[str, dict[str, str]]]:
    """Each ``(attribute dropped, the other slots)``."""
    return [(a, {b: v for b, v in slots.items() if b != a}) for a in slots]
