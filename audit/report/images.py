"""Thumbnails (small files, each written once) and the real images nearest a failure direction."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from audit.store import RunStore

log = logging.getLogger(__name__)


def _safe(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80]
    return s if s == name else f"{s}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def thumbnail_bytes(src, size: int) -> tuple[bytes, str]:
    """``(encoded bytes, extension)`` of an image (bytes or a path) no larger than ``size`` px.

    A small PNG is kept as it is (no re-encoding, pixel-exact); anything larger is scaled
    down and written as JPEG, so a report of full-size photos stays small.
    """
    from PIL import Image

    raw = src if isinstance(src, bytes | bytearray) else None
    with Image.open(io.BytesIO(raw) if raw is not None else src) as im:
        if raw is not None and im.format == "PNG" and max(im.size) <= size and len(raw) <= 32_768:
            return bytes(raw), "png"
        im = im.convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85, optimize=True)
        return buf.getvalue(), "jpg"


class Thumbs:
    """Writes thumbnails under ``img/GROUP/`` of the report; one file per key, ever."""

    def __init__(self, out: RunStore, size: int):
        self.out, self.size = out, size
        self.paths: dict[tuple[str, str], str | None] = {}
        self.n_bytes = 0

    def add(self, group: str, key: str, src) -> str | None:
        """Report-relative path of the thumbnail of ``src`` (bytes or a path); None if it cannot be read."""
        k = (group, key)
        if k not in self.paths:
            try:
                data, ext = thumbnail_bytes(src, self.size)
            except Exception as e:  # noqa: BLE001 - one unreadable image costs its thumbnail only
                log.warning("report: cannot read image %s: %s", key, e)
                self.paths[k] = None
                return None
            rel = f"img/{group}/{_safe(key)}.{ext}"
            self.out.write_bytes(rel, data)
            self.n_bytes += len(data)
            self.paths[k] = rel
        return self.paths[k]


class DatasetImages:
    """Encoded images of a dataset, looked up by example id."""

    def __init__(self, table):
        self.table = table
        self.pos = {str(e): i for i, e in enumerate(table.example_ids.tolist())}
        self._image = table.table["image"].combine_chunks() if "image" in table.columns else None
        self._path = table.table["path"].combine_chunks() if "path" in table.columns else None

    def source(self, example_id: str):
        i = self.pos.get(str(example_id))
        if i is None:
            return None
        if self._image is not None and self._image[i].is_valid:
            return self._image[i].as_py()
        if self._path is not None and self._path[i].is_valid:
            p = self._path[i].as_py()
            return (
                p
                if os.path.isabs(p) or self.table.root is None
                else os.path.join(self.table.root, p)
            )
        return None


def embedding_matrix(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """``(example ids [N] str, vectors [N, D] float32)`` of an ``embeddings/`` table."""
    ids = np.asarray(table["example_id"].to_pylist(), dtype=object).astype(str)
    col = table["vector"].combine_chunks()
    flat = np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float32)
    return ids, flat.reshape(len(ids), -1) if len(ids) else flat.reshape(0, 0)


class NearestImages:
    """For a direction row: the class's images (of one split) with the lowest and highest
    decision values, i.e. the real images nearest the failure and the class's typical ones."""

    def __init__(self, ids: np.ndarray, labels: np.ndarray, X: np.ndarray):
        self.ids, self.labels, self.X = ids, labels, X
        self._by_class: dict[int, np.ndarray] = {}
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.unique(labels))
        for lab, chunk in zip(np.unique(labels), np.split(order, bounds[1:]), strict=True):
            self._by_class[int(lab)] = chunk

    def extremes(self, row: Mapping, n: int) -> tuple[list[str], list[str]]:
        """``(hardest ids, easiest ids)``, ``n`` each, for one ``directions.parquet`` row."""
        from audit.directions import decision_from_row

        idx = self._by_class.get(int(row["class_index"]))
        if idx is None or not len(idx) or row.get("direction") is None:
            return [], []
        d = decision_from_row(row, self.X[idx])
        order = np.argsort(
            d, kind="stable"
        )  # negative decision = predicted error (hard), positive = easy
        k = min(n, max(1, len(order) // 2))  # a small class splits evenly between the two ends
        hard = idx[order[:k]]
        easy = idx[order[::-1][: min(k, len(order) - k)]]
        return self.ids[hard].tolist(), self.ids[easy].tolist()
