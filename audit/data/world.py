"""The world: a benchmark with ground truth and planted failure modes.

Fashion-MNIST items are tinted in a colour and alpha-composited onto a real texture
shipped with scikit-image. A TOML spec declares the vocabulary, image size, split sizes,
seed and the planted failure modes:

- ``rare``: a value of an attribute is rare for a class in train (blue pullovers at 3% of
  pullovers); the planted group is the class with that value.
- ``association``: a value dominates a class in train (sandals on grass 90% of the time);
  the planted group is the class *without* that value.
- a rare mode may name a ``decoy`` class (Waterbirds-style): in train the value is mostly
  where the decoy class is (``decoy_rate`` of it), so the value predicts the decoy and the
  rare group (sandals on grass, where sneakers live) is mistaken for it. Only the rare group
  is ground truth; the decoy's share is its cause.

debug/test/pool are balanced over every attribute. Captions follow one grammar,
``"a photo of a [COLOUR] ITEM [on BACKGROUND]"``, and :class:`WorldRenderer` turns such a
caption and a seed into new images, which makes the world its own offline text-to-image
generator.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa
import tomllib

from audit.cache import atomic_write
from audit.data.readers import FASHION_MNIST_CLASSES, load_fashion_mnist_arrays
from audit.data.table import SPLITS, ImageTable

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
    splits: dict[str, int] = field(default_factory=lambda: {"train": 6000, "debug": 1800, "test": 1800, "pool": 1800})
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
        known = {"items", "colors", "backgrounds", "image_size", "seed", "splits", "planted", "item_scale"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown world spec key(s) {sorted(unknown)}; known keys: {sorted(known)}")
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
        planted = []
        for p in d.get("planted", []):
            cls_, attr, value, rate = p.get("class"), p.get("attribute"), p.get("value"), float(p.get("rate", -1))
            if cls_ not in items:
                raise ValueError(f"planted mode names class {cls_!r}; the world's items are {items}")
            if attr not in vocab:
                raise ValueError(f"planted mode attribute {attr!r} is not one of {list(vocab)}")
            if value not in vocab[attr]:
                raise ValueError(f"planted {attr} {value!r} is not in the spec's {attr}s {vocab[attr]}")
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"planted mode {cls_}/{attr}={value} needs a rate in [0, 1], got {p.get('rate')}")
            uniform = 1.0 / len(vocab[attr])
            kind = p.get("kind", "rare" if rate < uniform else "association")
            if kind not in ("rare", "association"):
                raise ValueError(f"planted mode kind must be 'rare' or 'association', got {kind!r}")
            decoy, decoy_rate = p.get("decoy"), float(p.get("decoy_rate", 0.0))
            where = f"planted mode {cls_}/{attr}={value}"
            unknown_keys = set(p) - {"class", "attribute", "value", "rate", "kind", "decoy", "decoy_rate"}
            if unknown_keys:
                raise ValueError(f"{where}: unknown key(s) {sorted(unknown_keys)}; known: class, attribute, value, "
                                 "rate, kind, decoy, decoy_rate")  # fmt: skip
            if decoy is not None:
                if kind != "rare":
                    raise ValueError(f"{where}: a decoy needs a rare mode (rate below {uniform:.3f}), not {kind!r}")
                if decoy not in items or decoy == cls_:
                    raise ValueError(f"{where}: decoy {decoy!r} must be another of the world's items {items}")
                if not uniform < decoy_rate <= 1.0:
                    raise ValueError(f"{where}: decoy_rate must be in ({uniform:.3f}, 1] so the value predicts "
                                     f"{decoy!r}, got {p.get('decoy_rate')}")  # fmt: skip
            planted.append(PlantedMode(cls_, attr, value, rate, kind, decoy, decoy_rate))
        seen = {}
        for m in planted:
            key = (m.cls, m.attribute)
            if key in seen:
                raise ValueError(f"two planted modes for class {m.cls!r} and attribute {m.attribute!r}; give one")
            seen[key] = m
        for who, attr in {(w, m.attribute) for m in planted for w in (m.cls, m.decoy) if w}:
            fixed = _fixed_shares(planted, who, attr)  # raises on a value fixed twice
            if sum(fixed.values()) > 1.0 + 1e-9:
                raise ValueError(f"planted train shares for {who!r}/{attr} add up to more than 1: {fixed}")
        return cls(
            items=items, colors=colors, backgrounds=backgrounds,
            image_size=int(d.get("image_size", 32)), seed=int(d.get("seed", 0)),
            splits={k: int(v) for k, v in splits.items()}, planted=planted,
            item_scale=float(d.get("item_scale", 0.9)),
        )  # fmt: skip

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
        m = re.fullmatch(r"(?:a )?(?:photo|picture|image) of (?:a|an|the) (.+?)(?: on (?:a |an |the )?(.+))?", text)
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


def _exact_counts(probs: np.ndarray, n: int) -> np.ndarray:
    """Integer counts summing to n, closest to probs * n (largest remainder)."""
    raw = probs * n
    counts = np.floor(raw).astype(int)
    rest = n - counts.sum()
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts


class Textures:
    """scikit-image textures as float RGB arrays in [0, 1], loaded lazily once."""

    def __init__(self):
        self._cache: dict[str, np.ndarray] = {}

    def get(self, name: str) -> np.ndarray:
        if name not in self._cache:
            from skimage import data as skdata
            from skimage.util import img_as_float

            img = img_as_float(getattr(skdata, BACKGROUNDS[name])())
            if img.ndim == 2:
                img = np.stack([img] * 3, axis=-1)
            img = img[..., :3]
            # stretch contrast so every texture spans a similar range, then keep it mid-grey
            lo, hi = np.percentile(img, [2, 98])
            img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
            self._cache[name] = (0.15 + 0.7 * img).astype(np.float32)
        return self._cache[name]


class Compositor:
    """Renders (item image, colour, background) triples to uint8 RGB images."""

    def __init__(self, size: int, item_scale: float = 0.9):
        self.size = size
        self.item_scale = item_scale
        self.textures = Textures()

    def background(self, name: str, rng: np.random.Generator) -> np.ndarray:
        from PIL import Image

        tex = self.textures.get(name)
        h, w = tex.shape[:2]
        crop = int(min(h, w) * rng.uniform(0.25, 0.45))
        y, x = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
        patch = (tex[y : y + crop, x : x + crop] * 255).astype(np.uint8)
        return np.asarray(Image.fromarray(patch).resize((self.size, self.size), Image.BILINEAR), np.float32) / 255

    def render(self, item: np.ndarray, color: str, background: str, rng: np.random.Generator) -> np.ndarray:
        from PIL import Image

        s = self.size
        bg = self.background(background, rng)
        side = max(8, int(round(s * self.item_scale * rng.uniform(0.9, 1.0))))
        alpha = np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR), np.float32) / 255
        oy, ox = rng.integers(0, s - side + 1), rng.integers(0, s - side + 1)
        a = np.zeros((s, s), np.float32)
        a[oy : oy + side, ox : ox + side] = alpha
        tint = np.asarray(COLORS[color], np.float32) / 255
        shade = (0.55 + 0.45 * a)[..., None] * tint
        mask = np.clip(a * 1.6, 0, 1)[..., None]
        out = bg * (1 - mask) + shade * mask
        return np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


class WorldBuilder:
    def __init__(self, spec: WorldSpec, fmnist: dict | None = None):
        self.spec = spec
        self.fmnist = fmnist or load_fashion_mnist_arrays()
        self.compositor = Compositor(spec.image_size, spec.item_scale)

    @cached_property
    def _sources(self) -> dict[str, dict[str, np.ndarray]]:
        """Per source split and class, the Fashion-MNIST indices to draw items from.

        train/pool items come from Fashion-MNIST train, debug/test items from its t10k
        file (debug the first half, test the second), so no item image leaks across.
        """
        out = {}
        tr_imgs, tr_lab = self.fmnist["train"]
        te_imgs, te_lab = self.fmnist["test"]
        half = len(te_lab) // 2
        for split in SPLITS:
            out[split] = {}
            for item in self.spec.items:
                c = FASHION_MNIST_CLASSES.index(item)
                if split in ("train", "pool"):
                    idx = np.flatnonzero(tr_lab == c)
                    # disjoint halves for train and pool
                    idx = idx[: len(idx) * 5 // 6] if split == "train" else idx[len(idx) * 5 // 6 :]
                else:
                    idx = np.flatnonzero(te_lab == c)
                    idx = idx[idx < half] if split == "debug" else idx[idx >= half]
                out[split][item] = idx
        return out

    def _images(self, split: str) -> np.ndarray:
        return self.fmnist["train"][0] if split in ("train", "pool") else self.fmnist["test"][0]

    def build(self) -> ImageTable:
        spec = self.spec
        rng = np.random.default_rng(spec.seed)
        cols: dict[str, list] = {k: [] for k in ("example_id", "split", "label", "image", "item", "color", "background", "group", "caption")}
        n_cls = len(spec.items)
        for split in SPLITS:
            n = spec.splits.get(split, 0)
            if n == 0:
                continue
            per_class = _exact_counts(np.full(n_cls, 1.0 / n_cls), n)
            rows = []
            for ci, item in enumerate(spec.items):
                k = int(per_class[ci])
                attrs = {}
                for attr in ATTRIBUTES:
                    values = spec.vocab(attr)
                    probs = spec.train_distribution(item, attr) if split == "train" else np.full(len(values), 1 / len(values))
                    counts = _exact_counts(probs, k)
                    seq = np.repeat(np.arange(len(values)), counts)
                    attrs[attr] = [values[j] for j in rng.permutation(seq)]
                sources = self._sources[split][item]
                picks = rng.choice(sources, size=k, replace=k > len(sources))
                for j in range(k):
                    rows.append((ci, item, attrs["color"][j], attrs["background"][j], int(picks[j])))
            order = rng.permutation(len(rows))
            images = self._images(split)
            for pos, r in enumerate(order):
                ci, item, color, bg, src = rows[r]
                img = self.compositor.render(images[src], color, bg, rng)
                a = {"color": color, "background": bg}
                groups = [m.group for m in spec.planted if m.cls == item and m.in_group(a)]
                cols["example_id"].append(f"{split}-{pos:06d}")
                cols["split"].append(split)
                cols["label"].append(ci)
                cols["image"].append(_png(img))
                cols["item"].append(item)
                cols["color"].append(color)
                cols["background"].append(bg)
                cols["group"].append("|".join(groups))
                cols["caption"].append(spec.caption(item, color, bg))
        table = pa.table(
            {
                **{k: pa.array(v, pa.string()) for k, v in cols.items() if k not in ("label", "image")},
                "label": pa.array(cols["label"], pa.int32()),
                "image": pa.array(cols["image"], pa.binary()),
            }
        ).select(["example_id", "split", "label", "image", "item", "color", "background", "group", "caption"])
        return ImageTable(table, list(spec.items))


def build_world(spec_path: str, out_dir: str, fmnist_dir: str | None = None, force: bool = False) -> ImageTable:
    """Build the world of ``spec_path`` into ``out_dir`` (examples.parquet, spec.toml).

    Skips the work when ``out_dir`` already holds a world built from byte-identical spec text.
    """
    spec = WorldSpec.from_toml(spec_path)
    out_spec = os.path.join(out_dir, "spec.toml")
    out_examples = os.path.join(out_dir, "examples.parquet")
    if not force and os.path.exists(out_examples) and os.path.exists(out_spec):
        with open(out_spec) as f:
            if f.read() == spec.source_text:
                return ImageTable.from_parquet(out_examples)
    fm = load_fashion_mnist_arrays(fmnist_dir)
    table = WorldBuilder(spec, fm).build()
    os.makedirs(out_dir, exist_ok=True)
    table.to_parquet(out_examples)
    with atomic_write(out_spec) as tmp:
        shutil.copyfile(spec_path, tmp)
    return table


class WorldRenderer:
    """Turns grammar captions and seeds into new world images (the offline generator).

    Items are drawn from Fashion-MNIST train images, so rendered images never reuse a
    debug/test item. Same (caption, seed, n) -> same pixels.
    """

    def __init__(self, spec: WorldSpec, fmnist: dict | None = None):
        self.spec = spec
        self._fmnist = fmnist
        self.compositor = Compositor(spec.image_size, spec.item_scale)

    @classmethod
    def from_world_dir(cls, world_dir: str) -> WorldRenderer:
        return cls(WorldSpec.from_toml(os.path.join(world_dir, "spec.toml")))

    @cached_property
    def _items(self) -> dict[str, np.ndarray]:
        imgs, labels = (self._fmnist or load_fashion_mnist_arrays())["train"]
        return {it: imgs[labels == FASHION_MNIST_CLASSES.index(it)] for it in self.spec.items}

    def render(self, caption: str, seed: int = 0, n: int = 1) -> np.ndarray:
        """``n`` images [n, H, W, 3] uint8 showing ``caption``; unspecified attributes vary."""
        parsed = self.spec.parse_caption(caption)
        rng = np.random.default_rng([int(seed), *caption.encode()])
        pool = self._items[parsed["item"]]
        out = []
        for _ in range(n):
            color = parsed["color"] or self.spec.colors[rng.integers(len(self.spec.colors))]
            bg = parsed["background"] or self.spec.backgrounds[rng.integers(len(self.spec.backgrounds))]
            out.append(self.compositor.render(pool[rng.integers(len(pool))], color, bg, rng))
        return np.stack(out)


def export_manifest(table: ImageTable, path: str, columns: tuple[str, ...] = ("item", "color", "background")) -> str:
    """Write a world as a user would hand over a dataset: a plain Parquet manifest
    (``example_id, split, label`` as integers, ``image`` bytes and the ``columns`` kept) with
    no class list in its metadata, no spec, no captions and no ``group`` ground truth."""
    import pyarrow.parquet as pq

    keep = ["example_id", "split", "label", "image", *columns]
    t = table.table.select(keep).replace_schema_metadata(None)
    with atomic_write(path) as tmp:
        pq.write_table(t, tmp, compression="zstd")
    return path
