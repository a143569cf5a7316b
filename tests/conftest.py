"""Shared fixtures: a fake Fashion-MNIST, a tiny world, a tiny zoo (all built in seconds)."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest

TINY_SPEC = """
seed = 3
image_size = 16
items = ["t-shirt", "trouser", "sandal"]
colors = ["red", "green", "blue"]
backgrounds = ["brick", "grass", "gravel"]

[splits]
train = 600
debug = 90
test = 90
pool = 60

[[planted]]
class = "t-shirt"
attribute = "color"
value = "blue"
rate = 0.05

[[planted]]
class = "sandal"
attribute = "background"
value = "grass"
rate = 0.9
"""

TINY_ZOO = """
name = "tiny"
[defaults]
builder = "timm"
weights = "train"
input = { input_size = 16, mean = [0.5, 0.5, 0.5], std = [0.25, 0.25, 0.25] }
train = { epochs = 1, batch_size = 64, lr = 0.003 }

[[models]]
name = "tiny-resnet"
family = "resnet"
arch = "resnet18"
kwargs = { layers = [1, 1, 1, 1], channels = [4, 8, 8, 8], stem_width = 4 }

[[models]]
name = "tiny-vit"
family = "vit"
arch = "vit_tiny_patch16_224"
kwargs = { img_size = 16, patch_size = 4, embed_dim = 16, depth = 1, num_heads = 2 }
"""


def _write_idx(path: str, arr: np.ndarray) -> None:
    dtype_code = 0x08
    header = struct.pack(">I", (dtype_code << 8) | arr.ndim) + struct.pack(
        f">{arr.ndim}I", *arr.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def make_fake_fmnist(directory: str, n_train: int = 400, n_test: int = 200, seed: int = 0) -> str:
    """Fashion-MNIST-shaped IDX files: class c is a bright bar at a class-specific angle."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    yy, xx = np.mgrid[0:28, 0:28] - 13.5
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        imgs = np.zeros((n, 28, 28), np.uint8)
        for i, c in enumerate(labels):
            ang = np.pi * c / 10
            d = np.abs(np.cos(ang) * yy - np.sin(ang) * xx)
            imgs[i] = (
                np.clip((4 - d) * 70 + rng.normal(0, 10, (28, 28)), 0, 255)
                * (np.abs(yy) < 12)
                * (np.abs(xx) < 12)
            )
        _write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), imgs)
        _write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), labels)
    return directory


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Caches (trained models, worlds, embedders) go to a per-session temp dir."""
    old = os.environ.get("ZOO_AUDIT_CACHE")
    os.environ["ZOO_AUDIT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield
    if old is None:
        os.environ.pop("ZOO_AUDIT_CACHE", None)
    else:
        os.environ["ZOO_AUDIT_CACHE"] = old


@pytest.fixture(scope="session")
def fake_fmnist(tmp_path_factory) -> str:
    return make_fake_fmnist(str(tmp_path_factory.mktemp("fmnist")))


@pytest.fixture(scope="session")
def tiny_spec_path(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("spec") / "tiny.toml"
    p.write_text(TINY_SPEC)
    return str(p)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory, tiny_spec_path, fake_fmnist) -> str:
    from audit.data.world import build_world

    out = str(tmp_path_factory.mktemp("world"))
    build_world(tiny_spec_path, out, fmnist_dir=fake_fmnist)
    return out


@pytest.fixture(scope="session")
def testbed(tmp_path_factory, fake_fmnist) -> tuple[str, str]:
    """``(world directory, zoo path)`` of the test bed that plants a real failure
    (:mod:`testbed`): blue t-shirts, taken for trousers."""
    from testbed import testbed_files

    from audit.data.world import build_world

    root = tmp_path_factory.mktemp("testbed")
    spec, zoo = testbed_files(root)
    build_world(spec, str(root / "world"), fmnist_dir=fake_fmnist)
    return str(root / "world"), zoo


@pytest.fixture(scope="session")
def tiny_zoo_path(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("zoo") / "tiny.toml"
    p.write_text(TINY_ZOO)
    return str(p)


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray (2 CPUs) for the whole test session; every Ray test shares it."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mitigated(tmp_path_factory, testbed):
    """The test bed (a planted failure the tiny models really learn) through every stage on
    threads, with the world renderer as its generator (an oracle: the data's own generator).
    Shared by the mitigation and the transfer tests (which add only their own files)."""
    from test_runner import RecordingGenerator, threads
    from testbed import testbed_config

    from audit.pipeline.config import load_config
    from audit.pipeline.inputs import load_inputs
    from audit.store import RunStore
    from cluster.runner import run_audit

    world, zoo = testbed
    root = tmp_path_factory.mktemp("mitigate")
    config = testbed_config(root / "audit.toml", world, zoo)
    store = RunStore(str(root / "run"))
    services = threads(RecordingGenerator(world_dir=world, store=store))
    store, out = run_audit(config, store.uri, services=services, console=lambda s: None)
    assert out.failed is None, out.failed
    return store, load_inputs(load_config(config), services)
