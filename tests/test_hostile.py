"""Hostile and careless input (issue 11): one bad image must not stop an audit, a model file
must not run code, and every careless flag or config value is one clear line before any work.

The audits here run on threads (no Ray) with the tiny world and zoo of conftest, with
directions and generation off, so each takes seconds.
"""

from __future__ import annotations

import io
import os
import pickle
import time

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from audit.data.readers import read_dataset
from audit.data.table import ImageTable
from audit.pipeline.executor import ThreadExecutor
from audit.pipeline.inputs import Services
from audit.pipeline.runner import StageFailed
from audit.store import RunStore
from audit.zoo.shard import LocalSweeper


def threads() -> Services:
    return Services(executor=ThreadExecutor(2), sweeper=LocalSweeper(threads=1))


def write_config(path, data_path: str, zoo: str, extra: str = "") -> str:
    """An audit config of the sweep and statistics only (the later stages are off)."""
    from audit.pipeline.config import SECTIONS

    off = "".join(
        f"[{name}]\nenabled = false\n" for name in ("mitigate", "report") if name in SECTIONS
    )
    path.write_text(f"""
[data]
path = "{data_path}"
[zoo]
manifest = "{zoo}"
[ray]
batch_size = 256
[stats]
n_boot = 20
[directions]
enabled = false
[generate]
enabled = false
{off}{extra}
""")
    return str(path)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(side: int = 100_000) -> bytes:
    """A PNG whose header claims side x side RGB pixels, in a few hundred bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    idat = zlib.compress(b"\0" * (1 + 3 * side) * 2, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def _manifest(
    world: str,
    path,
    extra: dict[str, bytes],
    first: dict[str, bytes] | None = None,
    all_debug: bytes | None = None,
) -> str:
    """The tiny world's train and debug rows as a Parquet manifest, plus debug rows with the
    given images (``first`` placed before every other row), or every debug image replaced."""
    tab = read_dataset(world)
    t = tab.split(["train", "debug"]).table
    if all_debug is not None:
        debug = pa.array([s == "debug" for s in t["split"].to_pylist()])
        imgs = [
            all_debug if d else b
            for d, b in zip(debug.to_pylist(), t["image"].to_pylist(), strict=True)
        ]
        t = t.set_column(t.schema.get_field_index("image"), "image", pa.array(imgs, pa.binary()))
    template = tab.split("debug").table.slice(0, 1)

    def rows(blobs: dict[str, bytes]) -> list[pa.Table]:
        out = []
        for eid, blob in blobs.items():
            r = template.set_column(
                template.schema.get_field_index("example_id"), "example_id", pa.array([eid])
            )
            out.append(
                r.set_column(
                    r.schema.get_field_index("image"), "image", pa.array([blob], pa.binary())
                )
            )
        return out

    table = pa.concat_tables([*rows(first or {}), t, *rows(extra)])
    ImageTable(table, tab.classes).with_metadata().to_parquet(str(path))
    return str(path)


def _preds(store: RunStore, model: str, ids: list[str]) -> pa.Table:
    t = store.read_table(f"predictions/model={model}")
    t = t.filter(pa.compute.is_in(t["example_id"], value_set=pa.array(ids)))
    return t.sort_by("example_id")


def test_bad_images_do_not_stop_the_audit_and_good_rows_are_unchanged(
    tmp_path, tiny_world, tiny_zoo_path, monkeypatch, capsys
):
    """Issue 11 #1 (with #4 and #9): corrupt, empty, truncated, 16-bit, huge-first and bomb
    images in a Parquet manifest: exit 0, one error row per undecodable image, and the good
    rows' predictions those of a run on the good rows alone."""
    import cluster.runner
    from cluster.cli import main

    good_png = read_dataset(tiny_world).split("debug").table["image"][0].as_py()
    bad = {
        "bad-corrupt": b"\x89PNG\r\n\x1a\n" + os.urandom(200),
        "bad-empty": b"",
        "bad-truncated": good_png[: len(good_png) // 2],
        "bad-bomb": _bomb_png(),
    }
    odd = {
        "odd-16bit": _png((np.arange(256, dtype=np.uint32).reshape(16, 16) * 250).astype(np.uint16))
    }
    huge = {"odd-huge-first": _png(np.full((2500, 2500, 3), 90, np.uint8))}
    hostile = _manifest(tiny_world, tmp_path / "hostile.parquet", {**bad, **odd}, first=huge)
    clean = _manifest(tiny_world, tmp_path / "clean.parquet", {})
    monkeypatch.setattr(cluster.runner, "ray_services", lambda *a: threads())

    for name, data in (("hostile", hostile), ("clean", clean)):
        cfg = write_config(tmp_path / f"{name}.toml", data, tiny_zoo_path)
        assert main(["run", cfg, "--out", str(tmp_path / name)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    h, c = RunStore(tmp_path / "hostile"), RunStore(tmp_path / "clean")
    assert h.manifest()["status"] == "done"
    errors = [r for r in h.errors().to_pylist() if r["stage"] == "decode"]
    assert sorted(r["item"] for r in errors) == sorted(
        bad
    )  # one row per undecodable image, nothing else
    assert "over the limit" in next(r["reason"] for r in errors if r["item"] == "bad-bomb")
    good = read_dataset(tiny_world).split("debug").example_ids.tolist()
    for model in ("tiny-resnet", "tiny-vit"):
        hp, cp = _preds(h, model, good), _preds(c, model, good)
        assert hp.num_rows == cp.num_rows == len(good)
        assert hp["pred"].to_pylist() == cp["pred"].to_pylist()
        np.testing.assert_allclose(
            hp["confidence"].to_numpy(), cp["confidence"].to_numpy(), atol=1e-5
        )
        assert set(h.read_table(f"predictions/model={model}")["example_id"].to_pylist()) == set(
            good
        ) | set(odd) | set(huge)
    assert h.exists("overlap.parquet") and h.exists("accuracy.parquet")
    # the huge first image no longer sets the size of every decoded image (2500x2500 x 92 = 1.7 GB)
    images, _, _ = read_dataset(hostile).split("debug").decode()
    assert images.shape[1:] == (16, 16, 3) and images.nbytes < 100_000


def test_nothing_decodes_is_one_clear_failure(tmp_path, tiny_world, tiny_zoo_path):
    """Issue 11 #9: "Must pass at least one table" was the only message when nothing decoded."""
    from cluster.runner import run_audit

    data = _manifest(tiny_world, tmp_path / "m.parquet", {}, all_debug=b"not an image")
    with pytest.raises(StageFailed) as e:
        run_audit(
            write_config(tmp_path / "a.toml", data, tiny_zoo_path),
            str(tmp_path / "run"),
            services=threads(),
            console=lambda s: None,
        )
    assert (
        e.value.stage == "sweep"
        and "no image of split" in e.value.reason
        and "could be decoded" in e.value.reason
    )
    assert "Must pass" not in e.value.reason


class _Payload:
    """Unpickling this creates a directory: the stand-in for `os.system(...)`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _evil_zoo(tmp_path, tiny_zoo_path: str, keep_tiny: bool) -> tuple[str, list[str]]:
    import torch

    markers = [str(tmp_path / "pwned-pickle"), str(tmp_path / "pwned-torch-save")]
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(_Payload(markers[0]), f)
    torch.save(_Payload(markers[1]), tmp_path / "evil.pt")  # the zip format torch.load reads
    evil = "".join(
        f'\n[[models]]\nname = "{n}"\nfamily = "local"\nbuilder = "local"\nweights = "{tmp_path / f}"\n'
        for n, f in (("evil-pickle", "evil.pkl"), ("evil-torch-save", "evil.pt"))
    )
    zoo = tmp_path / "zoo.toml"
    tiny = open(tiny_zoo_path).read()
    zoo.write_text((tiny if keep_tiny else tiny.split("[[models]]")[0]) + evil)
    return str(zoo), markers


def test_pickled_model_file_does_not_run_and_is_an_error_row(tmp_path, tiny_world, tiny_zoo_path):
    """Issue 11 #2: a `local` model whose pickle's __reduce__ runs code ran it while loading."""
    from cluster.runner import run_audit

    zoo, markers = _evil_zoo(tmp_path, tiny_zoo_path, keep_tiny=True)
    store, outcome = run_audit(
        write_config(tmp_path / "a.toml", tiny_world, zoo),
        str(tmp_path / "run"),
        services=threads(),
        console=lambda s: None,
    )
    assert outcome.failed is None
    assert not any(os.path.exists(m) for m in markers)  # no payload ran
    rows = {r["item"]: r["reason"] for r in store.errors().to_pylist()}
    for name in ("evil-pickle", "evil-torch-save"):
        assert any(name in item for item in rows), rows
        reason = next(v for k, v in rows.items() if name in k)
        assert "not a TorchScript file" in reason and "safetensors" in reason
    assert store.read_table("predictions/model=tiny-resnet").num_rows == 90  # the sweep went on


def test_every_model_failing_is_one_clear_failure(tmp_path, tiny_world, tiny_zoo_path):
    """Issue 11 #9: every model failing ended in "Must pass at least one table"."""
    from cluster.runner import run_audit

    zoo, markers = _evil_zoo(tmp_path, tiny_zoo_path, keep_tiny=False)
    with pytest.raises(StageFailed) as e:
        run_audit(
            write_config(tmp_path / "a.toml", tiny_world, zoo),
            str(tmp_path / "run"),
            services=threads(),
            console=lambda s: None,
        )
    assert (
        e.value.stage == "sweep"
        and "every model failed" in e.value.reason
        and "errors.parquet" in e.value.reason
    )
    assert not any(os.path.exists(m) for m in markers)


# -- careless flags and config values: exit 2, one line, before any work (issue 11 #7, #8) ----
def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_port_backend_and_out_mistakes_exit_2(tmp_path, capsys):
    from cluster.cli import main

    for port in ("99999", "0", "-1"):
        assert main(["serve", "--port", port]) == 2
        assert f"--port {port} is not a TCP port" in _one_line(capsys)
    assert main(["serve", "--backend", "bogus"]) == 2
    assert "unknown backend 'bogus'" in _one_line(capsys)
    assert main(["run", "demo", "--out", ""]) == 2 and "--out is empty" in _one_line(capsys)
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["run", "demo", "--out", str(f)]) == 2 and "is an existing file" in _one_line(
        capsys
    )
    assert main(["run", "demo", "--out", str(f / "sub")]) == 2  # a path through a file
    assert str(f) in _one_line(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write a read-only directory")
def test_cli_read_only_out_exits_2(tmp_path, capsys):
    from cluster.cli import main

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    assert main(["run", "demo", "--out", str(ro / "run")]) == 2
    assert "not writable" in _one_line(capsys)


def test_cli_config_mistakes_exit_2_before_any_work(tmp_path, tiny_world, tiny_zoo_path, capsys):
    """``num_cpus = 100000`` ended in a segfault loop; ``n_boot = 0`` gave NaN intervals;
    ``num_cpu_workers = "two"`` and a missing ``[data] path`` were tracebacks or silent."""
    from cluster.cli import main

    cases = {
        "[ray]\nnum_cpus = 100000": "[ray] num_cpus = 100000",
        '[ray]\nnum_cpu_workers = "two"': "num_cpu_workers",
        "[stats]\nn_boot = 0": "n_boot",
    }
    for i, (section, want) in enumerate(cases.items()):
        text = f'[data]\npath = "{tiny_world}"\n[zoo]\nmanifest = "{tiny_zoo_path}"\n{section}\n'
        (tmp_path / f"c{i}.toml").write_text(text)
        out = tmp_path / f"run{i}"
        assert main(["run", str(tmp_path / f"c{i}.toml"), "--out", str(out)]) == 2, section
        assert want in _one_line(capsys), section
        assert not os.path.exists(out / "manifest.json")
    (tmp_path / "typo.toml").write_text(f'[data]\npath = "{tiny_world}x"\n')
    assert main(["run", str(tmp_path / "typo.toml"), "--out", str(tmp_path / "run-typo")]) == 2
    assert "does not exist" in _one_line(capsys)
    assert not os.path.exists(tmp_path / "run-typo" / "manifest.json")


@pytest.mark.parametrize(
    ("uri", "hint"),
    [
        ("gs://zoo-audit-no-such-bucket/run", "GOOGLE_APPLICATION_CREDENTIALS"),
        ("s3://zoo-audit-no-such-bucket/run", "AWS_ACCESS_KEY_ID"),
    ],
)
def test_cli_out_uri_without_credentials_fails_fast(
    tmp_path, tiny_world, tiny_zoo_path, monkeypatch, capsys, uri, hint
):
    """``--out gs://...`` hung for minutes and ``s3://`` without credentials was a traceback."""
    from cluster.cli import main

    monkeypatch.setenv("ZOO_AUDIT_STORE_TIMEOUT_S", "3")
    for k in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_PROFILE",
        "GOOGLE_APPLICATION_CREDENTIALS",
    ):
        monkeypatch.delenv(k, raising=False)
    cfg = write_config(tmp_path / "a.toml", tiny_world, tiny_zoo_path)
    t = time.monotonic()
    assert main(["run", cfg, "--out", uri]) == 2
    assert time.monotonic() - t < 20
    line = _one_line(capsys)
    assert uri in line and hint in line


def test_n_boot_below_zero_is_an_error_in_the_library():
    """Issue 11 #10: ``n_boot`` <= 0 silently gave NaN intervals; the config requires >= 1 and
    the library refuses a negative or non-integer count (0 stays its documented "no intervals")."""
    from audit.failures import bootstrap_error_consistency

    n_fail, n_both = np.array([3, 4]), np.array([[3, 2], [2, 4]])
    for bad in (-1, 2.5, "10"):
        with pytest.raises(ValueError, match="n_boot must be an int"):
            bootstrap_error_consistency(n_fail, n_both, 10, n_boot=bad)


@pytest.mark.ray
def test_embedded_ray_goes_with_a_killed_driver(tmp_path):
    """Issue 11 #10: a driver killed with SIGKILL used to leave its embedded Ray (gcs, raylet,
    monitors, dashboard and the raylet's agents) running for about a minute; the watchdog
    ends them all within seconds."""
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "pids"
    code = (
        "import sys, time, ray\nfrom cluster.runtime import connect\nconnect(num_cpus=1)\n"
        "n = ray._private.worker._global_node\n"
        "open(sys.argv[1], 'w').write(' '.join(str(p.process.pid) for v in n.all_processes.values() for p in v))\n"
        "time.sleep(300)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(pid_file)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # the raylet's agents are up
    from cluster.watchdog import tree

    pids = tree([int(x) for x in pid_file.read_text().split()])
    assert len(pids) > 5
    os.kill(p.pid, signal.SIGKILL)
    p.wait()

    def alive(pid):
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(") ", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.time() + 20
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in pids if alive(pid)], (
        "Ray processes outlived the killed driver by 20 s"
    )
