"""A third planted dataset, of this benchmark's own design (not a world): shapes on photographs.

Eight shapes (the classes) drawn in one of eight colours, at one of two sizes, on a crop of
one of six photographs shipped with scikit-image; 32x32 RGB. Handed over as a plain Parquet
manifest (``examples.parquet``: example_id, split, label, image PNG bytes, a ``shape`` column
naming the classes, ``color`` and ``background`` columns, and ``group``: the planted truth,
which the audit never uses for a choice). Planted in train only (debug, test and pool are
balanced over every attribute):

- rare colours with a decoy (Waterbirds-style): purple is 1% of squares and 70% of diamonds;
  cyan is 1% of stars and 70% of crosses;
- a rare background with a decoy: triangles are on ``coffee`` 1% of the time, arrows 70%;
- a rare value of an attribute the manifest does not carry: small circles are 2% of circles
  (rings are small 80% of the time); ``size`` is left out of the manifest, so no caption can
  name that mode: the audit should report it unnamed.

    python benchmarks/make_shapes.py --out runs/shapes [--scale 0.5]
"""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond", "ring", "arrow"]
COLORS = {
    "red": (220, 40, 40),
    "orange": (240, 140, 20),
    "yellow": (235, 220, 40),
    "green": (40, 170, 60),
    "cyan": (40, 210, 220),
    "blue": (40, 70, 220),
    "purple": (150, 50, 200),
    "white": (245, 245, 245),
}
BACKGROUNDS = ["camera", "coffee", "chelsea", "rocket", "astronaut", "immunohistochemistry"]
SIZES = ["small", "large"]
SPLITS = {"train": 6000, "debug": 1600, "test": 1600, "pool": 1600}
#: (class, attribute, value, rate in train, decoy class, decoy rate)
PLANTED = [
    ("square", "color", "purple", 0.01, "diamond", 0.7),
    ("star", "color", "cyan", 0.01, "cross", 0.7),
    ("triangle", "background", "coffee", 0.01, "arrow", 0.7),
    ("circle", "size", "small", 0.02, "ring", 0.8),
]
VALUES = {"color": list(COLORS), "background": BACKGROUNDS, "size": SIZES}


def _textures(names: list[str], size: int = 32) -> dict[str, np.ndarray]:
    """Each background photograph (scikit-image's) as float RGB [0, 1], large enough to crop
    from."""
    from skimage import data, transform

    out = {}
    for name in names:
        img = np.asarray(getattr(data, name)(), float)
        img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
        out[name] = transform.resize(img / img.max(), (4 * size, 4 * size), anti_aliasing=True)
    return out


def _polygon(shape: str, c: float, r: float) -> list[tuple[float, float]] | None:
    a = np.linspace(0, 2 * np.pi, 6)[:-1] - np.pi / 2
    pts = {
        "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
        "triangle": [(0, -1.1), (1.1, 0.9), (-1.1, 0.9)],
        "diamond": [(0, -1.2), (0.8, 0), (0, 1.2), (-0.8, 0)],
        "star": [
            p
            for k in range(5)
            for p in (
                (np.cos(a[k]), np.sin(a[k])),
                (0.45 * np.cos(a[k] + np.pi / 5), 0.45 * np.sin(a[k] + np.pi / 5)),
            )
        ],
        "cross": [
            (-0.35, -1),
            (0.35, -1),
            (0.35, -0.35),
            (1, -0.35),
            (1, 0.35),
            (0.35, 0.35),
            (0.35, 1),
            (-0.35, 1),
            (-0.35, 0.35),
            (-1, 0.35),
            (-1, -0.35),
            (-0.35, -0.35),
        ],
        "arrow": [
            (-1, -0.3),
            (0.2, -0.3),
            (0.2, -0.8),
            (1.1, 0),
            (0.2, 0.8),
            (0.2, 0.3),
            (-1, 0.3),
        ],
    }.get(shape)
    return None if pts is None else [(c + r * x, c + r * y) for x, y in pts]


def shape_mask(shape: str, size: str, rng):
    """A 96x96 greyscale mask of a jittered shape (255 inside)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (96, 96), 0)
    d = ImageDraw.Draw(canvas)
    r = (17 if size == "small" else 30) * rng.uniform(0.9, 1.1)
    c = 48 + rng.uniform(-8, 8)
    if shape in ("circle", "ring"):
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
        if shape == "ring":
            d.ellipse([c - 0.55 * r, c - 0.55 * r, c + 0.55 * r, c + 0.55 * r], fill=0)
    else:
        d.polygon(_polygon(shape, c, r), fill=255)
    return canvas


def composite(make_mask, color: tuple, background: str, rng, textures) -> np.ndarray:
    """One 32x32 uint8 image: the 96x96 mask that ``make_mask()`` draws, rotated a little and
    tinted ``color``, on a random crop of the ``background`` photograph at half contrast, with
    pixel noise."""
    from PIL import Image

    tex = textures[background]
    y, x = rng.integers(0, tex.shape[0] - 32, 2)
    crop = tex[y : y + 32, x : x + 32]
    crop = 0.5 * crop + 0.5 * crop.mean((0, 1))  # the photograph at half contrast
    bg = (crop * 255).astype(np.uint8).astype(float)
    m = (
        make_mask()
        .rotate(rng.uniform(-15, 15), resample=Image.BILINEAR)
        .resize((32, 32), Image.BILINEAR)
    )
    tint = np.asarray(color, float) * rng.uniform(0.85, 1.0)
    m = np.asarray(m, float)[..., None] / 255
    img = bg * (1 - m) + tint * m + rng.normal(0, 4, (32, 32, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def draw(shape: str, color: str, background: str, size: str, rng, textures) -> np.ndarray:
    """One 32x32 uint8 image: a jittered, rotated shape on a random crop of the photograph."""
    return composite(lambda: shape_mask(shape, size, rng), COLORS[color], background, rng, textures)


@dataclass(frozen=True)
class Design:
    """A planted dataset: its classes (named by ``class_column``), each attribute's values,
    the planted rules (class, attribute, value, rate in train, decoy class, decoy rate), the
    attributes the manifest carries, the background photographs and the drawer
    ``draw(label, attrs, rng, textures) -> uint8 [32, 32, 3]``."""

    classes: list[str]
    class_column: str
    values: dict[str, list[str]]
    planted: list[tuple]
    carried: tuple[str, ...]
    backgrounds: list[str]
    draw: Callable
    splits: dict[str, int] = field(default_factory=lambda: dict(SPLITS))


def _attribute_draw(design: Design, rng, label: str, split: str) -> dict[str, str]:
    """One example's attributes: uniform, except the planted shares in train."""
    out = {a: str(rng.choice(v)) for a, v in design.values.items()}
    if split != "train":
        return out
    for cls, attr, value, rate, decoy, decoy_rate in design.planted:
        others = [v for v in design.values[attr] if v != value]
        if label == cls:
            out[attr] = value if rng.random() < rate else str(rng.choice(others))
        elif label == decoy:
            out[attr] = value if rng.random() < decoy_rate else str(rng.choice(others))
    return out


def _group(design: Design, label: str, attrs: dict[str, str]) -> str:
    hits = [f"{c}:{a}={v}" for c, a, v, *_ in design.planted if label == c and attrs[a] == v]
    return "|".join(hits)


def build_design(design: Design, out: str, scale: float = 1.0, seed: int = 0) -> str:
    """Write ``OUT/examples.parquet`` (example_id, split, label, image PNG bytes, the class
    column, the carried attributes, ``group``: the planted truth); returns its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    textures = _textures(design.backgrounds)
    keys = ("example_id", "split", "label", "image", design.class_column, *design.carried)
    rows: dict[str, list] = {k: [] for k in (*keys, "group")}
    for split, n in design.splits.items():
        for i in range(int(n * scale)):
            label = design.classes[i % len(design.classes)]
            attrs = _attribute_draw(design, rng, label, split)
            buf = io.BytesIO()
            Image.fromarray(design.draw(label, attrs, rng, textures)).save(buf, "PNG")
            row = {"example_id": f"{split}-{i:05d}", "split": split, "image": buf.getvalue()}
            row |= {"label": design.classes.index(label), design.class_column: label}
            row |= {a: attrs[a] for a in design.carried} | {"group": _group(design, label, attrs)}
            for k, v in row.items():
                rows[k].append(v)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "examples.parquet")
    pq.write_table(pa.table(rows), path)
    return path


DESIGN = Design(
    classes=SHAPES,
    class_column="shape",
    values=VALUES,
    planted=PLANTED,
    carried=("color", "background"),
    backgrounds=BACKGROUNDS,
    draw=lambda label, a, rng, tex: draw(label, a["color"], a["background"], a["size"], rng, tex),
)


def build(out: str, scale: float = 1.0, seed: int = 0) -> str:
    """Write the shapes' ``OUT/examples.parquet``; returns its path."""
    return build_design(DESIGN, out, scale, seed)


def cli(design: Design, doc: str, argv=None) -> None:
    """A design's command line: ``--out DIR [--scale S] [--seed N]``; prints the manifest."""
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of each split's size")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(build_design(design, a.out, a.scale, a.seed))


def main(argv=None) -> None:
    cli(DESIGN, __doc__, argv)


if __name__ == "__main__":
    main()
