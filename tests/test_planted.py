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
