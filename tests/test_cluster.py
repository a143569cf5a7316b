"""The zoo sweep with tiny timm models on random 16x16 images: in-process (LocalSweeper)
and on Ray shard actors (RaySweeper, the session's embedded 2-CPU Ray).

The end-to-end test (slow) starts its own ``ray start --head`` cluster with token auth and
submits ``zoo-audit run``.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pytest

from audit.data.table import ImageTable
from audit.evaluate import feature_path, prediction_path
from audit.store import RunStore
from audit.zoo.spec import ModelSpec, ZooSpec

CLASSES = ["a", "b", "c"]
N_IMAGES = 80
BATCH = 16
TINY_INPUT = {"input_size": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "crop_pct": 1.0}

TINY_ZOO = """
name = "tiny"
[defaults]
builder = "timm"
weights = "train"
input = { input_size = 16, mean = [0.5, 0.5, 0.5], std = [0.25, 0.25, 0.25], crop_pct = 1.0 }

[[models]]
name = "res-a"
family = "resnet"
arch = "resnet18"
kwargs = { layers = [1, 1, 1, 1], channels = [4, 8, 8, 8], stem_width = 4 }

[[models]]
name = "res-b"
family = "resnet"
arch = "resnet18"
kwargs = { layers = [1, 1, 1, 1], channels = [8, 8, 8, 8], stem_width = 8 }

[[models]]
name = "vit-a"
family = "vit"
arch = "vit_tiny_patch16_224"
kwargs = { img_size = 16, patch_size = 4, embed_dim = 16, depth = 1, num_heads = 2 }
"""


def tiny_zoo(tmp: str) -> ZooSpec:
    path = os.path.join(tmp, "tiny.toml")
    with open(path, "w") as f:
        f.write(TINY_ZOO)
    return ZooSpec.from_toml(path)


def random_weights(specs, directory: str, seed: int = 0) -> dict[str, str]:
    """Untrained weights (0 training steps), saved like trained checkpoints."""
    import torch
    from safetensors.torch import save_file

    from audit.zoo.models import create_timm

    os.makedirs(directory, exist_ok=True)
    out = {}
    for i, spec in enumerate(specs):
        torch.manual_seed(seed + i)
        model = create_timm(spec, len(CLASSES))
        out[spec.name] = os.path.join(directory, f"{spec.name}.safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out[spec.name])
    return out


def broken_specs(tmp: str) -> list[ModelSpec]:
    """One model that cannot load (no checkpoint) and one that raises on every batch."""
    import torch

    class WrongClasses(torch.nn.Module):  # 5 outputs for a 3-class dataset: fails at run time
        def forward(self, x):
            return x.mean(dim=(2, 3)).repeat(1, 2)[:, :5]

    path = os.path.join(tmp, "wrong.pt")
    torch.jit.trace(WrongClasses(), torch.zeros(1, 3, 16, 16)).save(path)
    return [
        ModelSpec(
            name="no-weights",
            family="resnet",
            arch="resnet18",
            input=TINY_INPUT,
            kwargs={"layers": [1, 1, 1, 1], "channels": [4, 8, 8, 8]},
        ),
        ModelSpec(name="raises", family="local", builder="local", weights=path, input=TINY_INPUT),
    ]


def random_images(n: int = N_IMAGES, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    return images, np.asarray([f"ex{i:04d}" for i in range(n)]), rng.integers(0, len(CLASSES), n)


def image_table(n_train: int = 8, n_debug: int = 40, seed: int = 0) -> ImageTable:
    from PIL import Image

    images, _, labels = random_images(n_train + n_debug, seed)
    blobs = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    t = pa.table(
        {
            "example_id": [f"ex{i:04d}" for i in range(len(images))],
            "split": ["train"] * n_train + ["debug"] * n_debug,
            "label": pa.array(labels.astype(np.int32)),
            "image": pa.array(blobs, pa.binary()),
        }
    )
    return ImageTable(t, CLASSES)


def read_model(store: RunStore, name: str) -> dict:
    out = {"predictions": store.read_table(prediction_path(name)).to_pydict()}
    if store.exists(feature_path(name)):
        out["features"] = store.read_table(feature_path(name)).to_pydict()
    return out


# -- pure planning (no Ray) ----------------------------------------------------------------
def test_plan_shards_assigns_each_model_once_and_balances_cost():
    from audit.zoo.shard import plan_shards

    costs = {"big": 10.0, "m1": 4.0, "m2": 3.0, "m3": 3.0, "s1": 1.0, "s2": 1.0}
    plan = plan_shards(costs, 2)
    flat = [m for s in plan for m in s]
    assert sorted(flat) == sorted(costs)
    loads = [sum(costs[m] for m in s) for s in plan]
    assert loads == [11.0, 11.0]
    assert plan_shards({"a": 0.0, "b": 0.0, "c": 0.0}, 3) == [["a"], ["b"], ["c"]]
    assert plan_shards({"a": 1.0}, 4) == [["a"]]
    with pytest.raises(ValueError, match="n_shards"):
        plan_shards(costs, 0)


def test_plan_shards_respects_shard_memory_and_improves_on_lpt():
    from audit.zoo.shard import plan_shards

    # LPT alone gives loads (5+2+2, 4+3) = (9, 7); a swap reaches (8, 8)
    costs = {"a": 5.0, "b": 4.0, "c": 3.0, "d": 2.0, "e": 2.0}
    plan = plan_shards(costs, 2)
    assert sorted(sum(costs[m] for m in s) for s in plan) == [8.0, 8.0]
    # memory: "a" and "b" are too big to share a shard
    sizes = {"a": 6.0, "b": 6.0, "c": 1.0, "d": 1.0, "e": 1.0}
    plan = plan_shards(costs, 2, sizes, capacity=8.0)
    assert sorted(m for s in plan for m in s) == sorted(costs)
    assert all(sum(sizes[m] for m in s) <= 8.0 for s in plan)
    assert not any({"a", "b"} <= set(s) for s in plan)
    with pytest.raises(ValueError, match="does not fit"):
        plan_shards(costs, 2, sizes, capacity=5.5)
    with pytest.raises(ValueError, match="capacity needs sizes"):
        plan_shards(costs, 2, capacity=5.5)


def test_cost_estimate_counts_flops_of_wider_models_higher(tmp_path):
    from audit.zoo.shard import estimate_cost, model_profiles

    zoo = tiny_zoo(str(tmp_path))
    a, b = estimate_cost(zoo.get("res-a"), 3), estimate_cost(zoo.get("res-b"), 3)
    assert a and b and b > a
    costs, _ = model_profiles([*zoo, *broken_specs(str(tmp_path))], 3)
    assert costs["raises"] == pytest.approx(
        np.median([costs[m] for m in zoo.names] + [costs["no-weights"]])
    )


def test_shard_retries_a_model_at_half_batch_on_out_of_memory(tmp_path):
    """In-process ZooShard (no Ray): a model that runs out of memory above 4 images per batch."""
    import torch

    from audit.zoo.shard import ZooShard

    class Oom(torch.nn.Module):
        def forward(self, x):
            if x.shape[0] > 4:
                raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")
            return x.mean(dim=(2, 3))

    path = str(tmp_path / "oom.pt")
    torch.jit.script(Oom()).save(path)
    zoo = tiny_zoo(str(tmp_path))
    specs = [
        ModelSpec(name="oom", family="x", builder="local", weights=path, input=TINY_INPUT),
        zoo.get("res-a"),
    ]
    weights = random_weights([zoo.get("res-a")], str(tmp_path / "w"))
    shard = ZooShard(specs, CLASSES, weights, device="cpu", threads=1, batch_size=16)
    images = random_images(20)[0]
    out = shard.run_batch(images, 0)
    assert out["failed"] == {} and shard.batch_size == {"oom": 4, "res-a": 16}
    assert out["outputs"]["oom"]["logits"].shape == (20, 3)
    np.testing.assert_allclose(
        out["outputs"]["oom"]["logits"][:, 0],
        (images[..., 0] / 255.0 - 0.5).mean((1, 2)) / 0.25,
        rtol=1e-4,
        atol=1e-5,
    )


# -- Ray -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("sweep"))
    zoo = tiny_zoo(tmp)
    specs = [*zoo, *broken_specs(tmp)]
    return {
        "tmp": tmp,
        "specs": specs,
        "weights": random_weights(list(zoo), os.path.join(tmp, "w")),
        "data": random_images(),
        "good": zoo.names,
    }


def sweep(store, setup, specs=None, sweeper=None, **kw):
    from audit.pipeline.sweep import sweep_arrays
    from cluster.sweep import RaySweeper

    images, ids, labels = setup["data"]
    sweeper = sweeper or RaySweeper(num_workers=2, **kw)
    return sweep_arrays(
        store,
        images,
        ids,
        labels,
        CLASSES,
        specs or setup["specs"],
        setup["weights"],
        sweeper,
        data_key="random-80",
        split="debug",
        batch_size=BATCH,
        with_features=True,
    )


@pytest.fixture(scope="module")
def reference(ray_session, setup, tmp_path_factory):
    store = RunStore(str(tmp_path_factory.mktemp("ref")))
    return store, sweep(store, setup)


@pytest.mark.ray
def test_sweep_covers_every_model_once_and_records_errors(reference, setup):
    store, res = reference
    names = [s.name for s in setup["specs"]]
    flat = [m for shard in res.info["shards"] for m in shard]
    assert sorted(flat) == sorted(names) and len(res.info["shards"]) == 2
    assert sorted(res.done) == sorted(setup["good"])
    assert sorted(res.failed) == ["no-weights", "raises"]
    errors = store.errors().to_pylist()
    items = sorted(r["item"] for r in errors)
    assert items == ["model no-weights", "model raises"]
    assert any("WeightsUnavailable" in r["reason"] for r in errors)
    assert any("outputs 5 classes" in r["reason"] for r in errors)
    images, ids, labels = setup["data"]
    for name in setup["good"]:
        p = store.read_table(prediction_path(name))
        assert p["example_id"].to_pylist() == ids.tolist()
        assert p["label"].to_pylist() == labels.tolist()
        assert store.read_table(feature_path(name)).num_rows == N_IMAGES
    assert not store.exists(prediction_path("raises"))
    recs = store.manifest()["sweep"]["models"]
    assert {m: recs[m]["status"] for m in names} == {
        **{m: "done" for m in setup["good"]},
        "no-weights": "failed",
        "raises": "failed",
    }


@pytest.mark.ray
def test_sweep_matches_the_plain_loop(reference, setup, tmp_path):
    """Ray shards give the predictions and features of the in-process LocalSweeper, and
    both record the same failures."""
    from audit.zoo.shard import LocalSweeper

    ref_store, ref = reference
    store = RunStore(str(tmp_path / "local"))
    res = sweep(store, setup, sweeper=LocalSweeper(threads=1))
    assert sorted(res.done) == sorted(ref.done) and sorted(res.failed) == sorted(ref.failed)
    for name in setup["good"]:
        got, want = read_model(store, name), read_model(ref_store, name)
        assert got["predictions"]["pred"] == want["predictions"]["pred"], name
        np.testing.assert_allclose(
            got["predictions"]["confidence"], want["predictions"]["confidence"], rtol=1e-4
        )
        np.testing.assert_allclose(
            np.asarray(got["features"]["vector"]),
            np.asarray(want["features"]["vector"]),
            rtol=1e-4,
            atol=1e-5,
        )


@pytest.mark.ray
def test_killing_a_shard_mid_sweep_gives_the_uninterrupted_result(reference, setup, tmp_path):
    ref_store, _ = reference
    killed = []

    def kill_first_shard(event):
        if event["finished"] == 1 and not killed:
            import ray

            ray.kill(event["actors"][0], no_restart=False)
            killed.append(event["finished"])

    store = RunStore(str(tmp_path / "killed"))
    res = sweep(store, setup, on_batch=kill_first_shard)
    assert killed
    assert sorted(res.done) == sorted(setup["good"])
    # the restart is in the sweep's info and the manifest (same node, a new process)
    restarts = store.manifest()["sweep"]["restarts"]
    assert [(r["shard"], r["from_node"]) for r in restarts] == [
        (0, r["to_node"]) for r in restarts
    ] and restarts
    assert res.info["restarts"] == [{k: v for k, v in r.items() if k != "split"} for r in restarts]
    for name in setup["good"]:
        assert read_model(store, name) == read_model(ref_store, name), name


@pytest.mark.ray
def test_resume_redoes_only_unfinished_models(reference, setup, tmp_path):
    from audit.pipeline.sweep import record_model

    ref_store, _ = reference
    good = [s for s in setup["specs"] if s.name in setup["good"]]
    run = str(tmp_path / "resumed")
    shutil.copytree(ref_store.root, run)
    store = RunStore(run)
    # a run killed before "res-a" was written: no outputs, manifest says running
    store.delete("predictions/model=res-a")
    store.delete("features/model=res-a")
    record_model(
        store, "res-a", {**store.manifest()["sweep"]["models"]["res-a"], "status": "running"}
    )
    before = {m: os.path.getmtime(store.path(prediction_path(m))) for m in ("res-b", "vit-a")}
    res = sweep(store, setup, specs=good)
    assert res.done == ["res-a"] and sorted(res.skipped) == ["res-b", "vit-a"]
    assert {m: os.path.getmtime(store.path(prediction_path(m))) for m in before} == before
    assert read_model(store, "res-a") == read_model(ref_store, "res-a")
    again = sweep(store, setup, specs=good)  # a finished run: nothing to do
    assert again.done == [] and sorted(again.skipped) == sorted(setup["good"])
    # a changed weights file changes the content hash: that model is redone
    w2 = random_weights([good[0]], os.path.join(setup["tmp"], "w2"), seed=7)
    changed = sweep(store, {**setup, "weights": {**setup["weights"], **w2}}, specs=good)
    assert changed.done == [good[0].name]


@pytest.mark.ray
def test_pair_counts_as_ray_tasks_match_the_dense_product(ray_session):
    """The failure statistics' blocks as Ray tasks (RayExecutor), the packed matrix shared once."""
    from audit.failures import FailureMatrix
    from audit.stats_blocks import pair_counts
    from cluster.executor import RayExecutor

    rng = np.random.default_rng(0)
    f = rng.random((9, 3000)) < 0.3
    fm = FailureMatrix.from_dense(f, [f"m{i}" for i in range(9)])
    n_fail, n_both = pair_counts(fm.packed, fm.n_examples, block=512, executor=RayExecutor())
    np.testing.assert_array_equal(n_both, f.astype(np.int64) @ f.T.astype(np.int64))
    np.testing.assert_array_equal(n_fail, f.sum(1))


# -- end to end: ray start --head, ray job submit ------------------------------------------
def _free_ports(k: int) -> list[int]:
    socks, ports = [], []
    for _ in range(k):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_runs_zoo_audit_against_a_head_node(tmp_path):
    from audit.zoo.train import checkpoint_path, data_hash

    bindir = os.path.dirname(sys.executable)
    ray_bin, zoo_audit = os.path.join(bindir, "ray"), os.path.join(bindir, "zoo-audit")
    # data, zoo and untrained checkpoints in the cache layout `zoo-audit zoo train` uses
    data = image_table()
    data.with_metadata().to_parquet(str(tmp_path / "data.parquet"))
    zoo = tiny_zoo(str(tmp_path))
    cache = str(tmp_path / "ckpt")
    w = random_weights(list(zoo), str(tmp_path / "w"))
    dhash = data_hash(data.split("train"))
    for spec in zoo:
        shutil.copy(w[spec.name], checkpoint_path(spec, dhash, cache))
    job = tmp_path / "job"
    job.mkdir()
    (job / "audit.toml").write_text(f"""
[data]
path = "{tmp_path / "data.parquet"}"
split = "debug"
[zoo]
manifest = "{zoo.path}"
train = false
cache = "{cache}"
[ray]
num_cpu_workers = 2
batch_size = 16
[stats]
n_boot = 200
[directions]
enabled = false
""")
    out = str(tmp_path / "run")

    temp_dir = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths must fit
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "HOME": str(tmp_path),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    subprocess.run(
        [ray_bin, "get-auth-token", "--generate"],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / ".ray" / "auth_token")
    assert os.path.exists(env["RAY_AUTH_TOKEN_PATH"])
    p = _free_ports(9)
    head = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            "--num-cpus=2",
            "--num-gpus=0",
            f"--temp-dir={temp_dir}",
            f"--port={p[0]}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={p[1]}",
            f"--ray-client-server-port={p[2]}",
            f"--node-manager-port={p[3]}",
            f"--object-manager-port={p[4]}",
            f"--dashboard-agent-listen-port={p[5]}",
            f"--metrics-export-port={p[6]}",
            f"--runtime-env-agent-port={p[7]}",
            f"--dashboard-agent-grpc-port={p[8]}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--disable-usage-stats",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        address = f"http://127.0.0.1:{p[1]}"
        submit = [
            ray_bin,
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(job),
            "--",
            zoo_audit,
            "run",
            "audit.toml",
            "--out",
            out,
        ]
        deadline = time.time() + 120
        while True:  # the job server comes up a little after `ray start` prints
            r = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
            if (
                r.returncode == 0
                or time.time() > deadline
                or "Connection" not in (r.stdout + r.stderr)
            ):
                break
            time.sleep(2)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "succeeded" in r.stdout
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)
        time.sleep(1)
        try:
            os.killpg(head.pid, signal.SIGKILL)  # any straggler of the cluster we started
        except ProcessLookupError:
            pass
        shutil.rmtree(temp_dir, ignore_errors=True)

    store = RunStore(out)
    m = store.manifest()
    assert m["stages"]["sweep"]["status"] == "done" and m["stages"]["stats"]["status"] == "done"
    overlap = store.read_table("overlap.parquet")
    assert overlap.num_rows == 3 * 2
    for col in (
        "model_a",
        "model_b",
        "jaccard",
        "p_b_fails_given_a",
        "shared_fraction",
        "error_consistency",
        "ci_low",
        "ci_high",
    ):
        assert col in overlap.column_names
    clusters = store.read_table("clusters.parquet").to_pydict()
    assert sorted(clusters["model"]) == sorted(zoo.names) and set(clusters["family"]) == {
        "resnet",
        "vit",
    }
    assert store.read_table(prediction_path("res-a")).num_rows == 40
    # a rerun of the finished run does nothing (and needs no Ray)
    from cluster.runner import run_audit

    mtime = os.path.getmtime(store.path("overlap.parquet"))
    _, outcome = run_audit(str(job / "audit.toml"), out)
    assert outcome.ran == [] and "sweep" in outcome.skipped
    assert os.path.getmtime(store.path("overlap.parquet")) == mtime
