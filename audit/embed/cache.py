"""Image embeddings in the run directory: ``embeddings/embedder=NAME/part-00000.parquet``.

Computed once per dataset and embedder and shared by every model of the zoo. Each row
keeps ``example_id``, ``image_hash`` (of the row's image bytes or path) and ``vector``
(``fixed_size_list<float32, D>``); the file's schema metadata records the embedder's name
and weights key. A later call embeds only rows it has not seen (new ids or changed
images) and rewrites the file atomically; a different embedder key starts afresh.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from audit.data.table import ImageTable
from audit.embed.base import Embedder, embedder_slug
from audit.store import RunStore

log = logging.getLogger(__name__)


def embedding_path(embedder: Embedder | str) -> str:
    name = embedder if isinstance(embedder, str) else embedder.name
    return f"embeddings/embedder={embedder_slug(name)}/part-00000.parquet"


@dataclass
class TableEmbeddings:
    """Unit image embeddings ``vectors [N, D]`` for ``example_ids [N]``."""

    embedder: str
    key: str
    example_ids: np.ndarray
    vectors: np.ndarray

    def __len__(self) -> int:
        return len(self.example_ids)

    def align(self, example_ids) -> np.ndarray:
        """Vectors ``[len(example_ids), D]`` in the order of ``example_ids`` (all must be present)."""
        pos = {e: i for i, e in enumerate(self.example_ids.tolist())}
        ids = [str(e) for e in np.asarray(example_ids).tolist()]
        missing = [e for e in ids if e not in pos]
        if missing:
            raise ValueError(
                f"{len(missing)} example(s) have no {self.embedder} embedding (first: {missing[0]!r}); "
                "embed them with embed_table(store, embedder, table) first"
            )
        return self.vectors[np.fromiter((pos[e] for e in ids), np.int64, len(ids))]


def row_hashes(table: ImageTable) -> np.ndarray:
    """Per row, a short hash of the image bytes (or the path when images live on disk)."""
    col = table.table["image"] if "image" in table.columns else table.table["path"]
    out = []
    for v in col.to_pylist():
        b = v if isinstance(v, bytes) else str(v).encode()
        out.append(hashlib.blake2b(b, digest_size=8).hexdigest())
    return np.asarray(out, dtype=object)


def _to_arrow(name: str, key: str, ids, hashes, vectors: np.ndarray) -> pa.Table:
    d = int(vectors.shape[1])
    flat = pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1), pa.float32())
    t = pa.table(
        {
            "example_id": pa.array([str(e) for e in ids], pa.string()),
            "image_hash": pa.array([str(h) for h in hashes], pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(flat, d),
        }
    )
    return t.replace_schema_metadata(
        {b"embedder": name.encode(), b"key": key.encode(), b"dim": str(d).encode()}
    )


def _vectors(t: pa.Table) -> np.ndarray:
    col = t["vector"].combine_chunks()
    d = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d)


def load_embeddings(store: RunStore, embedder: Embedder | str) -> TableEmbeddings:
    """Read the cached embeddings of ``embedder`` (an Embedder or its name) from the run directory."""
    rel = embedding_path(embedder)
    if not store.exists(rel):
        name = embedder if isinstance(embedder, str) else embedder.name
        raise FileNotFoundError(
            f"no embeddings for {name!r} in {store.uri} ({rel}); compute them with embed_table()"
        )
    t = store.read_table(rel)
    meta = t.schema.metadata or {}
    return TableEmbeddings(
        meta.get(b"embedder", b"").decode(),
        meta.get(b"key", b"").decode(),
        t["example_id"].to_numpy(zero_copy_only=False).astype(str),
        _vectors(t),
    )


def embed_table(
    store: RunStore,
    embedder: Embedder,
    table: ImageTable,
    batch_size: int = 256,
    progress: bool = True,
) -> TableEmbeddings:
    """Embeddings of ``table``'s images, computing only those not already cached in ``store``.

    Returns them in the table's row order, without rows whose image cannot be decoded (those
    are recorded in ``errors.parquet``, stage ``embed``).
    """
    if not isinstance(embedder, Embedder):
        raise TypeError(
            f"embedder must be an audit.embed.Embedder (create_embedder(name)); got {type(embedder).__name__}"
        )
    rel = embedding_path(embedder)
    ids = table.example_ids.astype(str)
    hashes = row_hashes(table)
    old_ids, old_hashes, old_vecs = _cached(store, rel, embedder)
    have = {
        (e, h): i
        for i, (e, h) in enumerate(zip(old_ids.tolist(), old_hashes.tolist(), strict=True))
    }
    todo = np.asarray(
        [
            i
            for i, (e, h) in enumerate(zip(ids.tolist(), hashes.tolist(), strict=True))
            if (e, h) not in have
        ],
        np.int64,
    )
    new_rows: dict[tuple, np.ndarray] = {}
    if len(todo):
        new_rows = _embed_rows(
            store, embedder, table, (ids, hashes), todo, batch_size=batch_size, progress=progress
        )
        # replaced rows (same id, new image) drop their stale vectors
        new_ids = {ids[j] for j in todo}
        keep = [i for i, e in enumerate(old_ids.tolist()) if e not in new_ids]
        _write(store, rel, embedder, (old_ids[keep], old_hashes[keep], old_vecs[keep]), new_rows)
        log.info(
            "embedded %d new image(s) with %s (%d cached)", len(new_rows), embedder.name, len(have)
        )
    out_idx, out_vecs = [], []
    for i, (e, h) in enumerate(zip(ids.tolist(), hashes.tolist(), strict=True)):
        if (e, h) in have:
            out_idx.append(i)
            out_vecs.append(old_vecs[have[(e, h)]])
        elif (e, h) in new_rows:
            out_idx.append(i)
            out_vecs.append(new_rows[(e, h)])
    vectors = np.asarray(out_vecs, np.float32).reshape(-1, embedder.dim)
    return TableEmbeddings(embedder.name, embedder.key, ids[np.asarray(out_idx, np.int64)], vectors)


def _cached(store: RunStore, rel: str, embedder: Embedder) -> tuple:
    """``(example_ids [M], image_hashes [M], vectors [M, D])`` stored at ``rel`` by this
    embedder's key and dimension; empty when there are none or another key made them."""
    empty = (
        np.zeros(0, object),
        np.zeros(0, object),
        np.zeros((0, embedder.dim), np.float32),
    )
    if not store.exists(rel):
        return empty
    t = store.read_table(rel)
    meta = t.schema.metadata or {}
    if (
        meta.get(b"key", b"").decode() != embedder.key
        or int(meta.get(b"dim", b"0")) != embedder.dim
    ):
        log.info(
            "embeddings in %s were made by another %s (key changed); recomputing",
            rel,
            embedder.name,
        )
        return empty
    return (
        t["example_id"].to_numpy(zero_copy_only=False).astype(object),
        t["image_hash"].to_numpy(zero_copy_only=False).astype(object),
        _vectors(t),
    )


def _embed_rows(
    store: RunStore, embedder: Embedder, table: ImageTable, keys: tuple, todo, **encode
) -> dict[tuple, np.ndarray]:
    """``{(example_id, image_hash): vector [D]}`` for rows ``todo`` of ``table`` that decode
    (``keys``: the table's ids and row hashes); the others are recorded in ``errors.parquet``."""
    ids, hashes = keys
    images, ok, errors = table.take(todo).decode()
    store.record_errors({**e.as_row(), "stage": "embed"} for e in errors)
    vecs = (
        embedder.encode_images(images, **encode)
        if len(ok)
        else np.zeros((0, embedder.dim), np.float32)
    )
    return {(ids[j], hashes[j]): v for j, v in zip(todo[ok], vecs, strict=True)}


def _write(store: RunStore, rel: str, embedder: Embedder, kept: tuple, new_rows: dict) -> None:
    """Store ``kept`` (ids, hashes, vectors) followed by ``new_rows`` at ``rel`` and record
    them in the manifest."""
    old_ids, old_hashes, old_vecs = kept
    all_ids = np.concatenate([old_ids, np.asarray([k[0] for k in new_rows], object)])
    all_hashes = np.concatenate([old_hashes, np.asarray([k[1] for k in new_rows], object)])
    all_vecs = np.concatenate(
        [old_vecs, np.asarray(list(new_rows.values()), np.float32).reshape(-1, embedder.dim)]
    )
    store.write_table(rel, _to_arrow(embedder.name, embedder.key, all_ids, all_hashes, all_vecs))
    store.update_manifest(
        embeddings={
            embedder_slug(embedder.name): {
                "embedder": embedder.name,
                "key": embedder.key,
                "dim": embedder.dim,
                "n": int(len(all_ids)),
                "path": rel,
            }
        }
    )
