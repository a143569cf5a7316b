"""The world's spec: vocabulary, planted failure modes and the caption grammar.

A TOML spec declares the items (Fashion-MNIST classes), colours, backgrounds (textures
bundled with scikit-image), image size, split sizes, seed and the planted modes;
:mod:`audit.data.world` turns a spec into images.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import tomllib

from audit.data.readers import FASHION_MNIST_CLASSES
from audit.data.table import SPLITS

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 80, 235),
    "yellow": (235, 210, 35),
    "purple": (150, 55, 200),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "pink": (245, 120, 190),
}

# caption word -> scikit-image loader name (all bundled with scikit-image, no download)
BACKGROUNDS: dict[str, str] = {
    "brick": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "moon": "moon",
    "text": "text",
    "stars": "hubble_deep_field",
    "coins": "coins",
    "cells": "cell",
}

ATTRIBUTES = ("color", "background")
SPEC_KEYS = {
    "items",
    "colors",
    "backgrounds",
    "image_size",
    "seed",
    "splits",
    "planted",
    "item_scale",
}
PLANTED_KEYS = {"class", "attribute", "value", "rate", "kind", "decoy", "decoy_rate"}


@dataclass(frozen=True)
class PlantedMode:
    cls: str
    attribute: str
    value: str
    rate: float
    kind: str  # "rare" | "association"
    decoy: str | None = None  # the class the value predicts in train (Waterbirds-style)
    decoy_rate: float = 0.0  # P(value | decoy) in train

    @property
    def group(self) -> str:
        op = "=" if self.kind == "rare" else "!="
        return f"{self.cls}:{self.attribute}{op}{self.value}"

    def in_group(self, attrs: dict) -> bool:
        hit = attrs[self.attribute] == self.value
        return hit if self.kind == "rare" else not hit


@dataclass
class WorldSpec:
    items: list[str]
    colors: list[str]
    backgrounds: list[str]
    image_size: int = 32
    seed: int = 0
    splits: dict[str, int] = field(
        default_factory=lambda: {"train": 6000, "debug": 1800, "test": 1800, "pool": 1800}
    )
    planted: list[PlantedMode] = field(default_factory=list)
    item_scale: float = 0.9
    source_text: str = ""

    @classmethod
    def from_toml(cls, path: str) -> WorldSpec:
        with open(path, "rb") as f:
            text = f.read()
        spec = cls.from_dict(tomllib.loads(text.decode()))
        spec.source_text = text.decode()
        return spec

    @classmethod
    def from_dict(cls, d: dict) -> WorldSpec:
        """A spec from a parsed TOML table; raises ValueError naming any unknown key or word."""
        unknown = set(d) - SPEC_KEYS
        if unknown:
            raise ValueError(
                f"unknown world spec key(s) {sorted(unknown)}; known keys: {sorted(SPEC_KEYS)}"
            )
        items = list(d.get("items", FASHION_MNIST_CLASSES))
        colors = list(d.get("colors", list(COLORS)[:6]))
        backgrounds = list(d.get("backgrounds", list(BACKGROUNDS)[:6]))
        _check_vocab("item", items, FASHION_MNIST_CLASSES)
        _check_vocab("colour", colors, list(COLORS))
        _check_vocab("background", backgrounds, list(BACKGROUNDS))
        splits = {"train": 6000, "debug": 1800, "test": 1800, "pool": 1800, **d.get("splits", {})}
        bad = set(splits) - set(SPLITS)
        if bad:
            raise ValueError(f"unknown split(s) {sorted(bad)} in world spec; known: {list(SPLITS)}")
        vocab = {"color": colors, "background": backgrounds}
        planted = [_planted_mode(p, items, vocab) for p in d.get("planted", [])]
        _check_planted(planted)
        return cls(
            items=items,
            colors=colors,
            backgrounds=backgrounds,
            image_size=int(d.get("image_size", 32)),
            seed=int(d.get("seed", 0)),
            splits={k: int(v) for k, v in splits.items()},
            planted=planted,
            item_scale=float(d.get("item_scale", 0.9)),
        )

    def vocab(self, attribute: str) -> list[str]:
        return {"color": self.colors, "background": self.backgrounds}[attribute]

    def train_distribution(self, cls: str, attribute: str) -> np.ndarray:
        """P(attribute value | class) in train: planted values (the class's own mode, decoys
        pointing at it) at their rates, the rest uniform over what is left."""
        values = self.vocab(attribute)
        fixed = _fixed_shares(self.planted, cls, attribute)
        free = [v for v in values if v not in fixed]
        rest = max(0.0, 1.0 - sum(fixed.values()))
        return np.array([fixed.get(v, rest / len(free) if free else 0.0) for v in values])

    def caption(self, item: str, color: str | None = None, background: str | None = None) -> str:
        words = " ".join(w for w in (color, item) if w)
        article = "an" if words[0] in "aeiou" else "a"
        text = f"a photo of {article} {words}"
        return f"{text} on {background}" if background else text

    def parse_caption(self, caption: str) -> dict[str, str | None]:
        """``"a photo of a blue pullover on grass"`` -> {item, color, background}.

        Raises ValueError listing the vocabulary when a word is outside the grammar.
        """
        text = caption.strip().lower().rstrip(".")
        m = re.fullmatch(
            r"(?:a )?(?:photo|picture|image) of (?:a|an|the) (.+?)(?: on (?:a |an |the )?(.+))?",
            text,
        )
        if not m:
            raise ValueError(
                f"caption {caption!r} does not follow the grammar 'a photo of a [COLOUR] ITEM [on BACKGROUND]'; "
                + self._vocab_text()
            )
        obj, bg = m.group(1), m.group(2)
        color = None
        for c in sorted(self.colors, key=len, reverse=True):
            if obj.startswith(c + " "):
                color, obj = c, obj[len(c) + 1 :]
                break
        item = obj.rstrip("s") if obj not in self.items and obj.rstrip("s") in self.items else obj
        problems = []
        if item not in self.items:
            first = obj.split(" ")[0]
            if len(obj.split(" ")) > 1 and first not in self.colors and first not in self.items:
                problems.append(f"unknown colour {first!r}")
            else:
                problems.append(f"unknown item {obj!r}")
        if bg is not None and bg not in self.backgrounds:
            problems.append(f"unknown background {bg!r}")
        if problems:
            raise ValueError(f"caption {caption!r}: {'; '.join(problems)}. " + self._vocab_text())
        return {"item": item, "color": color, "background": bg}

    def _vocab_text(self) -> str:
        return f"Vocabulary: colours {self.colors}; items {self.items}; backgrounds {self.backgrounds}."


def _planted_mode(p: dict, items: list[str], vocab: dict[str, list[str]]) -> PlantedMode:
    """One ``[[planted]]`` table as a :class:`PlantedMode`, checked against the world's
    ``items`` and attribute ``vocab``; ``kind`` defaults by the rate (below uniform: rare)."""
    cls_, attr, value, rate = (
        p.get("class"),
        p.get("attribute"),
        p.get("value"),
        float(p.get("rate", -1)),
    )
    if cls_ not in items:
        raise ValueError(f"planted mode names class {cls_!r}; the world's items are {items}")
    if attr not in vocab:
        raise ValueError(f"planted mode attribute {attr!r} is not one of {list(vocab)}")
    if value not in vocab[attr]:
        raise ValueError(f"planted {attr} {value!r} is not in the spec's {attr}s {vocab[attr]}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(
            f"planted mode {cls_}/{attr}={value} needs a rate in [0, 1], got {p.get('rate')}"
        )
    uniform = 1.0 / len(vocab[attr])
    kind = p.get("kind", "rare" if rate < uniform else "association")
    if kind not in ("rare", "association"):
        raise ValueError(f"planted mode kind must be 'rare' or 'association', got {kind!r}")
    decoy, decoy_rate = p.get("decoy"), float(p.get("decoy_rate", 0.0))
    where = f"planted mode {cls_}/{attr}={value}"
    unknown_keys = set(p) - PLANTED_KEYS
    if unknown_keys:
        raise ValueError(
            f"{where}: unknown key(s) {sorted(unknown_keys)}; known: class, attribute, value, "
            "rate, kind, decoy, decoy_rate"
        )
    if decoy is not None:
        _check_decoy(where, p, kind, uniform, items)
    return PlantedMode(cls_, attr, value, rate, kind, decoy, decoy_rate)


def _check_decoy(where: str, p: dict, kind: str, uniform: float, items: list[str]) -> None:
    """A decoy is another item that the rare value predicts in train (rate above uniform)."""
    decoy, decoy_rate = p.get("decoy"), float(p.get("decoy_rate", 0.0))
    if kind != "rare":
        raise ValueError(
            f"{where}: a decoy needs a rare mode (rate below {uniform:.3f}), not {kind!r}"
        )
    if decoy not in items or decoy == p.get("class"):
        raise ValueError(f"{where}: decoy {decoy!r} must be another of the world's items {items}")
    if not uniform < decoy_rate <= 1.0:
        raise ValueError(
            f"{where}: decoy_rate must be in ({uniform:.3f}, 1] so the value predicts "
            f"{decoy!r}, got {p.get('decoy_rate')}"
        )


def _check_planted(planted: list[PlantedMode]) -> None:
    """At most one mode per (class, attribute), and fixed train shares that fit in 1."""
    seen = {}
    for m in planted:
        key = (m.cls, m.attribute)
        if key in seen:
            raise ValueError(
                f"two planted modes for class {m.cls!r} and attribute {m.attribute!r}; give one"
            )
        seen[key] = m
    for who, attr in {(w, m.attribute) for m in planted for w in (m.cls, m.decoy) if w}:
        fixed = _fixed_shares(planted, who, attr)  # raises on a value fixed twice
        if sum(fixed.values()) > 1.0 + 1e-9:
            raise ValueError(
                f"planted train shares for {who!r}/{attr} add up to more than 1: {fixed}"
            )


def _fixed_shares(planted: list[PlantedMode], cls: str, attribute: str) -> dict[str, float]:
    """The train shares a class's ``attribute`` values are fixed at: its own planted mode's
    value, and the value of every mode that names it as the decoy."""
    fixed: dict[str, float] = {}
    for m in planted:
        if m.attribute != attribute:
            continue
        for who, value, rate in ((m.cls, m.value, m.rate), (m.decoy, m.value, m.decoy_rate)):
            if who != cls:
                continue
            if value in fixed:
                raise ValueError(f"two planted shares for {cls!r}/{attribute}={value}; give one")
            fixed[value] = rate
    return fixed


def _check_vocab(kind: str, values: list[str], known: list[str]) -> None:
    bad = [v for v in values if v not in known]
    if bad:
        raise ValueError(f"unknown {kind}(s) {bad}; known {kind}s: {known}")
    if len(set(values)) != len(values):
        raise ValueError(f"duplicate {kind}s in {values}")
