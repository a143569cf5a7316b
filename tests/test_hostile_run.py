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


# -- a damaged run directory ---------------------------------------------------------------
def _run(config: str, out) -> tuple[object, list[str]]:
    from cluster.runner import run_audit

    lines: list[str] = []
    _, res = run_audit(config, str(out), services=threads(), console=lines.append)
    return res, lines


@pytest.mark.parametrize("text", ["[1, 2]", '{"stages": {"sweep"'])
def test_a_manifest_that_is_not_a_json_object_is_one_line_naming_it(config, tmp_path, capsys, text):
    from audit.view import RunView

    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text(text)
    assert main(["run", config, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{out / 'manifest.json'} is damaged" in err
    assert "delete it" in err and "--out" in err
    with pytest.raises(ValueError, match="manifest.json is damaged"):
        RunView.open(str(out))


def test_a_swapped_stage_output_is_noticed_and_the_stage_redone(config, tmp_path):
    out = tmp_path / "run"
    _run(config, out)
    store = RunStore(str(out))
    recorded = store.manifest()["stages"]["accuracy"]["outputs"]["accuracy.parquet"]
    assert recorded["sha256"] and "class: string" in " ".join(recorded["schema"])
    good = store.read_table("accuracy.parquet")
    store.write_bytes("accuracy.parquet", store.read_bytes("overlap.parquet"))  # another table
    res, lines = _run(config, out)
    assert res.ran == ["accuracy"] and res.failed is None
    assert "  accuracy    accuracy.parquet changed since it was written: redoing the stage" in lines
    assert store.read_table("accuracy.parquet").equals(good)
    assert store.manifest()["status"] == "done"


def test_a_corrupted_prediction_or_deleted_features_reruns_those_models(config, tmp_path):
    from audit.evaluate import prediction_path

    out = tmp_path / "run"
    _run(config, out)
    store = RunStore(str(out))
    pred = prediction_path("tiny-vit")
    store.write_bytes(pred, store.read_bytes(prediction_path("tiny-resnet")))
    res, _ = _run(config, out)
    assert res.ran == ["sweep"]
    assert store.manifest()["stages"]["sweep"]["line"].startswith("2 models x")
    assert "1 run, 1 current" in store.manifest()["stages"]["sweep"]["line"]
    store.delete("features")
    res, _ = _run(config, out)
    assert (
        res.ran == ["sweep"] and "2 run, 0 current" in store.manifest()["stages"]["sweep"]["line"]
    )
    assert store.exists("features")


def test_a_full_disk_fails_the_stage_naming_it_and_the_file(config, tmp_path, monkeypatch, capsys):
    """ENOSPC while the sweep writes: the stage and the run are recorded failed (the small
    manifest still fits) and the one line names the stage and the file."""
    import errno

    from audit.store import RunStore as Store

    write = Store._write_stream

    def full_disk(self, path, data):
        if "manifest.json" not in path:
            raise OSError(errno.ENOSPC, "Error writing bytes to file")
        return write(self, path, data)

    _with_sweeper(monkeypatch, threads().sweeper)
    monkeypatch.setattr(Store, "_write_stream", full_disk)
    out = tmp_path / "run"
    assert main(["run", config, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "stage 'sweep' failed" in err and "writing features/model=tiny-resnet/" in err
    assert "No space left on device" in err and "free space" in err
    monkeypatch.setattr(Store, "_write_stream", write)
    m = RunStore(str(out)).manifest()
    assert m["status"] == "failed" and m["stages"]["sweep"]["status"] == "failed"


def test_report_out_refuses_a_folder_of_the_users_own_files(config, tmp_path, capsys):
    out = tmp_path / "run"
    _run(config, out)
    mine = tmp_path / "site"
    mine.mkdir()
    (mine / "index.html").write_text("my own page")
    assert main(["report", str(out), "--out", str(mine)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "index.html" in err and "empty or new folder" in err
    assert (mine / "index.html").read_text() == "my own page"
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert main(["report", str(out), "--out", str(fresh)]) == 0  # an empty folder
    assert main(["report", str(out), "--out", str(fresh)]) == 0  # an earlier report's folder


@pytest.mark.parametrize("model", ["/no/such/model", "MISSING"])
def test_serve_with_missing_diffusion_weights_is_one_line_before_serve(model, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["serve", "--backend", f"diffusers:{model}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"diffusion weights {model!r} are not here" in err
