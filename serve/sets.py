"""Synthetic sets in the run directory: ``synthetic/SET_ID/part-00000.parquet``.

One row per generated image: image_id, png, prompt, seed (the image's own seed),
generator, params (JSON), prompt_index, image_index. The request that produced the set
and its hash live in the Parquet schema metadata, so the single Parquet file is the
whole set: it is written once, atomically (temp file + rename through ``RunStore``),
after every image exists; a set directory without it is not a set.
"""

from __future__ import annotations

import datetime as _dt
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from audit.store import RunStore
from serve.config import check_set_id

PART = "part-00000.parquet"
ROW_GROUP = 16
SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("png", pa.binary()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("generator", pa.string()),
        ("params", pa.string()),
        ("prompt_index", pa.int32()),
        ("image_index", pa.int32()),
    ]
)


def set_path(set_id: str) -> str:
    return f"synthetic/{check_set_id(set_id)}/{PART}"


def image_id(set_id: str, n: int) -> str:
    return f"{set_id}-{n:05d}"


def write_set(
    store: RunStore,
    set_id: str,
    request: dict,
    request_hash: str,
    generator: str,
    seeds: list[int],
    pngs: list[bytes],
) -> dict:
    """Write a whole set atomically; ``pngs``/``seeds`` are in (prompt, image) order. Returns its metadata."""
    k = request["images_per_prompt"]
    n = len(request["prompts"]) * k
    assert len(pngs) == n == len(seeds), (len(pngs), n, len(seeds))
    params = json.dumps({key: request[key] for key in ("steps", "guidance", "size", "images_per_prompt")} | {"request_seed": request["seed"]}, sort_keys=True)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    meta = {"set_id": set_id, "generator": generator, "request": request, "request_hash": request_hash, "created": created}
    table = pa.table(
        {
            "image_id": [image_id(set_id, i) for i in range(n)],
            "png": pngs,
            "prompt": [p for p in request["prompts"] for _ in range(k)],
            "seed": seeds,
            "generator": [generator] * n,
            "params": [params] * n,
            "prompt_index": [i // k for i in range(n)],
            "image_index": [i % k for i in range(n)],
        },
        schema=SCHEMA.with_metadata({"zoo_audit.set": json.dumps(meta, sort_keys=True)}),
    )
    buf = io.BytesIO()
    # PNG is already compressed; zstd on it costs time and saves nothing
    codecs = {c: ("none" if c == "png" else "zstd") for c in SCHEMA.names}
    pq.write_table(table, buf, row_group_size=ROW_GROUP, compression=codecs)
    store.write_bytes(set_path(set_id), buf.getvalue())
    counts = [{"prompt": p, "n": k} for p in dict.fromkeys(request["prompts"])]
    return {**meta, "n_images": n, "n_prompts": len(counts), "counts": counts}


def read_set_meta(store: RunStore, set_id: str) -> dict | None:
    """The set's metadata (request, hash, generator, n_images, per-prompt counts), or None if absent."""
    rel = set_path(set_id)
    if not store.exists(rel):
        return None
    with store.fs.open_input_file(store.path(rel)) as f:
        pf = pq.ParquetFile(f)
        meta = json.loads(pf.schema_arrow.metadata[b"zoo_audit.set"])
        prompts = pf.read(columns=["prompt"])["prompt"].to_pylist()
    counts = dict.fromkeys(prompts, 0)
    for p in prompts:
        counts[p] += 1
    return {**meta, "n_images": len(prompts), "n_prompts": len(counts), "counts": [{"prompt": p, "n": c} for p, c in counts.items()]}


def read_set_image(store: RunStore, set_id: str, n: int) -> bytes | None:
    """PNG bytes of image ``n`` (reads one row group), or None when the set or index does not exist."""
    rel = set_path(set_id)
    if n < 0 or not store.exists(rel):
        return None
    with store.fs.open_input_file(store.path(rel)) as f:
        pf = pq.ParquetFile(f)
        if n >= pf.metadata.num_rows:
            return None
        offset, rg = 0, 0
        while offset + pf.metadata.row_group(rg).num_rows <= n:
            offset += pf.metadata.row_group(rg).num_rows
            rg += 1
        return pf.read_row_group(rg, columns=["png"])["png"][n - offset].as_py()


def read_set_pngs(store: RunStore, set_id: str) -> list[bytes]:
    return store.read_table(set_path(set_id), columns=["png"])["png"].to_pylist()


def load_set(store: RunStore, set_id: str) -> tuple[np.ndarray, pa.Table]:
    """Decode a stored set: (uint8 [N, H, W, 3], the table without png). For retraining stages."""
    from PIL import Image

    t = store.read_table(set_path(set_id))
    imgs = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in t["png"].to_pylist()])
    return imgs, t.drop(["png"])
