"""Readers that turn datasets on disk into :class:`ImageTable`.

- :func:`read_parquet`: a Parquet manifest (labels as indices with a class list, or strings)
- :func:`read_imagefolder`: ``ROOT/SPLIT/CLASS/*.png`` or ``ROOT/CLASS/*.png``
- :func:`read_fashion_mnist`: the IDX files (plain or gzipped)
- :func:`read_world`: a directory written by ``zoo-audit world build``
- :func:`read_dataset`: picks one of the above from what a path looks like
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import struct
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from audit.cache import write_atomic_bytes
from audit.data.parquet import metadata_classes, naming_file, read_parquet_table
from audit.data.table import SPLITS, ImageTable, check_labels

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

FASHION_MNIST_CLASSES = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]

FASHION_MNIST_ENV = "ZOO_AUDIT_FASHION_MNIST"
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_URL = "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/"


def table_from_labels(
    table: pa.Table, classes: Sequence[str] | None = None, root: str | None = None
) -> ImageTable:
    """Map a string ``label`` column onto class indices (classes sorted if not given)."""
    labels = table["label"]
    if pa.types.is_integer(labels.type):
        n = check_labels(table, None if classes is None else len(classes))  # before any list
        if classes is None:
            classes = [str(i) for i in range(n)]
        return ImageTable(
            table.set_column(
                table.schema.get_field_index("label"), "label", labels.cast(pa.int32())
            ),
            list(classes),
            root,
        )
    names = [str(x) for x in labels.to_pylist()]
    if classes is None:
        classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    out = np.empty(len(names), np.int32)
    ids = (
        table["example_id"].to_pylist()
        if "example_id" in table.column_names
        else list(range(len(names)))
    )
    for i, n in enumerate(names):
        if n not in index:
            raise ValueError(
                f"row {i} (example_id={ids[i]!r}) has label {n!r}, which is not a known class; "
                f"known classes: {list(classes)}. Fix the label or add the class to the class list."
            )
        out[i] = index[n]
    table = table.set_column(
        table.schema.get_field_index("label"), "label", pa.array(out, pa.int32())
    )
    return ImageTable(table, list(classes), root)


def read_parquet(
    path: str, classes: Sequence[str] | None = None, split: str | None = None
) -> ImageTable:
    """Read a Parquet manifest: example_id, split, label, image bytes or path, attributes.

    ``classes`` fixes the class order (required for integer labels without metadata);
    ``split`` fills a missing split column.
    """
    t = read_parquet_table(path)
    root = os.path.dirname(os.path.abspath(path))
    with naming_file(path):
        return _manifest_table(t, path, root, classes, split)


def _manifest_table(
    t: pa.Table, path: str, root: str, classes: Sequence[str] | None, split: str | None
) -> ImageTable:
    if "example_id" not in t.column_names:
        t = t.append_column("example_id", pa.array([f"{i:08d}" for i in range(t.num_rows)]))
    t = t.set_column(
        t.schema.get_field_index("example_id"), "example_id", t["example_id"].cast(pa.string())
    )
    if "split" not in t.column_names:
        if split is None:
            raise ValueError(f"{path} has no 'split' column; pass split= (one of {list(SPLITS)})")
        t = t.append_column("split", pa.array([split] * t.num_rows))
    if classes is None:
        classes = metadata_classes(t, path)
    return table_from_labels(t, classes, root)


def read_imagefolder(
    root: str, split: str | None = None, classes: Sequence[str] | None = None
) -> ImageTable:
    """Read ``ROOT/SPLIT/CLASS/IMG`` (split directories named as splits) or ``ROOT/CLASS/IMG``.

    Images are referenced by path and decoded later, so a corrupt file becomes an error row
    at decode time instead of stopping the read. Every regular file in a class folder is a
    row, whatever its extension (one that is not an image becomes an error row when
    decoded); what cannot be a row (files beside the class folders, folders nested in a
    class folder, hidden files, FIFOs and other non-regular files) is counted and logged
    as one warning naming a few of each, never read.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"ImageFolder root {root!r} is not a directory")
    subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if subdirs and set(subdirs) <= set(SPLITS):
        layout = [(s, os.path.join(root, s)) for s in subdirs]
    else:
        layout = [(split or "debug", root)]
    rows, found, skipped = _imagefolder_rows(root, layout)
    _warn_not_read(root, rows, skipped)
    if not rows:
        raise ValueError(
            f"no images found under {root!r} in CLASS/ folders (or SPLIT/CLASS/ with splits {list(SPLITS)})"
        )
    t = pa.Table.from_pylist(rows)
    return table_from_labels(t, classes or sorted(found), root)


def _imagefolder_rows(
    root: str, layout: list[tuple[str, str]]
) -> tuple[list[dict], set[str], dict[str, list[str]]]:
    """``(rows, class names, skipped)`` of an ImageFolder laid out as ``(split, directory)``
    pairs: a row per regular file in a class folder, and what cannot be a row by kind."""
    skipped: dict[str, list[str]] = {}

    def skip(kind: str, path: str) -> None:
        skipped.setdefault(kind, []).append(os.path.relpath(path, root))

    found: set[str] = set()
    rows = []
    for d in dict.fromkeys([root, *(d for _, d in layout)]):
        for x in os.listdir(d):
            if not os.path.isdir(os.path.join(d, x)):
                skip("stray file outside a class folder", os.path.join(d, x))
    for s, d in layout:
        for c in sorted(x for x in os.listdir(d) if os.path.isdir(os.path.join(d, x))):
            found.add(c)
            for f in sorted(os.listdir(os.path.join(d, c))):
                p = os.path.join(d, c, f)
                if f.startswith("."):
                    skip("hidden file", p)
                elif os.path.isdir(p):
                    skip("nested folder", p)
                elif not os.path.isfile(p):  # a FIFO or socket would block or fail the decoder
                    skip("not a regular file", p)
                else:
                    rel = os.path.relpath(p, root)
                    rows.append({"example_id": rel, "split": s, "label": c, "path": rel})
    return rows, found, skipped


def _warn_not_read(root: str, rows: list[dict], skipped: dict[str, list[str]]) -> None:
    """One warning naming a few of each kind of entry skipped, one for non-image extensions."""
    if skipped:
        log.warning(
            "ImageFolder %s: not read: %s",
            root,
            "; ".join(
                f"{len(v)} {k}(s) (e.g. {', '.join(sorted(v)[:3])})"
                for k, v in sorted(skipped.items())
            ),
        )
    n_other = sum(not r["path"].lower().endswith(IMAGE_EXTENSIONS) for r in rows)
    if n_other:
        log.warning(
            "ImageFolder %s: %d file(s) without an image extension (%s) are read as images; "
            "those that are not become error rows",
            root,
            n_other,
            ", ".join(IMAGE_EXTENSIONS),
        )


# -- Fashion-MNIST -------------------------------------------------------------------------
def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    (magic,) = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(directory: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz"):
        p = os.path.join(directory, name)
        if os.path.exists(p):
            return p
    return None


class DatasetMissing(FileNotFoundError):
    pass


def fashion_mnist_dir(download_to: str | None = None) -> str:
    """Locate the Fashion-MNIST IDX files.

    Looked up, in order: ``$ZOO_AUDIT_FASHION_MNIST``, the Debian package's directory, and
    (when ``download_to`` is given) a download of the official files into it.
    """
    candidates = []
    if os.environ.get(FASHION_MNIST_ENV):
        candidates.append(os.environ[FASHION_MNIST_ENV])
    candidates += list(FASHION_MNIST_DIRS)
    from audit.paths import cache_dir

    candidates.append(cache_dir("fashion-mnist"))
    if download_to:
        candidates.append(download_to)
    for d in candidates:
        if all(_find_idx(d, s) for pair in FASHION_MNIST_FILES.values() for s in pair):
            return d
    if download_to:
        try:
            _download_fashion_mnist(download_to)
            return download_to
        except Exception as e:  # noqa: BLE001
            reason = f"download failed: {e}"
    else:
        reason = "no download directory given"
    raise DatasetMissing(
        "Fashion-MNIST not found. Get it one of three ways:\n"
        "  1. apt-get install -y dataset-fashion-mnist   (files land in /usr/share/datasets/fashion-mnist)\n"
        f"  2. the official download from {FASHION_MNIST_URL} (done automatically by `make demo`)\n"
        f"  3. put the four IDX files in a directory and set {FASHION_MNIST_ENV}=DIR\n"
        f"Looked in: {candidates}; {reason}."
    )


def _download_fashion_mnist(dest: str) -> None:
    import urllib.request

    os.makedirs(dest, exist_ok=True)
    for pair in FASHION_MNIST_FILES.values():
        for stem in pair:
            target = os.path.join(dest, stem + ".gz")
            if not os.path.exists(target):
                with urllib.request.urlopen(FASHION_MNIST_URL + stem + ".gz", timeout=30) as r:
                    data = r.read()
                write_atomic_bytes(target, data)


def load_fashion_mnist_arrays(
    directory: str | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images [60000,28,28] uint8, labels), "test": (...)}``."""
    directory = directory or fashion_mnist_dir()
    out = {}
    for split, (img, lab) in FASHION_MNIST_FILES.items():
        pi, pl = _find_idx(directory, img), _find_idx(directory, lab)
        if pi is None or pl is None:
            raise DatasetMissing(f"Fashion-MNIST {split} files missing in {directory}")
        out[split] = (_read_idx(pi), _read_idx(pl).astype(np.int64))
    return out


def read_fashion_mnist(directory: str | None = None, test_split: str = "debug") -> ImageTable:
    """The Fashion-MNIST IDX files as a table (train -> ``train``, t10k -> ``test_split``)."""
    from PIL import Image

    arrays = load_fashion_mnist_arrays(directory)
    rows = {"example_id": [], "split": [], "label": [], "image": []}
    for split, (imgs, labels) in arrays.items():
        name = "train" if split == "train" else test_split
        for i, (im, lab) in enumerate(zip(imgs, labels, strict=True)):
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="PNG")
            rows["example_id"].append(f"fmnist-{split}-{i:05d}")
            rows["split"].append(name)
            rows["label"].append(int(lab))
            rows["image"].append(buf.getvalue())
    t = pa.table(
        {
            **rows,
            "label": pa.array(rows["label"], pa.int32()),
            "image": pa.array(rows["image"], pa.binary()),
        }
    )
    return ImageTable(t, list(FASHION_MNIST_CLASSES))


def read_world(directory: str) -> ImageTable:
    path = os.path.join(directory, "examples.parquet")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{directory} is not a world directory (no examples.parquet); "
            "build one with `zoo-audit world build --spec configs/world/default.toml --out DIR`"
        )
    return ImageTable.from_parquet(path)


def read_dataset(path: str, **kwargs) -> ImageTable:
    """Open a world directory, a Parquet manifest, an IDX directory or an ImageFolder."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "examples.parquet")):
            return read_world(path)
        if _find_idx(path, FASHION_MNIST_FILES["train"][0]):
            return read_fashion_mnist(path, **kwargs)
        return read_imagefolder(path, **kwargs)
    if path.endswith(".parquet"):
        return read_parquet(path, **kwargs)
    raise ValueError(
        f"cannot tell what kind of dataset {path!r} is: give a world directory, a .parquet "
        "manifest, a Fashion-MNIST IDX directory or an ImageFolder directory"
    )
