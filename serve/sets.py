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
import os
import socket
import time
import uuid

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
) -> dict | None:
    """Write a whole set atomically, never over an existing one; ``pngs``/``seeds`` are in
    (prompt, image) order. Returns its metadata, or None when the set already exists."""
    k = request["images_per_prompt"]
    n = len(request["prompts"]) * k
    assert len(pngs) == n == len(seeds), (len(pngs), n, len(seeds))
    params = json.dumps(
        {key: request[key] for key in ("steps", "guidance", "size", "images_per_prompt")}
        | {"request_seed": request["seed"]},
        sort_keys=True,
    )
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    meta = {
        "set_id": set_id,
        "generator": generator,
        "request": request,
        "request_hash": request_hash,
        "created": created,
    }
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
    if not store.create_exclusive(set_path(set_id), buf.getvalue()):
        return None  # written meanwhile by another writer: that set stands, never overwritten
    counts = _counts([p for p in request["prompts"] for _ in range(k)])
    return {**meta, "n_images": n, "n_prompts": len(counts), "counts": counts}


def _counts(prompts: list[str]) -> list[dict]:
    """``[{"prompt", "n"}]``: images per distinct prompt, in first-seen order."""
    counts = dict.fromkeys(prompts, 0)
    for p in prompts:
        counts[p] += 1
    return [{"prompt": p, "n": c} for p, c in counts.items()]


def request_seeds(prompts: list[str], k: int, seed: int) -> list[int]:
    """One seed per image in (prompt, image) order: image ``i`` of the ``j``-th occurrence of a
    prompt gets ``image_seed(seed, j * k + i)``, so a prompt repeated in one request gives new
    images, and a prompt's first ``k`` images do not depend on the other prompts."""
    from serve.backends import image_seed

    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        j = seen[p] = seen.get(p, -1) + 1
        out += [image_seed(seed, j * k + i) for i in range(k)]
    return out


class SetUnreadable(RuntimeError):
    """A stored set's file exists but cannot be read (corrupt, truncated, not a set)."""


# -- the set-id claim: one generation per id, across any number of ingress replicas ----------
def claim_path(set_id: str) -> str:
    return f"synthetic/{check_set_id(set_id)}/.claim.json"


def claim_set(store: RunStore, set_id: str, request_hash: str, stale_after_s: float) -> dict | None:
    """Claim ``set_id`` for ``request_hash``: None when this call holds the claim now, else the
    holder's claim ``{"request_hash", "time", "owner"}``.

    The claim is a file created exclusively in the store (:meth:`RunStore.create_exclusive`),
    so two ingress replicas cannot both generate one id. A claim older than ``stale_after_s``
    (its holder died) is moved aside and the id is claimed again.
    """
    rel = claim_path(set_id)
    mine = {
        "request_hash": request_hash,
        "time": time.time(),
        "owner": f"{socket.gethostname()}:{os.getpid()}",
    }
    for _ in range(3):
        if store.create_exclusive(rel, json.dumps(mine).encode()):
            return None
        try:
            held = json.loads(store.read_bytes(rel))
        except FileNotFoundError:
            continue  # released between the two calls: try again
        except ValueError:
            held = {"request_hash": "", "time": 0.0, "owner": "unreadable claim"}
        if time.time() - float(held.get("time", 0)) <= stale_after_s:
            return held
        try:  # a dead holder's claim: move it aside (only one mover succeeds), then claim
            store.fs.move(
                store.path(rel),
                store.path(f"synthetic/{set_id}/.claim-stale-{uuid.uuid4().hex}.json"),
            )
        except OSError:
            pass
    return held


def release_claim(store: RunStore, set_id: str) -> None:
    """Give up the claim; a set directory left without a set is removed (the id is free again)."""
    try:
        store.delete(claim_path(set_id))
        if not store.exists(set_path(set_id)):
            store.delete(f"synthetic/{set_id}")
    except OSError:
        pass


def probe_store(store: RunStore) -> None:
    """Write, read back and delete a small file under ``synthetic/``: raises when the store cannot."""
    rel = f"synthetic/.healthz-{uuid.uuid4().hex}"
    try:
        store.write_bytes(rel, b"ok")
        if store.read_bytes(rel) != b"ok":
            raise OSError("the store returned other bytes than were written")
    finally:
        try:
            store.delete(rel)
        except OSError:
            pass


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
    return store.read_table(set_path(set_id), columns=["png"])["png"].to_pylist()


def load_set(store: RunStore, set_id: str) -> tuple[np.ndarray, pa.Table]:
    """Decode a stored set: (uint8 [N, H, W, 3], the table without png). For retraining stages."""
    from PIL import Image

    t = store.read_table(set_path(set_id))
    imgs = np.stack(
        [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in t["png"].to_pylist()]
    )
    return imgs, t.drop(["png"])
