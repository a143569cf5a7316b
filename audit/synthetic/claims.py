"""The set-id claim: one generation per set id, across any number of writers (ingress
replicas, processes) sharing one run directory, and a probe that the store takes writes."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

from audit.store import RunStore
from audit.synthetic.sets import check_set_id, set_path


def claim_path(set_id: str) -> str:
    return f"synthetic/{check_set_id(set_id)}/.claim.json"


def claim_set(store: RunStore, set_id: str, request_hash: str, stale_after_s: float) -> dict | None:
    """Claim ``set_id`` for ``request_hash``: None when this call holds the claim now, else the
    holder's claim ``{"request_hash", "time", "owner"}``.

    The claim is a file created exclusively in the store (:meth:`RunStore.create_exclusive`),
    so two writers cannot both generate one id. A claim older than ``stale_after_s`` (its
    holder died) is moved aside and the id is claimed again.
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
