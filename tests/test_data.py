"""Readers, the image table and bad-input handling."""

from __future__ import annotations

import io
import os

import numpy as np
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
    t = pa.table(
        {
            "example_id": ["a", "b", "c"],
            "split": ["debug", "debug", "test"],
            "label": ["cat", "dog", "cat"],
            "image": [_png("red"), _png("blue"), _png("green")],
            "site": ["x", "y", "x"],
        }
    )
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
    t = pa.table(
        {
            "example_id": ["a", "b"],
            "split": ["debug", "debug"],
            "label": ["cat", "cow"],
            "image": [_png("red"), _png("red")],
        }
    )
    pq.write_table(t, tmp_path / "m.parquet")
    with pytest.raises(ValueError, match=r"row 1 \(example_id='b'\).*'cow'.*\['cat', 'dog'\]"):
        read_parquet(str(tmp_path / "m.parquet"), classes=["cat", "dog"])


def test_integer_label_out_of_range_is_an_error():
    t = pa.table(
        {
            "example_id": ["a"],
            "split": ["debug"],
            "label": pa.array([5], pa.int32()),
            "image": [_png("red")],
        }
    )
    with pytest.raises(ValueError, match="label 5, outside the 2 known classes"):
        ImageTable(t, ["cat", "dog"])


def test_unknown_split_is_an_error():
    t = pa.table(
        {
            "example_id": ["a"],
            "split": ["validation"],
            "label": pa.array([0], pa.int32()),
            "image": [_png("red")],
        }
    )
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
    assert (
        len(errors) == 1 and "broken.png" in errors[0].item and "cannot decode" in errors[0].reason
    )
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
    assert (
        "apt-get install -y dataset-fashion-mnist" in msg
        and "download" in msg
        and "ZOO_AUDIT_FASHION_MNIST" in msg
    )


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
    assert not [
        f for f in os.listdir(tmp_path / "run" / "predictions" / "model=a") if f.startswith(".tmp")
    ]
    store.set_stage("predict", "done", key="abc")
    store.update_manifest(config={"a": 1})
    store.update_manifest(config={"b": 2})
    m = store.manifest()
    assert m["config"] == {"a": 1, "b": 2}
    assert m["stages"]["predict"]["status"] == "done" and m["stages"]["predict"]["key"] == "abc"
    with pytest.raises(ValueError, match="escapes"):
        store.path("../outside")
    with pytest.raises(FileNotFoundError, match="not found in run directory"):
        store.read_table("nothing.parquet")


# -- hostile and careless input (issue 11) --------------------------------------------------
def _png_array(arr, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, **kw).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims ``width x height`` RGB pixels, in a few hundred bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(
        b"\0" * (1 + 3 * width) * 4, 9
    )  # a few rows of zeros; the rest never comes
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _table(blobs: list[bytes], ids=None) -> ImageTable:
    ids = ids or [f"e{i}" for i in range(len(blobs))]
    t = pa.table(
        {
            "example_id": ids,
            "split": ["debug"] * len(blobs),
            "label": pa.array([0] * len(blobs), pa.int32()),
            "image": pa.array(blobs, pa.binary()),
        }
    )
    return ImageTable(t, ["x"])


def test_decode_memory_follows_the_common_size_not_the_first_image():
    """Issue 11 #4: one 2000x2000 image first made every image of the split 2000x2000."""
    big = _png_array(np.zeros((2000, 2000, 3), np.uint8))
    imgs, ok, errors = _table([big] + [_png("red", 8)] * 20).decode()
    assert imgs.shape == (21, 8, 8, 3) and not errors and imgs.nbytes < 10_000
    assert tuple(imgs[1, 0, 0]) == (255, 0, 0)
    imgs, _, _ = _table([big, _png("red", 8)]).decode(size=4)  # an explicit target wins
    assert imgs.shape == (2, 4, 4, 3)


def test_decompression_bomb_is_an_error_row_without_decoding():
    imgs, ok, errors = _table([_bomb_png(), _png("red")]).decode()
    assert ok.tolist() == [1] and len(errors) == 1 and errors[0].item == "e0"
    assert "pixels" in errors[0].reason and "limit" in errors[0].reason
    # our own limit, below Pillow's: a real 3000x3000 image over max_pixels=1e6
    big = _png_array(np.zeros((3000, 3000, 3), np.uint8))
    _, ok, errors = _table([big, _png("red")]).decode(max_pixels=1_000_000)
    assert (
        ok.tolist() == [1] and "9,000,000 pixels, over the limit of 1,000,000" in errors[0].reason
    )


def test_16bit_png_is_scaled_not_clipped():
    """Issue 11 #9: 16-bit PNGs were clipped (most pixels became 255)."""
    ramp = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1024).astype(np.uint16)  # 0 .. 64512
    imgs, ok, errors = _table([_png_array(ramp)]).decode()
    assert not errors
    got = imgs[0, :, :, 0].astype(int)
    want = np.round(ramp / 65535 * 255).astype(int)
    assert np.abs(got - want).max() <= 1 and (got == 255).mean() < 0.05


def test_fifo_and_non_regular_paths_are_error_rows_not_hangs(tmp_path):
    """Issue 11 #9: a FIFO in the data made decoding block forever."""
    import threading

    os.mkfifo(tmp_path / "pipe.png")
    Image.new("RGB", (4, 4), "red").save(tmp_path / "ok.png")
    t = pa.table(
        {
            "example_id": ["a", "b"],
            "split": ["debug"] * 2,
            "label": pa.array([0, 0], pa.int32()),
            "path": ["pipe.png", "ok.png"],
        }
    )
    out: list = []
    th = threading.Thread(
        target=lambda: out.append(ImageTable(t, ["x"], root=str(tmp_path)).decode()), daemon=True
    )
    th.start()
    th.join(20)
    if th.is_alive():  # unblock the reader so the test process can end
        with open(tmp_path / "pipe.png", "wb"):
            pass
        pytest.fail("decoding blocked on a FIFO")
    _, ok, errors = out[0]
    assert (
        ok.tolist() == [1]
        and "not a regular file" in errors[0].reason
        and "pipe.png" in errors[0].item
    )


def test_imagefolder_strays_are_rows_or_a_logged_count(tmp_path, caplog):
    """Issue 11 #9: unknown extensions, nested folders and stray files were skipped silently."""
    for c in ("ant", "bee"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / c / "x.png")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")  # a row, then an error row
    (tmp_path / "bee" / "photo.heic").write_bytes(_png("red", 4))  # a PNG by content: decodes
    (tmp_path / "ant" / "nested").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "ant" / "nested" / "y.png")
    (tmp_path / "README").write_text("stray")
    (tmp_path / "bee" / ".DS_Store").write_bytes(b"\0")
    os.mkfifo(tmp_path / "bee" / "fifo.png")
    with caplog.at_level("WARNING", logger="audit.data.readers"):
        tab = read_imagefolder(str(tmp_path))
    assert sorted(tab.example_ids.tolist()) == [
        "ant/notes.txt",
        "ant/x.png",
        "bee/photo.heic",
        "bee/x.png",
    ]
    msg = " ".join(r.getMessage() for r in caplog.records)
    for what in (
        "1 nested folder(s) (e.g. ant/nested)",
        "1 stray file outside a class folder(s) (e.g. README)",
        "1 hidden file(s)",
        "1 not a regular file(s) (e.g. bee/fifo.png)",
        "2 file(s) without an image extension",
    ):
        assert what in msg, (what, msg)
    _, ok, errors = tab.decode()
    assert len(ok) == 3 and [e.item.split(" ")[0] for e in errors] == ["ant/notes.txt"]


def test_duplicate_and_null_example_ids_name_the_row():
    """Issue 11 #10: the messages did not say which row."""
    t = pa.table(
        {
            "example_id": ["a", "b", "a"],
            "split": ["debug"] * 3,
            "label": pa.array([0] * 3, pa.int32()),
            "image": [_png("red")] * 3,
        }
    )
    with pytest.raises(ValueError, match=r"row 2 repeats example_id 'a' of row 0"):
        ImageTable(t, ["x"])
    t = t.set_column(0, "example_id", pa.array(["a", None, "c"]))
    with pytest.raises(ValueError, match=r"row 1 has a null example_id"):
        ImageTable(t, ["x"])


class _FailingFS:
    """A local filesystem whose output streams die after the first bytes (a disk that fills up)."""

    def __init__(self, fs):
        self._fs = fs

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def open_output_stream(self, path):
        stream = self._fs.open_output_stream(path)

        class Dying:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                stream.close()

            def write(self, data):
                stream.write(data[:10])
                raise OSError(28, "No space left on device")

        return Dying()


def test_store_write_failure_leaves_no_temporary(tmp_path):
    """Issue 11 #5: a failed write left its .tmp, which kept the disk full."""
    store = RunStore(tmp_path / "run")
    store.fs = _FailingFS(store.fs)
    for write in (
        lambda: store.write_bytes("synthetic/s/part-00000.parquet", b"x" * 100),
        lambda: store.create_exclusive("synthetic/s/.claim.json", b"x" * 100),
    ):
        with pytest.raises(OSError, match="No space left"):
            write()
    left = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "run") for f in fs]
    assert left == []


def test_create_exclusive_has_one_winner_across_threads(tmp_path):
    """Issue 11 #3: the set-id claim is atomic in the store: of many concurrent writers one wins."""
    import concurrent.futures as cf

    store = RunStore(tmp_path / "run")
    with cf.ThreadPoolExecutor(8) as ex:
        won = list(
            ex.map(
                lambda i: store.create_exclusive("synthetic/x/.claim.json", str(i).encode()),
                range(32),
            )
        )
    assert won.count(True) == 1
    assert store.read_bytes("synthetic/x/.claim.json") == str(won.index(True)).encode()
    assert store.listdir("synthetic/x") == [".claim.json"]  # no temporaries left
