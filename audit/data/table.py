"""One image-table abstraction backed by Arrow.

Columns: ``example_id`` (string), ``split`` (train/debug/test/pool), ``label`` (int32,
an index into :attr:`ImageTable.classes`), then either ``image`` (encoded PNG/JPEG bytes)
or ``path`` (a file to read), and any attribute columns (``color``, ``background``, ...).
The class list travels in the Arrow schema metadata, so a Parquet file is self-describing.
"""

from __future__ import annotations

import io
import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from audit.cache import atomic_write

SPLITS = ("train", "debug", "test", "pool")
CORE_COLUMNS = ("example_id", "split", "label", "image", "path")
#: Largest image decoded (pixels): 40 M pixels is 120 MB as RGB; a decompression bomb is refused.
MAX_PIXELS = 40_000_000


@dataclass
class DecodeError:
    item: str
    reason: str
    stage: str = "decode"

    def as_row(self) -> dict:
        return {"stage": self.stage, "item": self.item, "reason": self.reason}


@dataclass
class ImageTable:
    """An Arrow table of images plus its ordered class names."""

    table: pa.Table
    classes: list[str]
    root: str | None = None  # base directory for relative ``path`` values
    _validated: bool = field(default=False, repr=False)
    _splits: dict = field(default_factory=dict, repr=False, compare=False)  # split() results

    def __post_init__(self):
        if not self._validated:
            validate_table(self.table, self.classes)
            self._validated = True

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_parquet(cls, path: str, root: str | None = None) -> ImageTable:
        """Read a table written by :meth:`to_parquet` (or any manifest with the columns).
        Any mistake in the file is a ValueError naming it."""
        from audit.data.parquet import metadata_classes, naming_file, read_parquet_table
        from audit.data.readers import table_from_labels  # string labels, no metadata

        t = read_parquet_table(path)
        root = root or os.path.dirname(os.path.abspath(path))
        with naming_file(path):
            classes = metadata_classes(t, path)
            return (
                cls(t, classes, root=root)
                if classes is not None
                else table_from_labels(t, root=root)
            )

    def to_parquet(self, path: str) -> None:
        with atomic_write(path) as tmp:  # creates the parent directory
            pq.write_table(self.with_metadata().table, tmp, compression="zstd")

    def with_metadata(self) -> ImageTable:
        meta = dict(self.table.schema.metadata or {})
        meta[b"classes"] = json.dumps(self.classes).encode()
        return ImageTable(self.table.replace_schema_metadata(meta), self.classes, self.root, True)

    # -- views -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def columns(self) -> list[str]:
        return self.table.column_names

    @property
    def attributes(self) -> list[str]:
        """Attribute columns: everything that is not a core column."""
        return [c for c in self.columns if c not in CORE_COLUMNS]

    def split(self, name: str | Sequence[str]) -> ImageTable:
        """The rows of one split (or several); the same object on every call (its hashes and
        decodes are then done once)."""
        names = (name,) if isinstance(name, str) else tuple(name)
        if names not in self._splits:
            unknown = set(names) - set(SPLITS)
            if unknown:
                raise ValueError(
                    f"unknown split(s) {sorted(unknown)}; known splits: {list(SPLITS)}"
                )
            mask = pc.is_in(self.table["split"], value_set=pa.array(list(names)))
            self._splits[names] = ImageTable(self.table.filter(mask), self.classes, self.root, True)
        return self._splits[names]

    def take(self, indices) -> ImageTable:
        return ImageTable(
            self.table.take(pa.array(np.asarray(indices, dtype=np.int64))),
            self.classes,
            self.root,
            True,
        )

    def column(self, name: str) -> np.ndarray:
        return self.table[name].to_numpy(zero_copy_only=False)

    @property
    def labels(self) -> np.ndarray:
        return self.column("label").astype(np.int64)

    @property
    def example_ids(self) -> np.ndarray:
        return self.column("example_id")

    # -- decoding ----------------------------------------------------------------------
    def decode(
        self, size: int | tuple[int, int] | None = None, max_pixels: int = MAX_PIXELS
    ) -> tuple[np.ndarray, np.ndarray, list[DecodeError]]:
        """Decode every image to RGB uint8, each resized to one target as it is decoded.

        Returns ``(images [N_ok, H, W, 3] uint8, ok_index [N_ok] int64, errors)``: rows that
        cannot be decoded are left out of ``images`` and reported in ``errors``, never
        silently dropped. The target is ``size`` or, when None, the most common size among
        the images' headers (read without decoding), so memory is ``N x target`` whatever
        one odd image looks like. An image of more than ``max_pixels`` pixels (a
        decompression bomb) and a path that is not a regular file (a FIFO would block)
        are errors; 16-bit images are scaled to 8 bits, not clipped.
        """
        from PIL import Image

        ids = self.example_ids
        sources: list[tuple[str, object]] = [self._source(i, ids) for i in range(len(self))]
        target: tuple[int, int] | None = (
            (size, size) if isinstance(size, int) else (tuple(size) if size else None)
        )
        if target is None:
            target = _common_size(sources, max_pixels)
        h, w = target or (0, 0)
        images = np.empty(
            (len(sources) if target else 0, h, w, 3), np.uint8
        )  # filled in place: no second copy
        ok: list[int] = []
        errors: list[DecodeError] = []
        for i, (item, src) in enumerate(sources):
            try:
                if isinstance(src, Exception):
                    raise src
                with _open_image(src, max_pixels) as im:
                    if im.format == "JPEG":
                        im.draft("RGB", (w, h))  # decode a large JPEG at a reduced scale
                    rgb = _to_rgb(im)
                    if (rgb.height, rgb.width) != (h, w):
                        rgb = rgb.resize((w, h), Image.BILINEAR)
                    images[len(ok)] = np.asarray(rgb, dtype=np.uint8)
                ok.append(i)
            except Exception as e:  # noqa: BLE001 - any decoder failure costs this row only
                errors.append(DecodeError(item, f"cannot decode image: {type(e).__name__}: {e}"))
        images = images[: len(ok)] if len(ok) == len(images) else images[: len(ok)].copy()
        return images, np.asarray(ok, dtype=np.int64), errors

    def _source(self, i: int, ids) -> tuple[str, object]:
        """``(item name for error rows, encoded bytes | path | the Exception why there is none)``."""
        item = str(ids[i])
        if "image" in self.columns and (blob := self.table["image"][i].as_py()) is not None:
            return item, blob
        if "path" in self.columns and (p := self.table["path"][i].as_py()) is not None:
            p = p if os.path.isabs(p) or self.root is None else os.path.join(self.root, p)
            return f"{ids[i]} ({p})", p
        return item, ValueError("row has neither image bytes nor a path")


def _open_image(src, max_pixels: int):
    """``PIL.Image.open`` of bytes or a path, refusing non-regular files and images over ``max_pixels``
    (checked from the header, before any pixel is decoded)."""
    import stat
    import warnings

    from PIL import Image

    if isinstance(src, bytes):
        src = io.BytesIO(src)
    elif isinstance(src, str):
        mode = os.stat(src).st_mode  # follows links: a link to a FIFO is refused too
        if not stat.S_ISREG(mode):
            raise ValueError(f"{src} is not a regular file; only regular files are read")
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", Image.DecompressionBombWarning
        )  # our own limit below decides
        try:
            im = Image.open(src)
        except Image.DecompressionBombError as e:  # Pillow's own, higher limit
            raise ValueError(
                f"{e}: over the limit of {max_pixels:,} pixels (a decompression bomb?)"
            ) from None
    if im.width * im.height > max_pixels:
        im.close()
        raise ValueError(
            f"image is {im.width}x{im.height} = {im.width * im.height:,} pixels, over the limit of "
            f"{max_pixels:,} (a decompression bomb?); shrink it or raise max_pixels"
        )
    return im


def _to_rgb(im):
    """RGB of any PIL mode; 16-bit and 32-bit integer images are scaled to 0-255, not clipped."""
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im).astype(np.float64)
        if (bad := int(a.size - np.isfinite(a).sum())) > 0:  # only a float ("F") image has any
            raise ValueError(
                f"float image has {bad} NaN or infinite pixel(s) of {a.size}; they have no "
                "brightness (they would read as black): fill them or drop the image"
            )
        peak = float(np.max(a)) if a.size else 0.0
        if im.mode == "F":
            top = 1.0 if peak <= 1.0 else 255.0
        elif im.mode.startswith("I;16") or 255 < peak <= 65535:
            top = 65535.0  # 16-bit PNG/TIFF (older Pillow opens 16-bit grayscale PNG as "I")
        elif peak <= 255:
            top = 255.0
        else:
            top = float(np.iinfo(np.int32).max)
        g = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(g, "L").convert("RGB")
    im.load()
    return im.convert("RGB")


def _common_size(sources, max_pixels: int, sample: int = 2048) -> tuple[int, int] | None:
    """The most common (H, W) among the headers of up to ``sample`` evenly spaced images (the
    first such on ties), or None when none opens."""
    from collections import Counter

    counts: Counter = Counter()
    picks = (
        np.unique(
            np.linspace(0, len(sources) - 1, min(len(sources), sample)).round().astype(int)
        ).tolist()
        if sources
        else []
    )
    picked = set(picks)
    rest = (
        i for i in range(len(sources)) if i not in picked
    )  # read only while no sampled image opened
    for i in itertools.chain(picks, itertools.takewhile(lambda _: not counts, rest)):
        _, src = sources[i]
        if isinstance(src, Exception):
            continue
        try:
            with _open_image(src, max_pixels) as im:
                counts[(im.height, im.width)] += 1
        except Exception:  # noqa: BLE001 - reported when the row is decoded
            pass
    return counts.most_common(1)[0][0] if counts else None


#: Most classes a table of bare class indices may have when nothing names them: a label of 2**62
#: would otherwise ask for that many class names (16.6 GB before any other check ran).
MAX_UNNAMED_CLASSES = 100_000


def check_labels(table: pa.Table, n_classes: int | None = None) -> int:
    """The number of classes of an integer ``label`` column: ``n_classes`` when the classes
    are named, else its largest label + 1. Checked before anything is built from the labels:
    a missing, negative or too large label (at least ``n_classes``; unnamed, at least
    max(rows, :data:`MAX_UNNAMED_CLASSES`)) is a ValueError naming the first such row and the fix."""
    labels = table["label"]
    ids = table["example_id"] if "example_id" in table.column_names else None

    def row(i: int) -> str:
        return f"row {i}" + (f" (example_id={ids[i].as_py()!r})" if ids is not None else "")

    if labels.null_count:
        i = int(np.flatnonzero(labels.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(
            f"{row(i)} has no label ({labels.null_count} rows have none); give every row a "
            "class index or a class name"
        )
    a = labels.to_numpy()
    if (bad := np.flatnonzero(a < 0)).size:
        i = int(bad[0])
        raise ValueError(
            f"{row(i)} has label {int(a[i])}; labels must be non-negative class indices "
            "(0..K-1) or class names"
        )
    limit = n_classes if n_classes is not None else max(len(a), MAX_UNNAMED_CLASSES)
    if (bad := np.flatnonzero(a >= limit)).size:
        i = int(bad[0])
        fix = (
            f"outside the {n_classes} known classes; fix the label or add the class to the class list"
            if n_classes is not None
            else f"but nothing names the classes, so labels must lie below {limit:,}; give the "
            "class names (string labels, or a 'classes' JSON list in the Parquet metadata) or "
            "renumber the labels 0..K-1"
        )
        raise ValueError(f"{row(i)} has label {int(a[i])}, {fix}")
    return n_classes if n_classes is not None else (int(a.max()) + 1 if len(a) else 0)


def validate_table(table: pa.Table, classes: Sequence[str]) -> None:
    """Check the core columns; raise ValueError naming the first bad row and the fix."""
    missing = [c for c in ("example_id", "split", "label") if c not in table.column_names]
    if missing:
        raise ValueError(
            f"image table is missing column(s) {missing}; it has {table.column_names}. "
            "Every table needs example_id, split, label and one of image (bytes) or path."
        )
    if "image" not in table.column_names and "path" not in table.column_names:
        raise ValueError("image table needs an 'image' (encoded bytes) or a 'path' column")
    if not classes:
        raise ValueError("image table has an empty class list")
    labels = table["label"].to_numpy(zero_copy_only=False)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"label column must be integer class indices, got {table['label'].type}")
    bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"row {i} (example_id={table['example_id'][i].as_py()!r}) has label {int(labels[i])}, "
            f"outside the {len(classes)} known classes {list(classes)}"
        )
    splits = set(pc.unique(table["split"]).to_pylist())
    if not splits <= set(SPLITS):
        raise ValueError(
            f"unknown split value(s) {sorted(splits - set(SPLITS))}; use one of {list(SPLITS)}"
        )
    ids = table["example_id"]
    if ids.null_count:
        i = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(
            f"row {i} has a null example_id ({ids.null_count} rows do); give every row a unique example_id"
        )
    if pc.count_distinct(ids).as_py() != table.num_rows:
        seen: dict = {}
        for i, e in enumerate(ids.to_pylist()):
            if e in seen:
                raise ValueError(
                    f"example_id values must be unique: row {i} repeats example_id {e!r} of row {seen[e]}"
                )
            seen[e] = i
