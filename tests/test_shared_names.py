"""Named failures across the zoo (audit.shared_names): every mode's name checked on every model."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from audit.naming import MODES_SCHEMA
from audit.planted import named_evaluation
from audit.shared_names import format_shared_names, shared_counts, shared_names

CLASSES = ["star", "cross"]


def _modes(rows: list[tuple[str, str, str | None]]) -> pa.Table:
    """``modes.parquet`` rows from (scope, class, name or None for unnamed)."""
    out = []
    for i, (scope, cls, name) in enumerate(rows):
        out.append(
            {"scope": scope, "class": cls, "mode": i, "named": name is not None, "caption": name}
            | {"specific_caption": name, "slots": "{}", "dropped": "[]", "cv_score": 0.7}
            | {"accuracy_on_nearest": 0.1, "ci_low": 0.0, "ci_high": 0.3, "class_accuracy": 0.8}
            | {"gap": 0.7, "order": i, "checked_on": "attribute group", "n_checked": 20}
            | {"undecided": False, "images_to_decide": None}
        )
    return pa.Table.from_pylist(out, schema=MODES_SCHEMA)


def _world():
    """100 stars (rows 0-99): 20 cyan (0-19), 20 on coffee (20-39); 100 crosses."""
    labels = np.repeat([0, 1], 100)
    cover = {
        ("star", "a cyan star"): np.arange(20),
        ("star", "a star on coffee"): np.arange(20, 40),
    }
    return labels, (lambda pairs: {p: (cover[p], "attribute group") for p in pairs})


def test_a_name_found_in_one_model_is_checked_on_every_model():
    labels, covered = _world()
    ok = np.ones(200, bool)
    a = ok.copy()
    a[:18] = False  # fails cyan stars (its own mode)
    b = ok.copy()
    b[:17] = False  # fails cyan stars too, but its own mode is coffee (a larger failure)
    b[20:35] = False
    c = ok.copy()
    c[[0, 50]] = False  # one error among the cyan stars, one elsewhere: no failure
    modes = _modes([("a", "star", "a cyan star"), ("b", "star", "a star on coffee")])
    t = shared_names(modes, {"a": a, "b": b, "c": c}, labels, CLASSES, covered)
    row = {(r["model"], r["caption"]): r for r in t.to_pylist()}
    assert len(row) == 6  # two names x three models
    assert row[("b", "a cyan star")]["fails"] and not row[("b", "a cyan star")]["own"]
    assert row[("b", "a cyan star")]["accuracy"] == 3 / 20
    assert row[("b", "a star on coffee")]["own"] and row[("a", "a cyan star")]["own"]
    assert not row[("c", "a cyan star")]["fails"] and not row[("c", "a star on coffee")]["fails"]
    assert row[("a", "a star on coffee")]["class_accuracy"] == 82 / 100
    assert not row[("a", "a star on coffee")]["fails"]  # a is right on every coffee star
    # c tests both names (none is its own); a and b one each
    assert {r["model"]: r["tests"] for r in t.to_pylist()} == {"a": 1, "b": 1, "c": 2}
    counts = shared_counts(t)
    assert [d["caption"] for d in counts] == ["a cyan star", "a star on coffee"]
    assert [r["model"] for r in counts[0]["fails"]] == ["a", "b"]  # the largest gap first
    text = format_shared_names(t)
    assert "1 of 2 failing names fail in a model whose own modes miss it" in text
    assert "'a cyan star' fails in 2 of 3 models (1 by their own modes); worst a 10%" in text


def test_names_a_model_misses_are_tested_together_at_bonferronis_level():
    """A model at 13 of 20 on a name against a class at 85%: below the class when it is the
    one name tested (Wilson's upper end at 95%: 0.82), not when ten are (at 99.5%: 0.87)."""
    labels = np.repeat([0, 1], 100)
    names = [f"name {i}" for i in range(10)]
    cover = {
        n: np.arange(20) if i == 0 else np.arange(20 + 8 * i, 28 + 8 * i)
        for i, n in enumerate(names)
    }
    corr = np.ones(200, bool)
    corr[:7] = False  # 13 of 20 on name 0
    corr[90:98] = False  # class accuracy 85 / 100

    def check(k: int) -> dict:
        modes = _modes([("other", "star", n) for n in names[:k]])
        t = shared_names(
            modes,
            {"m": corr},
            labels,
            CLASSES,
            lambda pairs: {p: (cover[p[1]], "x") for p in pairs},
        )
        return next(r for r in t.to_pylist() if r["caption"] == "name 0")

    one, ten = check(1), check(10)
    assert one["tests"] == 1 and ten["tests"] == 10
    assert one["fails"] and not ten["fails"]
    assert ten["ci_high"] > one["ci_high"] and ten["accuracy"] == one["accuracy"] == 0.65


def test_a_planted_group_missed_by_a_models_modes_is_named_by_the_zoo():
    labels, covered = _world()
    b = np.ones(200, bool)
    b[:17] = False
    b[20:35] = False
    modes = _modes([("a", "star", "a cyan star"), ("b", "star", "a star on coffee")])
    shared = shared_names(modes, {"a": b, "b": b}, labels, CLASSES, covered)
    acc = pa.Table.from_pylist(
        [
            {"model": "b", "class": "star", "attribute": "group", "value": "star:color=cyan"}
            | {"accuracy": 0.15, "class_accuracy": 0.68}
        ]
    )
    own_only = named_evaluation(acc, modes, 0.15).to_pylist()[0]
    both = named_evaluation(acc, modes, 0.15, shared).to_pylist()[0]
    assert not own_only["caption_names_group"] and own_only["zoo_caption"] is None
    assert not both["caption_names_group"] and both["zoo_caption"] == "a cyan star"


def test_no_named_mode_gives_an_empty_table_and_no_console_line():
    labels, covered = _world()
    t = shared_names(
        _modes([("a", "star", None)]), {"a": np.ones(200, bool)}, labels, CLASSES, covered
    )
    assert t.num_rows == 0 and format_shared_names(t) == "" and shared_counts(None) == []
