"""The world encoder's caption vocabulary: distinct caption strings per paraphrase template
and per granularity level (captions with attribute words such as a colour or a background
omitted), found from a table's ``caption`` column and its attribute columns."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from audit.data.table import ImageTable

_PREFIX = re.compile(r"^\s*(?:a |an |the )?(?:photo|picture|image|close-up photo)\s+of\s+", re.I)
_PREPS = r"(?:on|in|at|with|under|over|near|by|against|beside|inside|behind)"
SKIP_COLUMNS = {"example_id", "split", "label", "image", "path", "caption", "group"}


def words(text: str) -> list[str]:
    """Lower-case words of ``text`` (letters and digits; ``t-shirt`` is ``t`` and ``shirt``)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def known_words(captions: Sequence[str], templates: Sequence[str] = ()) -> frozenset[str]:
    """Every word of ``captions`` and of the templates they are trained in: a closed vocabulary."""
    out: set[str] = set()
    for c in dict.fromkeys(captions):
        out.update(words(c))
    for t in templates:
        out.update(words(t.replace("{}", " ")))
    return frozenset(out)


def caption_body(caption: str) -> str:
    """``"a photo of a blue pullover on grass"`` -> ``"a blue pullover on grass"``."""
    return _PREFIX.sub("", caption.strip().rstrip("."))


def fix_articles(text: str) -> str:
    return re.sub(
        r"\b(a|an)\s+(\w)",
        lambda m: ("an " if m.group(2).lower() in "aeiou" else "a ") + m.group(2),
        text,
    )


def omit_value(text: str, value: str) -> str:
    """Drop one attribute word from a caption: its prepositional phrase, else the word itself."""
    v = re.escape(value)
    out = re.sub(rf"\s+{_PREPS}\s+(?:(?:a|an|the)\s+)?{v}\b", "", text, count=1, flags=re.I)
    if out == text:
        out = re.sub(rf"\b{v}\s+", "", text, count=1, flags=re.I)
    if out == text:
        out = re.sub(rf"\s*\b{v}\b", "", text, count=1, flags=re.I)
    return re.sub(r"\s+", " ", fix_articles(out)).strip()


def omittable_attributes(table: ImageTable, min_share: float = 0.9) -> list[str]:
    """Attribute columns whose value is a word of the caption in at least ``min_share`` of rows."""
    if "caption" not in table.columns:
        raise ValueError(
            f"the world encoder trains on a table with a 'caption' column; this table has {table.columns}"
        )
    captions = [str(c).lower() for c in table.column("caption")]
    classes = {c.lower() for c in table.classes}
    out = []
    for col in table.columns:
        if col in SKIP_COLUMNS:
            continue
        vals = [str(v).lower() for v in table.column(col)]
        if set(vals) <= classes:  # a copy of the label (e.g. the world's `item`)
            continue
        hits = sum(
            bool(v) and re.search(rf"\b{re.escape(v)}\b", c) is not None
            for v, c in zip(vals, captions, strict=True)
        )
        if captions and hits >= min_share * len(captions):
            out.append(col)
    return out


@dataclass
class CaptionVocab:
    """Distinct caption strings per level (which attributes are omitted) and template.

    ``levels[l]`` is a tuple of omitted attribute names; ``keys[l]`` the distinct
    (label, kept attribute values...) tuples of that level; ``texts[l][t][j]`` the string for
    key ``j`` in template ``t``; ``targets[l][i]`` the key index of table row ``i``.
    """

    attributes: list[str]
    templates: list[str]
    levels: list[tuple[str, ...]] = field(default_factory=list)
    keys: list[list[tuple]] = field(default_factory=list)
    texts: list[list[list[str]]] = field(default_factory=list)
    targets: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def build(
        cls, table: ImageTable, templates: Sequence[str], attributes: Sequence[str] | None = None
    ) -> CaptionVocab:
        attrs = list(omittable_attributes(table) if attributes is None else attributes)
        voc = cls(attrs, list(templates))
        captions = [str(c) for c in table.column("caption")]
        labels = table.labels
        values = {a: [str(v) for v in table.column(a)] for a in attrs}
        levels = [tuple(s) for r in range(len(attrs) + 1) for s in combinations(attrs, r)]
        for omit in levels:
            kept = [a for a in attrs if a not in omit]
            # with no omittable attributes the one level is keyed by the caption itself
            index: dict[tuple, int] = {}
            bodies: list[str] = []
            target = np.empty(len(captions), np.int64)
            for i, cap in enumerate(captions):
                key = (
                    (int(labels[i]), *(values[a][i] for a in kept))
                    if attrs
                    else (int(labels[i]), cap)
                )
                if key not in index:
                    body = caption_body(cap)
                    for a in omit:
                        body = omit_value(body, values[a][i])
                    index[key] = len(bodies)
                    bodies.append(body)
                target[i] = index[key]
            voc.levels.append(omit)
            voc.keys.append(list(index))
            voc.texts.append([[fix_articles(t.format(b)) for b in bodies] for t in templates])
            voc.targets.append(target)
        return voc

    def all_texts(self) -> list[str]:
        return sorted({s for lvl in self.texts for tpl in lvl for s in tpl})
