"""The command line through its real entry point: every subcommand runs, and callers'
mistakes exit 2 with one line naming the value and the fix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from cluster.cli import main


def test_world_build_render_and_zoo_list(
    tmp_path, tiny_spec_path, fake_fmnist, tiny_zoo_path, capsys
):
    out = tmp_path / "w"
    assert (
        main(
            [
                "world",
                "build",
                "--spec",
                tiny_spec_path,
                "--out",
                str(out),
                "--fashion-mnist",
                fake_fmnist,
            ]
        )
        == 0
    )
    assert os.path.exists(out / "examples.parquet") and "840 examples" in capsys.readouterr().out
    png = tmp_path / "r.png"
    assert (
        main(
            [
                "world",
                "render",
                "--world",
                str(out),
                "--caption",
                "a photo of a red sandal on grass",
                "--n",
                "2",
                "--out",
                str(png),
            ]
        )
        == 0
    )
    from PIL import Image

    assert Image.open(png).size == (32, 16)  # two 16x16 images side by side
    assert main(["zoo", "list", "--zoo", tiny_zoo_path]) == 0
    listing = capsys.readouterr().out
    assert "tiny-resnet" in listing and "2/2 models have weights available here" in listing


def test_zoo_train_and_embed_train(tmp_path, tiny_world, tiny_zoo_path, capsys, monkeypatch):
    monkeypatch.setenv(
        "ZOO_AUDIT_CACHE", str(tmp_path / "cache")
    )  # trained here, whatever ran before
    assert (
        main(
            [
                "zoo",
                "train",
                "--zoo",
                tiny_zoo_path,
                "--data",
                tiny_world,
                "--models",
                "tiny-resnet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "tiny-resnet" in out and "trained" in out
    assert (
        main(
            [
                "zoo",
                "train",
                "--zoo",
                tiny_zoo_path,
                "--data",
                tiny_world,
                "--models",
                "tiny-resnet",
            ]
        )
        == 0
    )
    assert "cached" in capsys.readouterr().out
    assert main(["embed", "train", "--data", tiny_world]) == 0
    out = capsys.readouterr().out
    assert "world encoder trained" in out and "zero-shot accuracy" in out


def test_mistakes_exit_2_with_the_fix(tmp_path, tiny_zoo_path, tiny_world, capsys):
    assert main(["zoo", "list", "--zoo", str(tmp_path / "nope.toml")]) == 2
    assert "zoo manifest" in capsys.readouterr().err
    assert (
        main(
            ["zoo", "train", "--zoo", tiny_zoo_path, "--data", tiny_world, "--models", "tiny-resnt"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "unknown model 'tiny-resnt'" in err and "tiny-resnet" in err
    assert main(["serve", "--port", "0"]) == 2
    assert "--port 0 is not a TCP port" in capsys.readouterr().err
    assert main(["serve", "--backend", "bogus"]) == 2
    assert "unknown backend 'bogus'" in capsys.readouterr().err
    assert main(["run", "demo", "--out", ""]) == 2
    assert "--out is empty" in capsys.readouterr().err
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["run", "demo", "--out", str(f)]) == 2
    assert "is an existing file" in capsys.readouterr().err
    cfg = tmp_path / "missing.toml"
    cfg.write_text(f"[data]\npath = '{tmp_path / 'no-such-data.parquet'}'\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_is_the_demo_config(tmp_path, tiny_world, tiny_zoo_path, monkeypatch, capsys):
    """``zoo-audit demo`` runs the shipped demo config (here a tiny one, through
    $ZOO_AUDIT_CONFIGS, on in-process services) and ends with the summary."""
    import cluster.runner
    from audit.pipeline.executor import ThreadExecutor
    from audit.pipeline.inputs import Services
    from audit.zoo.shard import LocalSweeper

    configs = tmp_path / "configs" / "audit"
    configs.mkdir(parents=True)
    (configs / "demo.toml").write_text(f"""
[data]
path = "{tiny_world}"
[zoo]
manifest = "{tiny_zoo_path}"
[stats]
n_boot = 20
[directions]
enabled = false
""")
    monkeypatch.setenv("ZOO_AUDIT_CONFIGS", str(tmp_path / "configs"))
    monkeypatch.setattr(
        cluster.runner,
        "ray_services",
        lambda *a: Services(executor=ThreadExecutor(2), sweeper=LocalSweeper(threads=1)),
    )
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("zoo-audit run") and "demo.toml" in lines[0]
    assert any(line.startswith("  directions  off") for line in lines)
    assert lines[-2].startswith("run directory: ") and os.path.exists(out / "summary.txt")
    assert (
        lines[-1] == f"report: {out / 'report' / 'index.html'}"
    )  # the report's path, printed last


@pytest.mark.ray
@pytest.mark.slow
def test_serve_subcommand_serves_until_terminated(tmp_path):
    import httpx

    from serve.main import free_port

    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "zoo-audit")
    p = subprocess.Popen(
        [exe, "serve", "--backend", "null", "--port", str(port), "--store", str(tmp_path / "s")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline, health = time.time() + 120, None
        while time.time() < deadline and health is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()
            except httpx.HTTPError:
                time.sleep(1)
        assert health is not None and health["status"] == "ok", (
            p.stdout.read() if p.poll() is not None else "no answer"
        )
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(60)
