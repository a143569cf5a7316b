"""Readers, the image table and bad-input handling."""

from __future__ import annotations

import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from audit.data.readers import (
    DatasetMissing,
    fashion_mnist_dir,
    read_dataset,
    read_fashion_mnist,
    read_imagefolder,
    read_parquet,
    read_world,
)
from audit.data.table import ImageTable
from audit.store import RunStore


def _png(color, size=8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def test_parquet_manifest_string_labels_roundtrip(tmp_path):
    t = pa.table({
        "example_id": ["a", "b", "c"], "split": ["debug", "debug", "test"],
        "label": ["cat", "dog", "cat"], "image": [_png("red"), _png("blue"), _png("green")],
        "site": ["x", "y", "x"],
    })  # fmt: skip
    pq.write_table(t, tmp_path / "m.parquet")
    tab = read_parquet(str(tmp_path / "m.parquet"))
    assert tab.classes == ["cat", "dog"]
    assert tab.labels.tolist() == [0, 1, 0]
    assert tab.attributes == ["site"]
    imgs, ok, errors = tab.split("debug").decode()
    assert imgs.shape == (2, 8, 8, 3) and ok.tolist() == [0, 1] and errors == []
    assert tuple(imgs[0, 0, 0]) == (255, 0, 0)
    # self-describing round trip keeps the class order
    tab.to_parquet(str(tmp_path / "out.parquet"))
    back = ImageTable.from_parquet(str(tmp_path / "out.parquet"))
    assert back.classes == ["cat", "dog"] and len(back) == 3


def test_label_outside_class_list_names_row_and_classes(tmp_path):
    t = pa.table({"example_id": ["a", "b"], "split": ["debug", "debug"], "label": ["cat", "cow"], "image": [_png("red"), _png("red")]})
    pq.write_table(t, tmp_path / "m.parquet")
    with pytest.raises(ValueError, match=r"row 1 \(example_id='b'\).*'cow'.*\['cat', 'dog'\]"):
        read_parquet(str(tmp_path / "m.parquet"), classes=["cat", "dog"])


def test_integer_label_out_of_range_is_an_error():
    t = pa.table({"example_id": ["a"], "split": ["debug"], "label": pa.array([5], pa.int32()), "image": [_png("red")]})
    with pytest.raises(ValueError, match="label 5, outside the 2 known classes"):
        ImageTable(t, ["cat", "dog"])


def test_unknown_split_is_an_error():
    t = pa.table({"example_id": ["a"], "split": ["validation"], "label": pa.array([0], pa.int32()), "image": [_png("red")]})
    with pytest.raises(ValueError, match="unknown split"):
        ImageTable(t, ["cat"])


def test_imagefolder_with_split_dirs_and_corrupt_file(tmp_path):
    for split in ("train", "debug"):
        for c, color in (("ant", "red"), ("bee", "blue")):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (10, 12), color).save(d / f"{i}.png")
    (tmp_path / "debug" / "bee" / "broken.png").write_bytes(b"not a png at all")
    tab = read_imagefolder(str(tmp_path))
    assert tab.classes == ["ant", "bee"]
    assert len(tab.split("train")) == 4 and len(tab.split("debug")) == 5
    imgs, ok, errors = tab.split("debug").decode()
    # the corrupt file costs that row only, and is reported with its path and reason
    assert imgs.shape == (4, 12, 10, 3)
    assert len(errors) == 1 and "broken.png" in errors[0].item and "cannot decode" in errors[0].reason
    store = RunStore(tmp_path / "run")
    store.record_errors(e.as_row() for e in errors)
    err = store.errors().to_pylist()
    assert err[0]["stage"] == "decode" and "broken.png" in err[0]["item"]


def test_imagefolder_without_split_dirs_uses_given_split(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / c / "x.jpg")
    tab = read_imagefolder(str(tmp_path), split="pool")
    assert set(tab.column("split")) == {"pool"} and len(tab) == 2


def test_fashion_mnist_reader(fake_fmnist):
    tab = read_fashion_mnist(fake_fmnist)
    assert len(tab.split("train")) == 400 and len(tab.split("debug")) == 200
    assert tab.classes[0] == "t-shirt" and len(tab.classes) == 10
    imgs, ok, errors = tab.split("debug").take(range(5)).decode()
    assert imgs.shape == (5, 28, 28, 3) and not errors
    assert read_dataset(fake_fmnist).classes == tab.classes


def test_missing_fashion_mnist_says_three_ways(tmp_path, monkeypatch):
    import audit.data.readers as r

    monkeypatch.setenv("ZOO_AUDIT_FASHION_MNIST", str(tmp_path / "nowhere"))
    monkeypatch.setattr(r, "FASHION_MNIST_DIRS", (str(tmp_path / "nothing"),))
    with pytest.raises(DatasetMissing) as e:
        fashion_mnist_dir()
    msg = str(e.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg and "download" in msg and "ZOO_AUDIT_FASHION_MNIST" in msg


def test_world_reader_and_dispatch(tiny_world):
    tab = read_world(tiny_world)
    assert {"item", "color", "background", "group", "caption"} <= set(tab.columns)
    assert read_dataset(tiny_world).classes == tab.classes
    with pytest.raises(FileNotFoundError, match="zoo-audit world build"):
        read_world(os.path.dirname(tiny_world))


def test_store_atomic_writes_and_manifest(tmp_path):
    store = RunStore(tmp_path / "run")
    store.write_table("predictions/model=a/part-0.parquet", pa.table({"x": [1, 2]}))
    store.write_table("predictions/model=a/part-1.parquet", pa.table({"x": [3]}))
    assert store.read_table("predictions/model=a")["x"].to_pylist() == [1, 2, 3]
    assert not [f for f in os.listdir(tmp_path / "run" / "predictions" / "model=a") if f.startswith(".tmp")]
    store.set_stage("predict", "done", key="abc")
    store.update_manifest(config={"a": 1})
    store.update_manifest(config={"b": 2})
    m = store.manifest()
    assert m["config"] == {"a": 1, "b": 2} and store.stage_done("predict", key="abc") and not store.stage_done("predict", key="x")
    with pytest.raises(ValueError, match="escapes"):
        store.path("../outside")
    with pytest.raises(FileNotFoundError, match="not found in run directory"):
        store.read_table("nothing.parquet")
