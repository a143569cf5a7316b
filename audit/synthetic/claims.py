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


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot, ``/proc/PID/stat`` field 22),
    or None when there is no such process (or no ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(") ", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _owner() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": process_start(pid)}


def owner_gone(held: dict) -> bool:
    """The claim's holder is a process of this machine that no longer runs (its id is free or
    taken by a process started at another time). Claims of other machines, or without the
    holder's start time, are judged by their age alone."""
    if held.get("host") != socket.gethostname() or held.get("start") is None:
        return False
    if not os.path.isdir("/proc"):
        return False
    return process_start(int(held.get("pid", -1))) != held["start"]


def claim_set(store: RunStore, set_id: str, request_hash: str, stale_after_s: float) -> dict | None:
    """Claim ``set_id`` for ``request_hash``: None when this call holds the claim now, else the
    holder's claim ``{"request_hash", "time", "owner", "host", "pid", "start"}``.

    The claim is a file created exclusively in the store (:meth:`RunStore.create_exclusive`),
    so two writers cannot both generate one id. A claim whose holder is gone (a replica killed
    mid-generation: its process no longer runs on this machine, :func:`owner_gone`) is moved
    aside at once and the id claimed again; a claim of another machine only once it is older
    than ``stale_after_s``.
    """
    rel = claim_path(set_id)
    me = _owner()
    mine = {
        "request_hash": request_hash,
        "time": time.time(),
        "owner": f"{me['host']}:{me['pid']}",
        **me,
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
        if time.time() - float(held.get("time", 0)) <= stale_after_s and not owner_gone(held):
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
