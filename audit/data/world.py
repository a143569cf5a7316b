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
import json
import os
import shutil
from functools import cached_property

import numpy as np
import pyarrow as pa

from audit.cache import atomic_write
from audit.data.readers import FASHION_MNIST_CLASSES, load_fashion_mnist_arrays
from audit.data.table import SPLITS, ImageTable
from audit.data.world_spec import ATTRIBUTES, BACKGROUNDS, COLORS, PlantedMode, WorldSpec

__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "COLORS",
    "PlantedMode",
    "WorldSpec",
    "Compositor",
    "WorldBuilder",
    "WorldRenderer",
    "build_world",
    "export_manifest",
]


#: a world's columns, in order
COLUMNS = (
    "example_id",
    "split",
    "label",
    "image",
    "item",
    "color",
    "background",
    "group",
    "caption",
)


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
        return (
            np.asarray(
                Image.fromarray(patch).resize((self.size, self.size), Image.BILINEAR), np.float32
            )
            / 255
        )

    def render(
        self, item: np.ndarray, color: str, background: str, rng: np.random.Generator
    ) -> np.ndarray:
        from PIL import Image

        s = self.size
        bg = self.background(background, rng)
        side = max(8, int(round(s * self.item_scale * rng.uniform(0.9, 1.0))))
        alpha = (
            np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR), np.float32) / 255
        )
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
        """Every split of the spec, rendered: an :class:`ImageTable` with the world's columns
        (:data:`COLUMNS`). One generator seeded by the spec draws everything, split by split."""
        rng = np.random.default_rng(self.spec.seed)
        cols: dict[str, list] = {k: [] for k in COLUMNS}
        for split in SPLITS:
            n = self.spec.splits.get(split, 0)
            if n == 0:
                continue
            rows = self._plan(split, n, rng)
            self._render(split, rows, rng, cols)
        table = pa.table(
            {
                **{
                    k: pa.array(v, pa.string())
                    for k, v in cols.items()
                    if k not in ("label", "image")
                },
                "label": pa.array(cols["label"], pa.int32()),
                "image": pa.array(cols["image"], pa.binary()),
            }
        ).select(list(COLUMNS))
        return ImageTable(table, list(self.spec.items))

    def _plan(self, split: str, n: int, rng: np.random.Generator) -> list[tuple]:
        """``n`` rows ``(class index, item, colour, background, source index)``, classes
        balanced; attribute values at the train distribution in train, uniform elsewhere."""
        spec = self.spec
        n_cls = len(spec.items)
        per_class = _exact_counts(np.full(n_cls, 1.0 / n_cls), n)
        rows = []
        for ci, item in enumerate(spec.items):
            k = int(per_class[ci])
            attrs = {}
            for attr in ATTRIBUTES:
                values = spec.vocab(attr)
                probs = (
                    spec.train_distribution(item, attr)
                    if split == "train"
                    else np.full(len(values), 1 / len(values))
                )
                counts = _exact_counts(probs, k)
                seq = np.repeat(np.arange(len(values)), counts)
                attrs[attr] = [values[j] for j in rng.permutation(seq)]
            sources = self._sources[split][item]
            picks = rng.choice(sources, size=k, replace=k > len(sources))
            for j in range(k):
                rows.append((ci, item, attrs["color"][j], attrs["background"][j], int(picks[j])))
        return rows

    def _render(self, split: str, rows: list[tuple], rng: np.random.Generator, cols: dict) -> None:
        """Render ``rows`` in a random order, appending each example's columns to ``cols``."""
        spec = self.spec
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


def build_world(
    spec_path: str, out_dir: str, fmnist_dir: str | None = None, force: bool = False
) -> ImageTable:
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
    source = os.path.join(out_dir, SOURCE)
    if fmnist_dir:  # the renderer draws its items from the same files
        with atomic_write(source) as tmp, open(tmp, "w") as f:
            json.dump({"fashion_mnist": os.path.abspath(fmnist_dir)}, f)
    elif os.path.exists(source):
        os.remove(source)
    with atomic_write(out_spec) as tmp:
        shutil.copyfile(spec_path, tmp)
    return table


#: in a world directory: where its Fashion-MNIST items came from, when not the default files
SOURCE = "source.json"


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
        """The renderer of a built world, drawing items from the Fashion-MNIST files the world
        was built from (``source.json``; else the default ones)."""
        spec = WorldSpec.from_toml(os.path.join(world_dir, "spec.toml"))
        source = os.path.join(world_dir, SOURCE)
        if not os.path.exists(source):
            return cls(spec)
        with open(source) as f:
            try:
                fmnist_dir = json.load(f).get("fashion_mnist")
            except (ValueError, AttributeError) as e:
                raise ValueError(
                    f"{source}: not a JSON object naming the world's Fashion-MNIST directory ({e}); "
                    "rebuild the world (zoo-audit world build --force)"
                ) from None
        return cls(spec, load_fashion_mnist_arrays(fmnist_dir) if fmnist_dir else None)

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
            bg = (
                parsed["background"]
                or self.spec.backgrounds[rng.integers(len(self.spec.backgrounds))]
            )
            out.append(self.compositor.render(pool[rng.integers(len(pool))], color, bg, rng))
        return np.stack(out)


def export_manifest(
    table: ImageTable, path: str, columns: tuple[str, ...] = ("item", "color", "background")
) -> str:
    """Write a world as a user would hand over a dataset: a plain Parquet manifest
    (``example_id, split, label`` as integers, ``image`` bytes and the ``columns`` kept) with
    no class list in its metadata, no spec, no captions and no ``group`` ground truth."""
    import pyarrow.parquet as pq

    keep = ["example_id", "split", "label", "image", *columns]
    t = table.table.select(keep).replace_schema_metadata(None)
    with atomic_write(path) as tmp:
        pq.write_table(t, tmp, compression="zstd")
    return path
