"""manifest.json and errors.parquet written by several processes at once (the driver, Ray
workers, Serve replicas sharing one run directory): every update lands."""

from __future__ import annotations

import multiprocessing

from audit.store import RunStore

WRITERS, UPDATES = 4, 40


def _writer(root: str, who: int, n: int, start) -> None:
    """Process ``who``: ``n`` manifest keys of its own, a nested key, and ``n`` error rows."""
    store = RunStore(root)
    start.wait(timeout=120)  # all writers begin together, so their updates interleave
    for j in range(n):
        store.update_manifest(**{f"w{who}-{j}": j}, writers={f"w{who}": j})
        store.record_errors([{"stage": "test", "item": f"w{who}-{j}", "reason": "concurrent"}])


def test_manifest_and_errors_from_many_processes_lose_nothing(tmp_path):
    root = str(tmp_path / "run")
    RunStore(root).update_manifest(kind="audit", writers={})
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(WRITERS)
    procs = [ctx.Process(target=_writer, args=(root, w, UPDATES, start)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * WRITERS

    store = RunStore(root)
    m = store.manifest()
    want = {f"w{w}-{j}" for w in range(WRITERS) for j in range(UPDATES)}
    assert want - set(m) == set() and m["kind"] == "audit"
    assert m["writers"] == {f"w{w}": UPDATES - 1 for w in range(WRITERS)}
    items = store.errors()["item"].to_pylist()
    assert len(items) == len(want) and set(items) == want
    # each process's own rows stay in its order (appends, never reorderings)
    for w in range(WRITERS):
        mine = [i for i in items if i.startswith(f"w{w}-")]
        assert mine == [f"w{w}-{j}" for j in range(UPDATES)]
