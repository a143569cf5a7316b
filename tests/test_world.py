"""The planted world: statistics, determinism, captions and the renderer."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest

from audit.data.readers import load_fashion_mnist_arrays, read_world
from audit.data.world import WorldRenderer, WorldSpec, build_world


def test_planted_train_rates_match_spec(tiny_world, tiny_spec_path):
    spec = WorldSpec.from_toml(tiny_spec_path)
    tab = read_world(tiny_world)
    train = tab.split("train")
    items, colors, bgs = train.column("item"), train.column("color"), train.column("background")
    for m in spec.planted:
        in_c = items == m.cls
        values = colors if m.attribute == "color" else bgs
        rate = float(np.mean(values[in_c] == m.value))
        assert abs(rate - m.rate) <= 0.02, (m, rate)
    # the planted group column marks exactly the planted rows
    groups = train.column("group")
    assert np.array_equal(groups == "t-shirt:color=blue", (items == "t-shirt") & (colors == "blue"))
    assert np.array_equal(
        groups == "sandal:background!=grass", (items == "sandal") & (bgs != "grass")
    )


@pytest.mark.parametrize("split", ["debug", "test", "pool"])
def test_eval_splits_are_balanced(tiny_world, split):
    tab = read_world(tiny_world).split(split)
    items = tab.column("item")
    per_class = collections.Counter(items)
    assert max(per_class.values()) - min(per_class.values()) <= 1
    for attr in ("color", "background"):
        for item in set(items):
            counts = collections.Counter(tab.column(attr)[items == item])
            assert len(counts) == 3 and max(counts.values()) - min(counts.values()) <= 1, (
                attr,
                item,
                counts,
            )


def test_same_spec_and_seed_give_identical_bytes(tmp_path, tiny_spec_path, fake_fmnist, tiny_world):
    out = tmp_path / "again"
    build_world(tiny_spec_path, str(out), fmnist_dir=fake_fmnist)
    a = open(os.path.join(tiny_world, "examples.parquet"), "rb").read()
    b = open(out / "examples.parquet", "rb").read()
    assert a == b
    assert (out / "spec.toml").read_text() == open(tiny_spec_path).read()


def test_rebuild_is_skipped_when_spec_unchanged(tmp_path, tiny_spec_path, fake_fmnist):
    out = tmp_path / "w"
    build_world(tiny_spec_path, str(out), fmnist_dir=fake_fmnist)
    mtime = os.path.getmtime(out / "examples.parquet")
    build_world(tiny_spec_path, str(out), fmnist_dir=fake_fmnist)
    assert os.path.getmtime(out / "examples.parquet") == mtime


def test_images_and_captions(tiny_world):
    tab = read_world(tiny_world).split("debug")
    imgs, ok, errors = tab.decode()
    assert imgs.shape == (90, 16, 16, 3) and not errors
    row = tab.table.slice(0, 1).to_pylist()[0]
    assert row["caption"] == f"a photo of a {row['color']} {row['item']} on {row['background']}"


def test_caption_grammar_and_vocabulary_errors(tiny_spec_path):
    spec = WorldSpec.from_toml(tiny_spec_path)
    assert spec.parse_caption("a photo of a blue t-shirt on grass") == {
        "item": "t-shirt",
        "color": "blue",
        "background": "grass",
    }
    assert spec.parse_caption("A photo of a sandal.") == {
        "item": "sandal",
        "color": None,
        "background": None,
    }
    assert spec.caption("trouser", "red") == "a photo of a red trouser"
    with pytest.raises(
        ValueError, match=r"unknown colour 'magenta'.*colours \['red', 'green', 'blue'\]"
    ):
        spec.parse_caption("a photo of a magenta sandal")
    with pytest.raises(ValueError, match=r"unknown background 'lava'.*backgrounds"):
        spec.parse_caption("a photo of a red sandal on lava")
    with pytest.raises(ValueError, match="unknown item 'hat'"):
        spec.parse_caption("a photo of a hat")
    with pytest.raises(ValueError, match="does not follow the grammar"):
        spec.parse_caption("sandals everywhere")


def test_spec_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown colour"):
        WorldSpec.from_dict({"colors": ["red", "chartreuse"]})
    with pytest.raises(ValueError, match="planted mode names class 'coat'"):
        WorldSpec.from_dict(
            {
                "items": ["sandal", "bag"],
                "planted": [{"class": "coat", "attribute": "color", "value": "red", "rate": 0.1}],
            }
        )
    with pytest.raises(ValueError, match="unknown world spec key"):
        WorldSpec.from_dict({"colours": ["red"]})


def test_renderer_is_deterministic_and_follows_caption(tiny_spec_path, fake_fmnist):
    spec = WorldSpec.from_toml(tiny_spec_path)
    r = WorldRenderer(spec, load_fashion_mnist_arrays(fake_fmnist))
    a = r.render("a photo of a red sandal on grass", seed=7, n=3)
    b = r.render("a photo of a red sandal on grass", seed=7, n=3)
    c = r.render("a photo of a red sandal on grass", seed=8, n=3)
    assert a.shape == (3, 16, 16, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    # red items: the red channel dominates where the item is
    red = r.render("a photo of a red trouser on gravel", seed=1, n=4).astype(int)
    blue = r.render("a photo of a blue trouser on gravel", seed=1, n=4).astype(int)
    assert (red[..., 0] - red[..., 2]).mean() > (blue[..., 0] - blue[..., 2]).mean() + 10
    with pytest.raises(ValueError, match="Vocabulary"):
        r.render("a photo of a golden sandal")


DECOY = {
    "items": ["t-shirt", "trouser", "sandal"],
    "colors": ["red", "green", "blue"],
    "backgrounds": ["brick", "grass", "gravel"],
    "image_size": 16,
    "seed": 1,
    "splits": {"train": 600, "debug": 90, "test": 0, "pool": 0},
    "planted": [
        {
            "class": "sandal",
            "attribute": "background",
            "value": "grass",
            "rate": 0.02,
            "decoy": "trouser",
            "decoy_rate": 0.8,
        }
    ],
}


def test_a_decoy_makes_the_value_predict_another_class_in_train(fake_fmnist):
    from audit.data.world import WorldBuilder

    spec = WorldSpec.from_dict(DECOY)
    assert spec.train_distribution("trouser", "background").round(3).tolist() == [0.1, 0.8, 0.1]
    assert spec.train_distribution("sandal", "background").round(3).tolist() == [0.49, 0.02, 0.49]
    assert spec.train_distribution("t-shirt", "background").round(3).tolist() == [
        0.333,
        0.333,
        0.333,
    ]
    tab = WorldBuilder(spec, load_fashion_mnist_arrays(fake_fmnist)).build()
    train, debug = tab.split("train"), tab.split("debug")
    items, bgs = train.column("item"), train.column("background")
    assert abs(np.mean(bgs[items == "trouser"] == "grass") - 0.8) < 0.01
    assert abs(np.mean(bgs[items == "sandal"] == "grass") - 0.02) < 0.01
    # only the rare group is ground truth; the decoy's share is its cause, not a group
    groups = set(train.column("group")) | set(debug.column("group"))
    assert groups == {"", "sandal:background=grass"}
    d_items, d_bgs = debug.column("item"), debug.column("background")
    assert collections.Counter(d_bgs[d_items == "trouser"]) == {
        "brick": 10,
        "grass": 10,
        "gravel": 10,
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"decoy": "sandal"}, "decoy 'sandal' must be another of the world's items"),
        ({"decoy": "coat"}, "decoy 'coat' must be another"),
        ({"decoy_rate": 0.2}, r"decoy_rate must be in \(0.333, 1\]"),
        ({"rate": 0.9}, "a decoy needs a rare mode"),
        ({"decoys": "trouser"}, r"unknown key\(s\) \['decoys'\]"),
    ],
)
def test_decoy_errors_name_the_problem(change, message):
    bad = {**DECOY, "planted": [{**DECOY["planted"][0], **change}]}
    with pytest.raises(ValueError, match=message):
        WorldSpec.from_dict(bad)


def test_two_shares_fixed_for_one_value_are_an_error():
    two = {
        **DECOY,
        "planted": [
            *DECOY["planted"],
            {"class": "trouser", "attribute": "background", "value": "grass", "rate": 0.01},
        ],
    }
    with pytest.raises(ValueError, match="two planted shares for 'trouser'/background=grass"):
        WorldSpec.from_dict(two)
    over = {
        **DECOY,
        "planted": [
            *DECOY["planted"],
            {
                "class": "trouser",
                "attribute": "background",
                "value": "brick",
                "rate": 0.3,
                "kind": "association",
            },
        ],
    }
    with pytest.raises(ValueError, match="add up to more than 1"):
        WorldSpec.from_dict(over)
