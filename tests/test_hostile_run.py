"""Hostile and careless handling of a run (issue 20): Ctrl-C and SIGTERM stop it and say how to
resume; a damaged run directory is noticed; a failing write names its stage and file.

The in-process audits run on threads (no Ray) with the tiny world and zoo of conftest, sweep
and statistics only; one test sends Ctrl-C to a real ``zoo-audit run`` on Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_hostile import threads, write_config

import cluster.runner
from audit.pipeline.executor import ThreadExecutor
from audit.pipeline.inputs import Services
from audit.store import RunStore
from cluster.cli import main

MESSAGE = "zoo-audit: interrupted; rerun the same command to resume"


@pytest.fixture
def config(tmp_path, tiny_world, tiny_zoo_path) -> str:
    return write_config(tmp_path / "audit.toml", tiny_world, tiny_zoo_path)


class SignallingSweeper:
    """Sends this process ``signum`` in the middle of the sweep; with ``wrap`` it turns the
    interrupt into an error of its own, as a library may (Ray's start-up did)."""

    def __init__(self, signum: int, wrap: bool = False):
        self.signum, self.wrap = signum, wrap

    def run(self, job, sink):
        try:
            os.kill(os.getpid(), self.signum)
            time.sleep(3)  # the handler raises at once; an ignored signal sleeps through
        except KeyboardInterrupt:
            if self.wrap:
                raise RuntimeError("the Ray cluster failed to start") from None
            raise
        raise AssertionError(f"{signal.Signals(self.signum).name} did not stop the sweep")


def _with_sweeper(monkeypatch, sweeper) -> None:
    def services(cfg, store, world_dir, ray, progress, data=None):
        return Services(executor=ThreadExecutor(2), sweeper=sweeper)

    monkeypatch.setattr(cluster.runner, "ray_services", services)


@pytest.fixture
def signals_restored():
    """Whatever a test does to SIGINT and SIGTERM is undone; an unhandled SIGTERM raises
    instead of ending pytest (the state before the fix)."""
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def unhandled(signum, frame):
        raise RuntimeError("SIGTERM reached the test's own handler")

    signal.signal(signal.SIGTERM, unhandled)
    yield
    for s, h in old.items():
        signal.signal(s, h)


def _interrupted(out, capsys, stage: str = "sweep") -> None:
    assert MESSAGE in capsys.readouterr().err
    m = RunStore(str(out)).manifest()
    assert m["status"] == "interrupted" and m["stages"][stage]["status"] == "interrupted"


def _resumes(config: str, out) -> None:
    """The same command again (here on threads) runs the interrupted stage and finishes."""
    from cluster.runner import run_audit

    _, res = run_audit(config, str(out), services=threads(), console=lambda line: None)
    assert res.failed is None and "sweep" in res.ran and res.skipped == ["train"]
    assert RunStore(str(out)).manifest()["status"] == "done"


def test_sigterm_is_recorded_as_interrupted_and_exits_143(
    config, tmp_path, monkeypatch, capsys, signals_restored
):
    _with_sweeper(monkeypatch, SignallingSweeper(signal.SIGTERM))
    out = tmp_path / "run"
    assert main(["run", config, "--out", str(out)]) == 143
    _interrupted(out, capsys)
    assert RunStore(str(out)).manifest()["stages"]["sweep"]["signal"] == "SIGTERM"
    _resumes(config, out)


def test_ctrl_c_stops_a_run_that_inherited_sigint_ignored(
    config, tmp_path, monkeypatch, capsys, signals_restored
):
    """A run started in the background of a script inherits SIGINT ignored (the cause of
    issue 20's ignored Ctrl-C): the run still stops, records it, and exits 130."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _with_sweeper(monkeypatch, SignallingSweeper(signal.SIGINT))
    out = tmp_path / "run"
    assert main(["run", config, "--out", str(out)]) == 130
    _interrupted(out, capsys)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the run puts back what it found


def test_ctrl_c_that_a_library_turns_into_its_error_is_still_an_interruption(
    config, tmp_path, monkeypatch, capsys, signals_restored
):
    """Ctrl-C during Ray's start-up came back as a Ray failure: a stage that fails after a
    signal came in is interrupted, not failed."""
    _with_sweeper(monkeypatch, SignallingSweeper(signal.SIGINT, wrap=True))
    out = tmp_path / "run"
    assert main(["run", config, "--out", str(out)]) == 130
    _interrupted(out, capsys)
    assert not RunStore(str(out)).errors().num_rows  # no failure row for an interruption


def _sweep_status(out) -> str | None:
    try:
        with open(os.path.join(out, "manifest.json")) as f:
            return json.load(f).get("stages", {}).get("sweep", {}).get("status")
    except (OSError, ValueError):
        return None


@pytest.mark.ray
def test_ctrl_c_to_the_process_group_stops_a_real_run(config, tmp_path):
    """``zoo-audit run`` on an embedded Ray, started as a script's background job (SIGINT
    ignored), gets SIGINT on its process group during the sweep: it stops within seconds,
    exits 130, records the sweep as interrupted, and the same command resumes."""
    from cluster.runner import run_audit

    # the tiny zoo trained into the session's cache first (by an earlier test, or here)
    run_audit(config, str(tmp_path / "warm"), services=threads(), console=lambda line: None)
    out = str(tmp_path / "run")
    exe = os.path.join(os.path.dirname(sys.executable), "zoo-audit")
    p = subprocess.Popen(
        [exe, "run", config, "--out", out],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        deadline = time.monotonic() + 60
        while _sweep_status(out) != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # into Ray's start-up
        os.killpg(p.pid, signal.SIGINT)
        sent = time.monotonic()
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, err
    assert time.monotonic() - sent < 15
    assert MESSAGE in err and "Traceback" not in err and "SIGTERM received" not in err
    m = RunStore(out).manifest()
    assert m["status"] == "interrupted" and m["stages"]["sweep"]["status"] == "interrupted"
    _resumes(config, out)
