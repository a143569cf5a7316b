"""The embedded Ray's watchdog: ``python -m cluster.watchdog DRIVER_PID RAY_PID...``.

Embedded Ray outlives a driver killed with SIGKILL by about a minute (its processes and
agents wait for heartbeats). :func:`cluster.runtime.reap_with_driver` starts this module in
a session of its own; while the driver lives it notes the Ray processes the driver started
and their children (agents, workers), each with its start time, and once the driver is gone
it kills them. A process is killed only if it is still the one noted (same start time, so a
reused process id is left alone) and its command line names ray. Linux only (``/proc``).
"""

from __future__ import annotations

import os
import signal
import sys
import time


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot; ``/proc/PID/stat`` field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(") ", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def parents() -> dict[int, int]:
    """``{pid: parent pid}`` of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    out[int(d)] = int(f.read().rsplit(") ", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return out


def tree(roots: list[int]) -> set[int]:
    """``roots`` and all their descendants."""
    ppid, seen, todo = parents(), set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo += [c for c, p in ppid.items() if p == pid]
    return seen


def note(pids: set[int], known: dict[int, int]) -> None:
    for pid in pids:
        if pid not in known and (t := start_time(pid)) is not None:
            known[pid] = t


def kill_noted(known: dict[int, int]) -> list[int]:
    """SIGKILL every noted process that is still the one noted and names ray; returns them."""
    killed = []
    for pid, t in known.items():
        if start_time(pid) != t:
            continue  # gone, or its id now belongs to another process
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"ray" in f.read():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
        except OSError:
            pass
    return killed


def watch(driver: int, roots: list[int], interval: float = 0.5) -> list[int]:
    """Note ``roots`` and their children while ``driver`` lives; then kill them."""
    known: dict[int, int] = {}
    note(set(roots), known)
    n = 0
    while alive(driver):
        if n % 4 == 0:  # once the driver is gone the raylet may go first, orphaning its children
            note(tree(roots), known)
        n += 1
        time.sleep(interval)
    note(tree([p for p in roots if p in known]), known)
    return kill_noted(known)


def main(argv: list[str] | None = None) -> int:
    args = [int(a) for a in (sys.argv[1:] if argv is None else argv)]
    if len(args) < 2:
        print("usage: python -m cluster.watchdog DRIVER_PID RAY_PID...", file=sys.stderr)
        return 2
    watch(args[0], args[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
