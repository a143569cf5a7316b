"""Synthetic sets in the run directory: ``synthetic/SET_ID/part-00000.parquet``.

One row per image: image_id, png, prompt, seed (the image's own seed), generator, params
(JSON), prompt_index, image_index. The request that produced the set and its hash live in
the Parquet schema metadata, so the single Parquet file is the whole set: it is written
once, atomically (temp file + hard link through :meth:`RunStore.create_exclusive`), after
every image exists; a set directory without it is not a set.

Every generator writes this format: the Serve app (diffusers, world renderer) and the
retrieval generator of the audit (:mod:`audit.synthetic.retrieval`).
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from audit.cache import content_hash
from audit.store import RunStore

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
# One path component: no separators, no leading dot (so no "..", no hidden temp names).
SET_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


class SetUnreadable(RuntimeError):
    """A stored set's file exists but cannot be read (corrupt, truncated, not a set)."""


def check_set_id(set_id: str) -> str:
    """Return ``set_id`` if it is a safe single path component, else raise ValueError."""
    if not isinstance(set_id, str) or not SET_ID_RE.fullmatch(set_id) or ".." in set_id:
        raise ValueError(
            f"set_id {set_id!r} is invalid: use 1-96 characters from [A-Za-z0-9_.-], starting with a "
            "letter or digit, without '..' (it names a directory under synthetic/)"
        )
    return set_id


def set_path(set_id: str) -> str:
    return f"synthetic/{check_set_id(set_id)}/{PART}"


def image_id(set_id: str, n: int) -> str:
    return f"{set_id}-{n:05d}"


def image_seed(seed: int, index: int) -> int:
    """Seed of the ``index``-th image of a prompt in a request with seed ``seed`` (32-bit)."""
    return int(
        np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFF, int(index)]).generate_state(1)[0]
    )


def request_seeds(prompts: list[str], k: int, seed: int) -> list[int]:
    """One seed per image in (prompt, image) order: image ``i`` of the ``j``-th occurrence of a
    prompt gets ``image_seed(seed, j * k + i)``, so a prompt repeated in one request gives new
    images, and a prompt's first ``k`` images do not depend on the other prompts."""
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        j = seen[p] = seen.get(p, -1) + 1
        out += [image_seed(seed, j * k + i) for i in range(k)]
    return out


def request_key(request: dict, generator: str) -> str:
    """The hash that identifies a resolved request (prompts, images_per_prompt, seed, steps,
    guidance, size) made by ``generator``: a stored set answers a repeat only when it matches."""
    return content_hash(request, generator)


def png_bytes(img: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (fast compression: a set is written once, read a few times)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _counts(prompts: list[str]) -> list[dict]:
    """``[{"prompt", "n"}]``: images per distinct prompt, in first-seen order."""
    counts = dict.fromkeys(prompts, 0)
    for p in prompts:
        counts[p] += 1
    return [{"prompt": p, "n": c} for p, c in counts.items()]


def _set_table(set_id: str, request: dict, meta: dict, seeds: list[int], pngs: list) -> pa.Table:
    k = request["images_per_prompt"]
    n = len(request["prompts"]) * k
    params = json.dumps(
        {key: request[key] for key in ("steps", "guidance", "size", "images_per_prompt")}
        | {"request_seed": request["seed"]},
        sort_keys=True,
    )
    return pa.table(
        {
            "image_id": [image_id(set_id, i) for i in range(n)],
            "png": pngs,
            "prompt": [p for p in request["prompts"] for _ in range(k)],
            "seed": seeds,
            "generator": [meta["generator"]] * n,
            "params": [params] * n,
            "prompt_index": [i // k for i in range(n)],
            "image_index": [i % k for i in range(n)],
        },
        schema=SCHEMA.with_metadata({"zoo_audit.set": json.dumps(meta, sort_keys=True)}),
    )


def write_set(
    store: RunStore,
    set_id: str,
    request: dict,
    request_hash: str,
    generator: str,
    seeds: list[int],
    pngs: list[bytes],
) -> dict | None:
    """Write a whole set atomically, never over an existing one; ``pngs``/``seeds`` are in
    (prompt, image) order. Returns its metadata, or None when the set already exists."""
    k = request["images_per_prompt"]
    n = len(request["prompts"]) * k
    assert len(pngs) == n == len(seeds), (len(pngs), n, len(seeds))
    meta = {
        "set_id": set_id,
        "generator": generator,
        "request": request,
        "request_hash": request_hash,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    buf = io.BytesIO()
    # PNG is already compressed; zstd on it costs time and saves nothing
    codecs = {c: ("none" if c == "png" else "zstd") for c in SCHEMA.names}
    table = _set_table(set_id, request, meta, seeds, pngs)
    pq.write_table(table, buf, row_group_size=ROW_GROUP, compression=codecs)
    if not store.create_exclusive(set_path(set_id), buf.getvalue()):
        return None  # written meanwhile by another writer: that set stands, never overwritten
    counts = _counts(table["prompt"].to_pylist())
    return {**meta, "n_images": n, "n_prompts": len(counts), "counts": counts}


def read_set_meta(store: RunStore, set_id: str) -> dict | None:
    """The set's metadata (request, hash, generator, n_images, per-prompt counts), or None if absent."""
    rel = set_path(set_id)
    if not store.exists(rel):
        return None
    try:
        with store.fs.open_input_file(store.path(rel)) as f:
            pf = pq.ParquetFile(f)
            meta = json.loads(pf.schema_arrow.metadata[b"zoo_audit.set"])
            prompts = pf.read(columns=["prompt"])["prompt"].to_pylist()
    except FileNotFoundError:
        return None  # deleted meanwhile
    except Exception as e:  # noqa: BLE001 - any reader failure means the stored file is bad
        raise SetUnreadable(f"stored set {set_id!r} cannot be read: {type(e).__name__}: {e}") from e
    counts = _counts(prompts)
    return {**meta, "n_images": len(prompts), "n_prompts": len(counts), "counts": counts}


def read_set_image(store: RunStore, set_id: str, n: int) -> bytes | None:
    """PNG bytes of image ``n`` (reads one row group), or None when the set or index does not exist."""
    rel = set_path(set_id)
    if n < 0 or not store.exists(rel):
        return None
    try:
        with store.fs.open_input_file(store.path(rel)) as f:
            pf = pq.ParquetFile(f)
            if n >= pf.metadata.num_rows:
                return None
            offset, rg = 0, 0
            while offset + pf.metadata.row_group(rg).num_rows <= n:
                offset += pf.metadata.row_group(rg).num_rows
                rg += 1
            return pf.read_row_group(rg, columns=["png"])["png"][n - offset].as_py()
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - any reader failure means the stored file is bad
        raise SetUnreadable(f"stored set {set_id!r} cannot be read: {type(e).__name__}: {e}") from e


def read_set_pngs(store: RunStore, set_id: str) -> list[bytes]:
    """Every image of a stored set as PNG bytes, in (prompt, image) order."""
    return store.read_table(set_path(set_id), columns=["png"])["png"].to_pylist()
