"""Reading Parquet files of images so that a file that does not parse names itself."""

from __future__ import annotations

import contextlib
import json

import pyarrow as pa
import pyarrow.parquet as pq


def read_parquet_table(path: str) -> pa.Table:
    """``pq.read_table``, with a file that is not (complete) Parquet a ValueError naming it."""
    try:
        return pq.read_table(path)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"{path}: not a readable Parquet file ({why}); check that it was written completely, "
            "or write it again with pyarrow.parquet.write_table"
        ) from None


def metadata_classes(table: pa.Table, path: str) -> list[str] | None:
    """The class names in a Parquet file's ``classes`` metadata (a JSON list), or None."""
    raw = (table.schema.metadata or {}).get(b"classes")
    if raw is None:
        return None
    try:
        classes = json.loads(raw)
    except ValueError as e:
        raise ValueError(
            f"{path}: the Parquet metadata 'classes' is not valid JSON ({e}); write it as a JSON "
            'list of class names in label order, e.g. ["cat", "dog"]'
        ) from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError(
            f"{path}: the Parquet metadata 'classes' must be a JSON list of class names in label "
            f"order, got {str(raw[:80])}"
        )
    return classes


@contextlib.contextmanager
def naming_file(path: str):
    """Prefix ``path`` to a ValueError raised inside that does not name it already."""
    try:
        yield
    except ValueError as e:
        if path in str(e):
            raise
        raise ValueError(f"{path}: {e}") from None
