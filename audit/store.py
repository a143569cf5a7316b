"""The run directory: the product's only I/O layer.

Every stage reads and writes its artefacts through :class:`RunStore`, which talks to a
local path or any URI that ``pyarrow.fs`` understands (``s3://``, ``gs://``), so a Ray
cluster can share one run. Writes are atomic: a file is written under a temporary name
and renamed into place, so a killed worker never leaves a half-written Parquet file that
a resumed run would mistake for finished work.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import io
import json
import os
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from audit.cache import content_hash, file_hash  # noqa: F401 - re-exported for callers

ERROR_SCHEMA = pa.schema(
    [
        ("stage", pa.string()),
        ("item", pa.string()),
        ("reason", pa.string()),
        ("time", pa.string()),
    ]
)

# Threads of this process; other processes are kept out by a lock file (RunStore._locked).
_LOCK = threading.Lock()


def _damaged_manifest(path: str, what: str) -> str:
    return (
        f"{path} is damaged ({what}); delete it to redo the run in that directory "
        "(finished outputs are recomputed), or choose a new --out"
    )


def _write_error(e: OSError, rel: str, uri: str) -> OSError:
    """``e`` again, naming the file and the fix (pyarrow's message names neither)."""
    why = e.strerror or str(e)
    if e.errno == errno.ENOSPC or "No space left" in str(e):
        fix = "free space on that disk or choose another --out, then rerun"
        return OSError(errno.ENOSPC, f"No space left on device writing {rel} in {uri}; {fix}")
    return OSError(e.errno, f"cannot write {rel} in {uri}: {why}")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class RunStore:
    """A run directory on a local disk or a ``pyarrow.fs`` URI.

    Paths given to the methods are relative to the run root and use ``/``.
    """

    def __init__(self, root: str | os.PathLike):
        root = str(root)
        if "://" in root:
            self.fs, self.root = pafs.FileSystem.from_uri(root)
            self.local = False
        else:
            self.fs = pafs.LocalFileSystem()
            self.root = os.path.abspath(root)
            self.local = True
        self.uri = root
        self.fs.create_dir(self.root, recursive=True)

    # -- paths -------------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        rel = rel.strip("/")
        if rel.startswith("..") or "/../" in f"/{rel}/":
            raise ValueError(f"path {rel!r} escapes the run directory")
        return f"{self.root}/{rel}" if rel else self.root

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under ``rel``; empty if it does not exist."""
        if not self.exists(rel):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), recursive=False))
        return sorted(os.path.basename(i.path) for i in infos)

    def delete(self, rel: str) -> None:
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))

    # -- atomic bytes ------------------------------------------------------------------
    def _via_temporary(self, rel: str, data: bytes, place) -> bool:
        """Write ``data`` to a temporary next to ``rel``, then ``place(tmp, final) -> bool``; the
        temporary never outlives the call (a failed write must not keep a full disk full)."""
        final = self.path(rel)
        parent = final.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{final.rsplit('/', 1)[1]}"
        try:
            self._write_stream(tmp, data)
            return place(tmp, final)
        except OSError as e:
            if isinstance(e, FileExistsError | FileNotFoundError):
                raise
            raise _write_error(e, rel, self.uri) from e
        finally:
            try:
                self.fs.delete_file(tmp)
            except OSError:  # moved into place (or never written)
                pass

    def _write_stream(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def write_bytes(self, rel: str, data: bytes) -> str:
        self._via_temporary(rel, data, lambda tmp, final: self.fs.move(tmp, final) or True)
        return self.path(rel)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` only if it does not exist: True if this call created it, False if it was there.

        Atomic across processes and replicas sharing the directory: the bytes go to a
        temporary, which is hard-linked to the final name (``link`` fails when the name
        exists, unlike ``rename``, which replaces it), so exactly one of any number of
        concurrent callers wins and readers never see a partial file. On object stores
        (``s3://``, ``gs://``) ``pyarrow.fs`` offers no conditional put: there the check
        and the write are two steps (a narrow race), so one writer per id is assumed.
        """
        if not (self.local or isinstance(self.fs, pafs.LocalFileSystem)):
            if self.exists(rel):
                return False
            self.write_bytes(rel, data)
            return True

        def link(tmp: str, final: str) -> bool:
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False
            return True

        return self._via_temporary(rel, data, link)

    def mtime_size(self, rel: str) -> tuple[int, int] | None:
        """``(mtime ns, size)`` of a file, or None when it does not exist (one stat, for caches)."""
        info = self.fs.get_file_info(self.path(rel))
        if info.type != pafs.FileType.File:
            return None
        return (info.mtime_ns or 0, info.size or 0)

    def checksum(self, rel: str, chunk: int = 1 << 20) -> str:
        """sha256 (16 hex characters) of the file ``rel``'s bytes, streamed."""
        h = hashlib.sha256()
        with self.fs.open_input_stream(self.path(rel)) as f:
            while b := f.read(chunk):
                h.update(b)
        return h.hexdigest()[:16]

    def fingerprint(self, rel: str) -> dict:
        """What a finished stage records of an output it wrote: its checksum and, for Parquet,
        its schema (``{"sha256", "schema"}``), checked before the stage is skipped as current."""
        out: dict[str, Any] = {"sha256": self.checksum(rel)}
        if rel.endswith(".parquet"):
            with self.fs.open_input_file(self.path(rel)) as f:
                out["schema"] = [f"{x.name}: {x.type}" for x in pq.read_schema(f)]
        return out

    def damaged(self, recorded: Mapping[str, Mapping[str, Any]]) -> str | None:
        """The first of ``{rel: fingerprint}`` that is gone or changed since it was recorded, as
        ``"REL is missing"`` / ``"REL changed since it was written"``; None when all are intact."""
        for rel, fp in recorded.items():
            if not self.exists(rel):
                return f"{rel} is missing"
            if fp.get("sha256") and self.checksum(rel) != fp["sha256"]:
                return f"{rel} changed since it was written"
        return None

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    # -- tables ------------------------------------------------------------------------
    def write_table(self, rel: str, table: pa.Table) -> str:
        """Write ``table`` as one Parquet file at ``rel``, atomically."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return self.write_bytes(rel, buf.getvalue())

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        """Read a Parquet file, or every ``*.parquet`` under a directory (hidden temps skipped)."""
        p = self.path(rel)
        info = self.fs.get_file_info(p)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{rel} not found in run directory {self.uri}")
        if info.type == pafs.FileType.File:
            with self.fs.open_input_file(p) as f:
                return pq.read_table(f, columns=columns)
        files = [
            i.path
            for i in self.fs.get_file_info(pafs.FileSelector(p, recursive=True))
            if i.type == pafs.FileType.File
            and i.path.endswith(".parquet")
            and not os.path.basename(i.path).startswith(".")
        ]
        tables = []
        for fp in sorted(files):
            with self.fs.open_input_file(fp) as f:
                tables.append(pq.read_table(f, columns=columns))
        if not tables:
            raise FileNotFoundError(f"no Parquet files under {rel} in {self.uri}")
        return pa.concat_tables(tables, promote_options="default")

    # -- json --------------------------------------------------------------------------
    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_bytes(
            rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        )

    def read_json(self, rel: str, default: Any = None) -> Any:
        if not self.exists(rel):
            return default
        return json.loads(self.read_bytes(rel))

    # -- read-modify-write -------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """Hold the run directory's lock ``name`` around a read-modify-write.

        On a local run directory this is ``fcntl.flock`` on ``.locks/NAME.lock``, so every
        process sharing the directory (the driver, Ray workers, Serve replicas on this
        machine, or any machine mounting it with working flock) waits its turn, and nothing
        is lost; the lock goes with its process if that dies. Object stores (``s3://``,
        ``gs://``) have no lock: there one writer per file is assumed (the driver writes the
        manifest; a concurrent writer of errors may lose rows), as for
        :meth:`create_exclusive`. Threads of one process are serialised either way.
        """
        with _LOCK:
            if not self.local:
                yield
                return
            import fcntl

            os.makedirs(self.path(".locks"), exist_ok=True)
            fd = os.open(self.path(f".locks/{name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    # -- errors ------------------------------------------------------------------------
    def record_errors(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Append rows (stage, item, reason) to ``errors.parquet``; returns how many. Safe
        against concurrent appends from other processes on a local run (:meth:`_locked`)."""
        rows = [
            {
                "stage": str(r["stage"]),
                "item": str(r["item"]),
                "reason": str(r["reason"]),
                "time": str(r.get("time") or _now()),
            }
            for r in rows
        ]
        if not rows:
            return 0
        with self._locked("errors"):
            new = pa.Table.from_pylist(rows, schema=ERROR_SCHEMA)
            if self.exists("errors.parquet"):
                new = pa.concat_tables([self.read_table("errors.parquet").cast(ERROR_SCHEMA), new])
            self.write_table("errors.parquet", new)
        return len(rows)

    def errors(self) -> pa.Table:
        if not self.exists("errors.parquet"):
            return ERROR_SCHEMA.empty_table()
        return self.read_table("errors.parquet")

    # -- manifest ----------------------------------------------------------------------
    def manifest(self) -> dict:
        """``manifest.json`` as a dict (empty when there is none); a damaged one is an error
        naming the file and the fix."""
        try:
            m = self.read_json("manifest.json", default={})
        except ValueError as e:  # not JSON (truncated, overwritten)
            what = f"not JSON ({e})"
            raise ValueError(_damaged_manifest(self.path("manifest.json"), what)) from None
        if not isinstance(m, dict):
            what = f"a JSON {type(m).__name__}, not an object"
            raise ValueError(_damaged_manifest(self.path("manifest.json"), what))
        return m

    def update_manifest(self, **fields: Any) -> dict:
        """Shallow-merge ``fields`` into ``manifest.json`` (dict values merge one level); safe
        against concurrent updates from other processes on a local run (:meth:`_locked`)."""
        with self._locked("manifest"):
            m = self.manifest()
            for k, v in fields.items():
                if isinstance(v, dict) and isinstance(m.get(k), dict):
                    m[k] = {**m[k], **v}
                else:
                    m[k] = v
            m["updated"] = _now()
            self.write_json("manifest.json", m)
        return m

    def set_stage(self, stage: str, status: str, **info: Any) -> None:
        """Record a stage's status (``running``/``done``/``failed``) in the manifest."""
        self.update_manifest(stages={stage: {"status": status, "time": _now(), **info}})
