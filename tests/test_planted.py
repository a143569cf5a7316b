"""Checks of an audit against planted ground truth."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from audit.planted import (
    caption_names,
    parse_group,
    planted_evaluation,
    precision_at_errors,
    summarize_planted,
)


def test_parse_group_and_caption_names():
    assert parse_group("pullover:color=blue") == ("pullover", "color", "blue", False)
    assert parse_group("sandal:background!=grass") == ("sandal", "background", "grass", True)
    assert caption_names("a photo of a blue pullover on moon", "blue", False)
    assert not caption_names("a photo of a red pullover on bluegrass", "blue", False)
    assert caption_names("a photo of a sandal on brick", "grass", True)
    assert not caption_names("a photo of a sandal on grass", "grass", True)
    assert not caption_names("a photo of a red sandal", "grass", True)


def test_precision_at_errors():
    score = np.array([0.5, -2.0, -1.0, 3.0, -0.5])
    member = np.array([False, True, True, False, False])
    assert precision_at_errors(score, member, 2) == 1.0
    assert precision_at_errors(score, member, 4) == 0.5


def test_planted_evaluation_counts_only_failing_groups():
    classes = ["pullover", "bag"]
    labels = np.array([0, 0, 0, 0, 1, 1])
    groups = np.array(["pullover:color=blue", "pullover:color=blue", "", "", "", ""])
    correct = {"m": np.array([False, False, True, True, True, True])}
    confidence = {
        "m": np.array([0.9, 0.8, 0.2, 0.95, 0.9, 0.9])
    }  # confidence ranks a correct one first
    accuracy = pa.Table.from_pylist(
        [
            {
                "model": "m",
                "class": "pullover",
                "attribute": "group",
                "value": "pullover:color=blue",
                "accuracy": 0.0,
                "class_accuracy": 0.5,
            },
            {
                "model": "m",
                "class": "bag",
                "attribute": "group",
                "value": "bag:background=grass",
                "accuracy": 0.9,
                "class_accuracy": 0.95,
            },
        ]
    )
    captions = pa.Table.from_pylist(
        [
            {
                "scope": "m",
                "class": "pullover",
                "mode": 0,
                "polarity": "hard",
                "rank": 1,
                "caption": "a photo of a blue pullover",
            },
        ]
    )
    decisions = {("m", "pullover"): np.array([-3.0, -2.0, 1.0, 2.0])}
    t = planted_evaluation(
        accuracy, captions, decisions, confidence, correct, labels, groups, classes
    )
    rows = t.to_pylist()
    assert len(rows) == 1 and rows[0]["group"] == "pullover:color=blue"
    assert rows[0]["caption_names_group"] is True and rows[0]["n_errors"] == 2
    assert rows[0]["precision_svm"] == 1.0 and rows[0]["precision_confidence"] == 0.5
    s = summarize_planted(t)
    assert (
        s["pairs"] == 1
        and s["named_share"] == 1.0
        and s["precision_svm"] > s["precision_confidence"]
    )


def test_the_designed_planted_datasets_build_plain_manifests(tmp_path, monkeypatch):
    """benchmarks/make_shapes.py and make_digits.py (bench_generators' test beds): a plain
    manifest whose class column names the labels, the carried attribute columns only (the
    hidden one never), 32x32 RGB images, and the planted truth in ``group``."""
    import io
    import os
    import sys

    import pyarrow.parquet as pq
    from PIL import Image

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import make_digits
    import make_shapes

    for mod in (make_shapes, make_digits):
        d = mod.DESIGN
        t = pq.read_table(mod.build(str(tmp_path / d.class_column), scale=0.05)).to_pydict()
        assert set(t) == {"example_id", "split", "label", "image", d.class_column, "group"} | set(
            d.carried
        )
        assert [d.classes[i] for i in t["label"]] == t[d.class_column]
        assert set(t["split"]) == set(d.splits)
        img = Image.open(io.BytesIO(t["image"][0]))
        assert img.size == (32, 32) and img.mode == "RGB"
        for g, cls in zip(t["group"], t[d.class_column], strict=True):
            for one in filter(None, g.split("|")):
                assert one.startswith(f"{cls}:")  # a group names its own class
        hidden = set(d.values) - set(d.carried)
        assert hidden and not hidden & set(t)  # an attribute no caption can name
    del sys.modules["make_shapes"], sys.modules["make_digits"]
