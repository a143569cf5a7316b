"""Content-addressed caches and atomic writes: every cache's one home.

- :func:`content_hash` / :func:`file_hash`: short stable keys for cache entries.
- :func:`code_version`: what a cached artefact's *code* contributes to its key. Each
  producer declares an explicit version number (bumped when the meaning of its output
  changes) instead of hashing its own source, so editing a comment retrains nothing.
- :func:`atomic_write` / :func:`write_atomic_bytes`: a local file is written under a
  temporary name and renamed into place, and the temporary is removed when the write
  fails, so a killed process never leaves a half-written file that a later run would
  mistake for finished work. (:class:`audit.store.RunStore` does the same through
  ``pyarrow.fs`` for the run directory.)
- :func:`cache_dir`: ``$ZOO_AUDIT_CACHE`` (default ``~/.cache/zoo-audit``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from typing import Any


def content_hash(*parts: Any) -> str:
    """A short, stable hash of JSON-able parts, bytes or strings (for cache keys)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, bytes | bytearray | memoryview):
            h.update(bytes(p))
        elif isinstance(p, str):
            h.update(p.encode())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def file_hash(path: str, chunk: int = 1 << 20) -> str:
    """sha256 (16 hex chars) of a local file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()[:16]


def code_version(name: str, version: int, *, torch_stack: bool = False) -> str:
    """The code part of a cache key: a producer's declared version, plus the library
    versions its numbers depend on (torch and timm when ``torch_stack``)."""
    parts: list[Any] = [name, int(version)]
    if torch_stack:
        import importlib.metadata as md

        for pkg in ("torch", "timm"):
            try:
                parts.append(md.version(pkg).split("+")[0])
            except md.PackageNotFoundError:
                parts.append(None)
    return content_hash(*parts)


def cache_dir(*parts: str) -> str:
    """``$ZOO_AUDIT_CACHE`` (default ``~/.cache/zoo-audit``) joined with ``parts``, created."""
    root = os.environ.get("ZOO_AUDIT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "zoo-audit"
    )
    p = os.path.join(root, *parts)
    os.makedirs(p, exist_ok=True)
    return p


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on
    failure it is removed. Use for writers that want a file name (safetensors, Parquet)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex[:12]}-{os.path.basename(path)}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic_bytes(path: str, data: bytes) -> str:
    """Write ``data`` to the local file ``path`` atomically; returns ``path``."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path
