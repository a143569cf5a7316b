"""Retrieval, the generator for data that is neither a world nor has diffusion weights, on a
test bed with a planted answer.

Images are solid colours, each tilted a little towards the next channel by its own amount
(so every image is unique and every image has a distance to its colour); the embedder maps
an image to its mean colour and a caption to the colour words in it. Within each split the
ankle boots are nearer to every colour than the bags, and the train and test splits are
nearer than the pool: an answer from the wrong class or the wrong split shows at once.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from audit.data.table import ImageTable
from audit.embed.base import Embedder
from audit.store import RunStore

CLASSES = ["bag", "ankle boot"]
COLOURS = ["red", "green", "blue"]
ORDER = ("train", "test", "debug", "pool")  # tilt grows in this order: the pool is farthest
PER = 6  # images per (split, class, colour)


class ColourEmbedder(Embedder):
    """Image -> its mean colour; caption -> its colour words (a planted joint space)."""

    def __init__(self):
        self.name, self.dim, self.key = "planted:colour", 3, "colour-v1"

    def _encode_images(self, images):
        return images.reshape(len(images), -1, 3).mean(1)

    def _encode_text(self, texts):
        return np.asarray([[c in t.split() for c in COLOURS] for t in texts], np.float32) + 1e-6


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _bed(splits=ORDER) -> tuple[ImageTable, dict]:
    """The test bed and ``{colour of an image's first pixel: example_id}``."""
    rows, ids, tilt = [], {}, 0
    for split in splits:
        for label in (1, 0):  # ankle boots first: nearer to every colour than the bags
            for ch, colour in enumerate(COLOURS):
                for j in range(PER):
                    tilt += 1
                    img = np.zeros((8, 8, 3), np.uint8)
                    img[..., ch], img[..., (ch + 1) % 3] = 250, 10 + tilt
                    eid = f"{split}/{CLASSES[label]}/{colour}/{j}"
                    ids[tuple(img[0, 0])] = eid
                    rows.append(
                        {"example_id": eid, "split": split, "label": label, "image": _png(img)}
                    )
    table = pa.Table.from_pylist(rows).cast(
        pa.schema(
            [
                ("example_id", pa.string()),
                ("split", pa.string()),
                ("label", pa.int32()),
                ("image", pa.binary()),
            ]
        )
    )
    return ImageTable(table, CLASSES), ids


def _config(eval_split: str = "test"):
    from audit.pipeline.config import AuditConfig

    return AuditConfig(data={"path": "unused", "eval_split": eval_split})


def _retrieved(store: RunStore, set_id: str, ids: dict) -> list[str]:
    t = store.read_table(f"synthetic/{set_id}")
    return [ids[tuple(np.asarray(Image.open(io.BytesIO(b)))[0, 0])] for b in t["png"].to_pylist()]


WANTED = {"model-a": ["a photo of a red bag", "a photo of a blue ankle boot"]}
IDS = {"model-a": "model-a-hard-0001"}


def test_retrieval_takes_the_caption_s_class_from_the_pool_in_the_set_format(tmp_path):
    from audit.synthetic import RetrievalSetGenerator, read_set_meta
    from audit.synthetic.sets import SCHEMA, image_seed

    data, ids = _bed()
    store = RunStore(tmp_path / "run")
    gen = RetrievalSetGenerator(store, _config(), data=data, embedder=ColourEmbedder(), top_n=4)
    table = gen.request_sets(WANTED, IDS, 3, 7)
    assert table.to_pylist() == [
        {
            "scope": "model-a",
            "set_id": IDS["model-a"],
            "captions": WANTED["model-a"],
            "n_images": 6,
            "generator": "retrieval",
            "slot_precision": None,  # no attribute column: no slot to check
        }
    ]
    got = _retrieved(store, IDS["model-a"], ids)
    # the caption's class and colour, from the pool, among its top_n = 4 nearest, all distinct
    assert {g.rsplit("/", 1)[0] for g in got[:3]} == {"pool/bag/red"}
    assert {g.rsplit("/", 1)[0] for g in got[3:]} == {"pool/ankle boot/blue"}
    assert len(set(got)) == 6 and all(int(g.rsplit("/", 1)[1]) < 4 for g in got)
    # the set format every generator writes
    t = store.read_table(f"synthetic/{IDS['model-a']}")
    assert t.schema.names == SCHEMA.names and set(t["generator"].to_pylist()) == {"retrieval"}
    assert t["seed"].to_pylist()[:3] == [image_seed(7, i) for i in range(3)]
    meta = read_set_meta(store, IDS["model-a"])
    assert meta["generator"] == "retrieval" and meta["request"]["size"] == [8, 8]
    assert meta["counts"] == [{"prompt": c, "n": 3} for c in WANTED["model-a"]]

    # deterministic: another generator, another run directory, the same images
    other = RunStore(tmp_path / "other")
    RetrievalSetGenerator(
        other, _config(), data=data, embedder=ColourEmbedder(), top_n=4
    ).request_sets(WANTED, IDS, 3, 7)
    assert _retrieved(other, IDS["model-a"], ids) == got
    # a repeat finds the stored set (nothing written); another request under its id is refused
    stamp = store.mtime_size(f"synthetic/{IDS['model-a']}/part-00000.parquet")
    assert gen.request_sets(WANTED, IDS, 3, 7).equals(table)
    assert store.mtime_size(f"synthetic/{IDS['model-a']}/part-00000.parquet") == stamp
    with pytest.raises(ValueError, match="already holds a different request"):
        gen.request_sets(WANTED, IDS, 3, 8)


def test_retrieval_never_draws_from_the_evaluation_split(tmp_path):
    from audit.synthetic import RetrievalSetGenerator

    data, ids = _bed(("train", "test", "debug"))  # no pool: the train split, never test
    store = RunStore(tmp_path / "run")
    RetrievalSetGenerator(store, _config(), data=data, embedder=ColourEmbedder()).request_sets(
        WANTED, IDS, 5, 0
    )
    got = _retrieved(store, IDS["model-a"], ids)
    assert {g.split("/")[0] for g in got} == {"train"}
    for pool_split, eval_split in (("test", "test"), (None, "train")):
        data, _ = _bed(("train", "test"))
        gen = RetrievalSetGenerator(
            RunStore(tmp_path / f"r-{eval_split}"),
            _config(eval_split),
            data=data,
            embedder=ColourEmbedder(),
            pool_split=pool_split,
        )
        with pytest.raises(ValueError, match=f"other than the evaluation split '{eval_split}'"):
            gen.request_sets(WANTED, IDS, 1, 0)


class BlindText(ColourEmbedder):
    """The same images; captions all embed alike, so the nearest images ignore the colour."""

    def _encode_text(self, texts):
        return np.ones((len(texts), 3), np.float32)


def _with_colour(table: ImageTable, pool_has_it: bool) -> ImageTable:
    eids = table.example_ids.astype(str)
    colour = [e.split("/")[2] for e in eids]
    if not pool_has_it:
        colour = [None if e.startswith("pool/") else c for e, c in zip(eids, colour, strict=True)]
    t = table.table.append_column("colour", pa.array(colour, pa.string()))
    return ImageTable(t, table.classes)


@pytest.mark.parametrize(
    ("pool_has_it", "name", "source"),
    [
        (True, "retrieval+attributes", "pool attributes"),
        (False, "retrieval", "estimated by attribute probes"),
    ],
)
def test_retrieval_reranks_by_the_captions_slots(tmp_path, pool_has_it, name, source):
    """The caption's nearest images ignore its colour here; reranking by the colour slot
    (the pool's own column, or probes trained on the train split) finds the right ones."""
    import json

    from audit.synthetic import RetrievalSetGenerator

    data, ids = _bed()
    data = _with_colour(data, pool_has_it)
    store = RunStore(tmp_path / "run")
    gen = RetrievalSetGenerator(store, _config(), data=data, embedder=BlindText(), top_n=6)
    row = gen.request_sets(WANTED, IDS, 4, 0).to_pylist()[0]
    got = _retrieved(store, IDS["model-a"], ids)
    assert [e.split("/")[:3] for e in got] == [["pool", "bag", "red"]] * 4 + [
        ["pool", "ankle boot", "blue"]
    ] * 4
    precision = json.loads(row["slot_precision"])
    assert row["generator"] == name and precision["source"] == source
    # measured with the pool's column; the probes' mean probability otherwise (they agree)
    assert precision["colour"] == 1.0 if pool_has_it else 0.5 < precision["colour"] < 1.0


def test_without_slots_the_nearest_images_are_all_there_is(tmp_path):
    """The control of the test above: no attribute column, the nearest images ignore the colour."""
    from audit.synthetic import RetrievalSetGenerator

    data, ids = _bed()
    store = RunStore(tmp_path / "run")
    RetrievalSetGenerator(store, _config(), data=data, embedder=BlindText(), top_n=6).request_sets(
        WANTED, IDS, 4, 0
    )
    colours = {e.split("/")[2] for e in _retrieved(store, IDS["model-a"], ids)[:4]}
    assert colours != {"red"}
