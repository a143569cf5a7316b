"""One image-table abstraction backed by Arrow.

Columns: ``example_id`` (string), ``split`` (train/debug/test/pool), ``label`` (int32,
an index into :attr:`ImageTable.classes`), then either ``image`` (encoded PNG/JPEG bytes)
or ``path`` (a file to read), and any attribute columns (``color``, ``background``, ...).
The class list travels in the Arrow schema metadata, so a Parquet file is self-describing.
"""

from __future__ import annotations

import io
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

    def __post_init__(self):
        if not self._validated:
            validate_table(self.table, self.classes)
            self._validated = True

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_parquet(cls, path: str, root: str | None = None) -> ImageTable:
        """Read a table written by :meth:`to_parquet` (or any manifest with the columns)."""
        t = pq.read_table(path)
        meta = t.schema.metadata or {}
        if b"classes" in meta:
            classes = json.loads(meta[b"classes"])
            return cls(t, classes, root=root or os.path.dirname(os.path.abspath(path)))
        from audit.data.readers import table_from_labels  # string labels, no metadata

        return table_from_labels(t, root=root or os.path.dirname(os.path.abspath(path)))

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
        names = [name] if isinstance(name, str) else list(name)
        unknown = set(names) - set(SPLITS)
        if unknown:
            raise ValueError(f"unknown split(s) {sorted(unknown)}; known splits: {list(SPLITS)}")
        mask = pc.is_in(self.table["split"], value_set=pa.array(names))
        return ImageTable(self.table.filter(mask), self.classes, self.root, True)

    def take(self, indices) -> ImageTable:
        return ImageTable(self.table.take(pa.array(np.asarray(indices, dtype=np.int64))), self.classes, self.root, True)

    def column(self, name: str) -> np.ndarray:
        return self.table[name].to_numpy(zero_copy_only=False)

    @property
    def labels(self) -> np.ndarray:
        return self.column("label").astype(np.int64)

    @property
    def example_ids(self) -> np.ndarray:
        return self.column("example_id")

    # -- decoding ----------------------------------------------------------------------
    def decode(self, size: int | tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, list[DecodeError]]:
        """Decode every image to RGB uint8.

        Returns ``(images [N_ok, H, W, 3] uint8, ok_index [N_ok] int64, errors)``: rows that
        cannot be decoded are left out of ``images`` and reported in ``errors``, never
        silently dropped. Images of different sizes are resized to ``size`` (or to the first
        image's size when ``size`` is None).
        """
        from PIL import Image

        has_bytes = "image" in self.columns
        blobs = self.table["image"].to_pylist() if has_bytes else None
        paths = self.table["path"].to_pylist() if "path" in self.columns else None
        ids = self.example_ids
        out: list[np.ndarray] = []
        ok: list[int] = []
        errors: list[DecodeError] = []
        target: tuple[int, int] | None = (size, size) if isinstance(size, int) else size
        for i in range(len(self)):
            item = str(ids[i])
            try:
                if blobs is not None and blobs[i] is not None:
                    src = io.BytesIO(blobs[i])
                elif paths is not None and paths[i] is not None:
                    p = paths[i] if os.path.isabs(paths[i]) or self.root is None else os.path.join(self.root, paths[i])
                    item = f"{ids[i]} ({p})"
                    src = p
                else:
                    raise ValueError("row has neither image bytes nor a path")
                with Image.open(src) as im:
                    im.load()
                    im = im.convert("RGB")
                    if target is None:
                        target = (im.height, im.width)
                    if (im.height, im.width) != target:
                        im = im.resize((target[1], target[0]), Image.BILINEAR)
                    out.append(np.asarray(im, dtype=np.uint8))
                ok.append(i)
            except Exception as e:  # noqa: BLE001 - any decoder failure costs this row only
                errors.append(DecodeError(item, f"cannot decode image: {type(e).__name__}: {e}"))
        if out:
            images = np.stack(out)
        else:
            h, w = target or (0, 0)
            images = np.zeros((0, h, w, 3), np.uint8)
        return images, np.asarray(ok, dtype=np.int64), errors


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
        raise ValueError(f"unknown split value(s) {sorted(splits - set(SPLITS))}; use one of {list(SPLITS)}")
    ids = table["example_id"]
    if pc.count_distinct(ids).as_py() != table.num_rows:
        raise ValueError("example_id values must be unique")
