"""The embedded Ray's watchdog (``cluster.watchdog``): it kills the processes it noted once
the driver is gone, and never a process that merely reuses a noted id."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from cluster import watchdog

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="the watchdog reads /proc")


def _sleeper(*tag: str) -> subprocess.Popen:
    # the tag puts "ray" on the command line, as Ray's own processes have
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *tag])
    # /proc/PID/cmdline reads empty for a moment after exec: wait for the new one
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{p.pid}/cmdline", "rb") as f:
            if f.read():
                break
        time.sleep(0.01)
    return p


def test_noted_processes_go_with_the_driver_and_their_children_too():
    driver, ray_proc = _sleeper(), _sleeper("ray-like")
    spawn = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', 'ray-child']); "
        "time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", spawn, "ray-parent"])
    time.sleep(1.0)
    kids = watchdog.tree([child.pid]) - {child.pid}
    assert kids, "the grandchild is found through /proc"
    pids = [str(p.pid) for p in (driver, ray_proc, child)]
    w = subprocess.Popen([sys.executable, "-m", "cluster.watchdog", *pids])
    time.sleep(1.5)
    assert ray_proc.poll() is None  # nothing is killed while the driver lives
    driver.kill()
    driver.wait()
    assert w.wait(timeout=20) == 0
    for p in (ray_proc, child):
        assert p.wait(timeout=5) == -9
    # SIGKILL is delivered asynchronously: the orphaned grandchild may run for a moment more
    deadline = time.monotonic() + 10
    while [k for k in kids if _running(k)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [k for k in kids if _running(k)]


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan killed here may wait for a reaper that never comes)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_reused_process_id_is_left_alone():
    other = _sleeper("ray-but-not-ours")
    try:
        t = watchdog.start_time(other.pid)
        assert t is not None
        # noted with another start time: the id was reused by a process we never saw
        assert watchdog.kill_noted({other.pid: t + 1}) == []
        assert other.poll() is None
        assert watchdog.kill_noted({other.pid: t}) == [other.pid]
        assert other.wait(timeout=5) == -9
    finally:
        other.kill()


def test_usage():
    assert watchdog.main([]) == 2
