"""Any labelled image dataset (issue 9): class names and caption attributes from the data,
captions composed for the world encoder, unknown words refused, retrieval as the generator,
and a second planted world handed over as a plain Parquet manifest."""

from __future__ import annotations

import io
import json
import logging
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from audit.data.attributes import (
    attribute_slots,
    compose_caption,
    default_template,
    detect_attributes,
    name_classes,
    with_captions,
)
from audit.data.readers import read_parquet, table_from_labels
from audit.data.table import ImageTable


def _png(value: int = 0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _table(n: int = 40, **extra) -> ImageTable:
    labels = np.arange(n) % 4
    cols = {
        "example_id": [f"e{i}" for i in range(n)],
        "split": ["train"] * n,
        "label": pa.array(labels, pa.int32()),
        "image": pa.array([_png(i) for i in range(n)], pa.binary()),
    }
    cols.update(extra)
    return table_from_labels(pa.table(cols))


NAMES = ["coat", "bag", "shirt", "ankle boot"]


def test_class_names_from_the_column_given_detected_or_listed(caplog):
    n = 40
    item = [NAMES[i % 4] for i in range(n)]
    t = _table(n, item=item, color=["red", "blue"] * (n // 2))
    assert t.classes == ["0", "1", "2", "3"]
    assert name_classes(t, "item").classes == NAMES
    with caplog.at_level(logging.INFO, logger="audit.data.attributes"):
        assert name_classes(t).classes == NAMES  # one-to-one with label: detected and logged
    assert "class names from column 'item'" in caplog.text
    plain = _table(n, color=["red", "blue"] * (n // 2))
    assert name_classes(plain, classes=["a", "b", "c", "d"]).classes == ["a", "b", "c", "d"]
    assert name_classes(plain).classes == ["0", "1", "2", "3"]  # nothing names them
    with pytest.raises(ValueError, match="does not name one class per label"):
        name_classes(t, "color")
    with pytest.raises(ValueError, match="not a column"):
        name_classes(t, "colour")
    with pytest.raises(ValueError, match="one name per label"):
        name_classes(plain, classes=["a", "b"])


def test_string_labels_and_imagefolder_names_stay(tmp_path):
    from PIL import Image

    for split in ("train", "debug"):
        for c in ("cat", "dog"):
            d = tmp_path / "folder" / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(d / f"{i}.png")
    from audit.data.readers import read_imagefolder

    t = name_classes(read_imagefolder(str(tmp_path / "folder")), classes=["x", "y"])
    assert t.classes == ["cat", "dog"]
    m = tmp_path / "m.parquet"
    pq.write_table(
        pa.table(
            {
                "example_id": ["a", "b"],
                "split": ["train", "train"],
                "label": ["dog", "cat"],
                "image": pa.array([_png(), _png()], pa.binary()),
            }
        ),
        m,
    )
    s = read_parquet(str(m))
    assert s.classes == ["cat", "dog"] and s.labels.tolist() == [1, 0]


def test_attributes_detected_with_templates():
    n = 40
    t = name_classes(
        _table(
            n,
            item=[NAMES[i % 4] for i in range(n)],
            color=[("red", "blue", "green")[i % 3] for i in range(n)],
            background=[("grass", "brick", "water", "moon", "coins")[i % 5] for i in range(n)],
            uid=[f"u{i}" for i in range(n)],
            note=[f"free text {i}" for i in range(n)],
            group=["x", ""] * 20,
            caption=["c"] * n,
            one=["same"] * n,
        ),
        "item",
    )
    assert detect_attributes(t, exclude=["item"]) == ["color", "background"]
    slots = attribute_slots(t, ["color", "background"])
    assert slots == {"color": "{value} {noun}", "background": "{noun} on {value}"}
    assert default_template("scene", ["water", "snow", "forest"]) == "{noun} in {value}"
    assert default_template("pattern", ["striped", "dotted"]) == "{value} {noun}"
    assert (
        compose_caption("ankle boot", {"color": "orange", "background": "grass"}, slots)
        == "a photo of an orange ankle boot on grass"
    )
    assert (
        compose_caption("coat", {"color": None, "background": "moon"}, slots)
        == "a photo of a coat on moon"
    )
    custom = attribute_slots(t, ["background"], {"background": "{noun} lying on {value}"})
    assert (
        compose_caption("bag", {"background": "brick"}, custom) == "a photo of a bag lying on brick"
    )
    with pytest.raises(ValueError, match="must contain"):
        attribute_slots(t, ["color"], {"color": "{value}"})
    with pytest.raises(ValueError, match="not caption attributes"):
        attribute_slots(t, ["color"], {"colour": "{value} {noun}"})
    caps = with_captions(t.split("train"), slots).column("caption")
    assert caps[0] == "a photo of a red coat on grass"


def test_data_grammar_first_then_generic_and_unknown_words_dropped():
    from audit.captions import candidate_captions, data_captions, drop_unknown_words
    from audit.embed.vocab import known_words

    slots = {"color": "{value} {noun}", "background": "{noun} on {value}"}
    values = {"color": ["orange", "pink"], "background": ["coins", "cells"]}
    own = data_captions("coat", values, slots)
    assert len(own) == 2 + 2 + 4 and "a photo of an orange coat on coins" in own
    cands = candidate_captions(["coat"], attributes=values, slots=slots)["coat"]
    assert [c for c, s in cands if s == "data"] == own and any(s == "grammar" for _, s in cands)
    vocab = known_words(
        [
            compose_caption("coat", {"color": c, "background": b}, slots)
            for c in values["color"]
            for b in values["background"]
        ],
        ["a picture of {}"],
    )
    kept, dropped = drop_unknown_words(
        {"coat": cands},
        lambda text: [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in vocab],
    )
    assert [c for c, _ in kept["coat"]] == own  # the generic words (red, grass, ...) are unknown
    assert dropped["red"] >= 1 and "orange" not in dropped and "coat" not in dropped


def test_c_grid_is_wide_and_edges_are_recorded():
    from audit.directions import DEFAULT_CS, FailureDirections, directions_table

    assert min(DEFAULT_CS) <= 1e-6 and max(DEFAULT_CS) >= 1e2 and len(DEFAULT_CS) >= 9
    ratios = np.asarray(DEFAULT_CS[1:]) / np.asarray(DEFAULT_CS[:-1])
    np.testing.assert_allclose(ratios, ratios[0])  # log-spaced
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 8))
    correct = X[:, 0] + 0.3 * rng.normal(size=200) > -0.5
    est = FailureDirections(n_permutations=0, max_modes=1, Cs=[1e-3, 1e-2]).fit(X, correct)
    t = directions_table({"m": est})
    assert "C_on_edge" in t.column_names
    assert t["C_on_edge"].to_pylist() == [True]  # a two-value grid has only edges
    wide = directions_table({"m": FailureDirections(n_permutations=0, max_modes=1).fit(X, correct)})
    assert wide["C_on_edge"].to_pylist() == [
        wide["C"][0].as_py() in (min(DEFAULT_CS), max(DEFAULT_CS))
    ]


def test_world_encoder_needs_captions_or_attributes():
    from audit.embed.world_encoder import encoder_table

    with pytest.raises(ValueError, match="open_clip"):
        encoder_table(_table(8))
    t = name_classes(
        _table(8, item=[NAMES[i % 4] for i in range(8)], color=["red", "blue"] * 4), "item"
    )
    assert encoder_table(t).column("caption")[1] == "a photo of a blue bag"


def test_retrieval_is_chosen_for_data_that_is_not_a_world(tmp_path):
    from cluster.generate import resolve_backend

    assert resolve_backend("world", None)[0] == "retrieval"
    assert resolve_backend("world", "/w")[0] == "world:/w"
    assert resolve_backend("diffusers:" + str(tmp_path / "no-weights"), None)[0] == "retrieval"
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model_index.json").write_text("{}")
    assert resolve_backend(f"diffusers:{weights}", None)[0] == f"diffusers:{weights}"


# -- a second planted world, handed over as a plain Parquet manifest -----------------------
SECOND_TINY = """
seed = 5
image_size = 16
items = ["t-shirt", "pullover", "sandal", "sneaker"]
colors = ["orange", "pink", "green"]
backgrounds = ["coins", "cells", "brick"]

[splits]
train = 800
debug = 800
test = 120
pool = 120

[[planted]]
class = "pullover"
attribute = "color"
value = "orange"
rate = 0.0

[[planted]]
class = "pullover"
attribute = "background"
value = "coins"
rate = 0.0

[[planted]]
class = "sneaker"
attribute = "color"
value = "pink"
rate = 0.0

[[planted]]
class = "sandal"
attribute = "background"
value = "coins"
rate = 0.9
"""

ZOO = """
name = "tiny2"
[defaults]
builder = "timm"
weights = "train"
input = { input_size = 16, mean = [0.5, 0.5, 0.5], std = [0.25, 0.25, 0.25] }
train = { epochs = 10, batch_size = 32, lr = 0.01 }

[[models]]
name = "tiny-resnet"
family = "resnet"
arch = "resnet18"
kwargs = { layers = [1, 1, 1, 1], channels = [8, 16, 16, 16], stem_width = 8 }

[[models]]
name = "tiny-resnet-b"
family = "resnet"
arch = "resnet18"
kwargs = { layers = [1, 1, 1, 1], channels = [8, 16, 16, 16], stem_width = 8 }
train = { seed = 1 }
"""


def planted_naming(
    store, truth: pa.Table, spec, split: str = "debug", min_gap: float = 0.15
) -> list[dict]:
    """One row per (model, class, planted mode) whose group fails >= ``min_gap`` below its class
    on ``split``: whether the top-1 hard caption of some mode of the model's class names the value."""
    caps = [
        r
        for r in store.read_table("captions.parquet").to_pylist()
        if r["polarity"] == "hard" and r["rank"] == 1
    ]
    gt = {r["example_id"]: r for r in truth.to_pylist()}
    out = []
    for model in store.manifest()["zoo"]["models"]:
        p = store.read_table(f"predictions/model={model}").to_pylist()
        p = [r for r in p if gt[r["example_id"]]["split"] == split]
        for m in (
            m for m in spec.planted if m.kind == "rare"
        ):  # associations are the cue, not the target
            in_c = [r for r in p if gt[r["example_id"]]["item"] == m.cls]
            grp = [r for r in in_c if gt[r["example_id"]][m.attribute] == m.value]
            if not grp:
                continue
            gap = np.mean([r["correct"] for r in in_c]) - np.mean([r["correct"] for r in grp])
            if gap < min_gap:
                continue
            tops = [r["caption"] for r in caps if r["scope"] == model and r["class"] == m.cls]
            named = any(re.search(rf"\b{re.escape(m.value)}\b", c) for c in tops)
            out.append(
                {
                    "model": model,
                    "class": m.cls,
                    "mode": f"{m.attribute}={m.value}",
                    "gap": float(gap),
                    "named": named,
                    "top_hard": tops,
                }
            )
    return out


def _run_with_retrieval(cfg, out: str):
    """``zoo-audit run cfg`` on threads, generating by retrieval (what the composition root
    chooses for data that is not a world)."""
    from audit.pipeline.config import load_config
    from audit.pipeline.executor import ThreadExecutor
    from audit.pipeline.inputs import Services
    from audit.store import RunStore
    from audit.synthetic import RetrievalSetGenerator
    from audit.zoo.shard import LocalSweeper
    from cluster.runner import run_audit

    gen = RetrievalSetGenerator(RunStore(out), load_config(str(cfg)))
    services = Services(executor=ThreadExecutor(2), sweeper=LocalSweeper(threads=1), generator=gen)
    store, res = run_audit(str(cfg), out, services=services, console=lambda s: None)
    assert res.failed is None
    return store, gen


@pytest.mark.slow  # at this size the two-mode class is found in some trainings only (a fresh clone missed it once)
def test_second_world_as_a_plain_manifest(tmp_path, fake_fmnist):
    """A new user's dataset: integer labels, a class-name column, attribute columns, no spec,
    no captions. The run names each planted value, finds both modes of the two-mode class and
    generates by retrieval."""
    from audit.data.world import WorldSpec, build_world, export_manifest

    spec_path = tmp_path / "second.toml"
    spec_path.write_text(SECOND_TINY)
    world = build_world(str(spec_path), str(tmp_path / "world"), fmnist_dir=fake_fmnist)
    manifest = export_manifest(world, str(tmp_path / "data" / "examples.parquet"))
    truth = world.table.select(["example_id", "split", "item", "color", "background"])
    assert (
        pq.read_schema(manifest).metadata is None
        and "caption" not in pq.read_schema(manifest).names
    )
    zoo = tmp_path / "zoo.toml"
    zoo.write_text(ZOO)
    cfg = tmp_path / "audit.toml"
    cfg.write_text(f"""
[data]
path = "{manifest}"
class_column = "item"
[zoo]
manifest = "{zoo}"
[stats]
n_boot = 50
[directions]
n_permutations = 20
grounding_k = 10
k = 10
[mitigate]
enabled = false
[report]
enabled = false
""")
    out = str(tmp_path / "run")
    store, gen = _run_with_retrieval(cfg, out)
    assert store.manifest()["data"]["classes"] == ["t-shirt", "pullover", "sandal", "sneaker"]
    assert store.manifest()["captions"]["dropped_unknown_words"] > 0  # the generic grammar's words
    errors = store.errors().to_pylist()
    oov = [r["item"] for r in errors if r["item"].startswith("word:")]
    assert len(oov) == len(set(oov)) and "word:red" in oov and "word:orange" not in oov

    spec = WorldSpec.from_toml(str(spec_path))
    rows = planted_naming(store, truth, spec)
    assert rows, "some planted group must fail by 15 points"
    assert np.mean([r["named"] for r in rows]) >= 0.9, json.dumps(rows, indent=1)
    dirs = store.read_table("directions.parquet").to_pylist()
    caps = [
        r
        for r in store.read_table("captions.parquet").to_pylist()
        if r["polarity"] == "hard" and r["rank"] == 1
    ]
    both = []
    for scope in {r["scope"] for r in dirs}:
        ok = [
            r["mode"]
            for r in dirs
            if r["scope"] == scope and r["class"] == "pullover" and r["status"] == "ok"
        ]
        tops = {
            r["mode"]: r["caption"]
            for r in caps
            if r["scope"] == scope and r["class"] == "pullover" and r["mode"] in ok
        }
        if (
            len(ok) >= 2
            and any("orange" in c for c in tops.values())
            and any("coins" in c for c in tops.values())
        ):
            both.append(scope)
    assert both, [(r["scope"], r["mode"], r["status"]) for r in dirs if r["class"] == "pullover"]

    sets = store.read_table("synthetic_sets.parquet")
    # the manifest's pool carries the attribute columns: retrieval matches on them, and says so
    assert sets.num_rows and set(sets["generator"].to_pylist()) == {"retrieval+attributes"}
    pool = gen.pool()  # drawn from the pool split only, a caption's images from its class
    pool_ids = truth.filter(pc.equal(truth["split"], "pool"))["example_id"].to_pylist()
    assert set(pool.example_ids) <= set(pool_ids)
    picked = pool.pick(["a photo of an orange pullover"] * 3, [1, 2, 3])
    assert (
        picked == pool.pick(["a photo of an orange pullover"] * 3, [1, 2, 3])
        and len(set(picked)) == 3
    )
    item_of = dict(zip(truth["example_id"].to_pylist(), truth["item"].to_pylist(), strict=True))
    assert {item_of[pool.example_ids[i]] for i in picked} == {"pullover"}


TINY_CLIP = "zoo-audit-test-tiny-clip-datasets"


def test_imagefolder_of_pngs_end_to_end(tmp_path, tiny_world, tiny_zoo_path):
    """Class directories name the classes; with no captions and no attributes the run uses a
    CLIP embedder (a tiny random one here), and generation retrieves pool images."""
    from tiny_clip import register_tiny_clip

    from audit.data.readers import read_world

    register_tiny_clip(tmp_path, TINY_CLIP)
    world = read_world(tiny_world)
    root = tmp_path / "folder"
    for r in world.table.select(["example_id", "split", "label", "image"]).to_pylist():
        d = root / r["split"] / world.classes[r["label"]]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{r['example_id']}.png").write_bytes(r["image"])
    cfg = tmp_path / "audit.toml"
    cfg.write_text(f"""
[data]
path = "{root}"
[zoo]
manifest = "{tiny_zoo_path}"
[stats]
n_boot = 20
[directions]
embedder = "open_clip:{TINY_CLIP}:random"
n_permutations = 0
grounding_k = 10
k = 10
[mitigate]
enabled = false
[report]
enabled = false
""")
    out = str(tmp_path / "run")
    store, _ = _run_with_retrieval(cfg, out)
    assert store.manifest()["data"]["classes"] == [
        "sandal",
        "t-shirt",
        "trouser",
    ]  # the directories, sorted
    caps = store.read_table("captions.parquet")
    assert set(caps["class"].to_pylist()) <= {"sandal", "t-shirt", "trouser"}
    # every direction the tiny models have is named (they may have none: trained for seconds)
    with_direction = {
        (r["scope"], r["class"])
        for r in store.read_table("directions.parquet").to_pylist()
        if r["direction"] is not None
    }
    assert {(r["scope"], r["class"]) for r in caps.to_pylist()} == with_direction
    sets = store.read_table("synthetic_sets.parquet")
    assert set(sets["generator"].to_pylist()) <= {"retrieval"}
