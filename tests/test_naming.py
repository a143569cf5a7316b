"""Naming a failure mode: a caption read back into its slots, the most general caption that
fails as much, and the modes no caption explains (unnamed)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from audit.data.table import ImageTable
from audit.naming import generalise, name_modes
from audit.predictions import wilson_interval
from audit.slots import SlotGrammar


def _grammar() -> SlotGrammar:
    values = {"color": ["blue", "dark blue", "red"], "background": ["grass", "moon"]}
    return SlotGrammar(values, {"color": "{value} {noun}", "background": "{noun} on {value}"})


def test_a_caption_reads_back_into_its_slots_and_slots_compose_a_caption():
    g = _grammar()
    assert g.parse("a photo of a dark blue coat on moon") == {
        "color": "dark blue",
        "background": "moon",
    }
    assert g.parse("a photo of a red coat") == {"color": "red"}
    assert g.parse("a photo of a coat") == {}
    assert (
        g.compose("coat", {"color": "red", "background": "grass"})
        == "a photo of a red coat on grass"
    )
    assert g.compose("coat", {}) == "a photo of a coat"
    cols = {"example_id": ["a", "b", "c"], "split": ["test"] * 3, "label": [0, 0, 1]}
    cols |= {"image": [b""] * 3, "color": ["red", "blue", "red"], "background": ["moon"] * 3}
    t = pa.table(cols)
    table = ImageTable(t, ["coat", "bag"])
    assert g.matches(table, {"color": "red", "background": "moon"}).tolist() == [True, False, True]
    assert SlotGrammar.of(table).values == {"color": ["blue", "red"]}  # one background: no slot


def _check(accuracy: dict[str, float], class_accuracy: float = 0.8, half_width: float = 0.1):
    """A planted answer: each caption's accuracy on its nearest images."""
    calls = []

    def check(scope, cls, captions):
        calls.append(list(captions))
        out = {}
        for c in captions:
            a = accuracy[c]
            out[c] = {"accuracy_on_nearest": a, "ci_low": a - half_width, "ci_high": a + half_width}
            out[c]["class_accuracy"] = class_accuracy
        return out

    return check, calls


def test_a_slot_is_dropped_when_the_failure_does_not_weaken():
    full, red, moon = (
        "a photo of a red coat on moon",
        "a photo of a red coat",
        "a photo of a coat on moon",
    )
    # the failure is the colour: without the background the caption fails as much (0.25 is
    # inside 0.2 +- 0.1); without the colour it does not (0.75)
    check, _ = _check({full: 0.2, red: 0.25, moon: 0.75})
    caption, slots, row, dropped = generalise("m", "coat", full, _grammar(), check)
    assert (caption, slots, dropped) == (red, {"color": "red"}, ["background"])
    # both slots matter: nothing is dropped
    check, _ = _check({full: 0.1, red: 0.5, moon: 0.6})
    assert generalise("m", "coat", full, _grammar(), check)[0] == full


def test_a_mode_whose_caption_does_not_fail_is_unnamed_and_ordered_last():
    a, b, c = "a photo of a red coat", "a photo of a blue bag", "a photo of a coat on grass"
    check, _ = _check({a: 0.3, b: 0.75, c: 0.1}, class_accuracy=0.8)
    hard = {("m", "coat", 0): a, ("m", "bag", 0): b, ("m", "coat", 1): c}
    cv = {("m", "coat", 0): 0.9, ("m", "bag", 0): 0.99, ("m", "coat", 1): 0.7}
    rows = name_modes(hard, cv, _grammar(), check).to_pylist()
    # ordered by how much the named subpopulation fails, the unnamed one last despite its strength
    assert [(r["class"], r["mode"], r["named"]) for r in rows] == [
        ("coat", 1, True),
        ("coat", 0, True),
        ("bag", 0, False),
    ]
    unnamed = rows[-1]
    assert (
        unnamed["caption"] is None and unnamed["specific_caption"] == b and unnamed["slots"] == "{}"
    )
    assert [r["order"] for r in rows] == [0, 1, 2]
    assert np.isclose(rows[0]["gap"], 0.7)


def test_an_unnamed_mode_too_small_to_tell_is_undecided_not_passed():
    """Unnamed because the images are too few (the interval reaches the class and a failure of
    min_gap alike) reads differently from unnamed because the caption's images do not fail."""
    few, fine = "a photo of a red coat", "a photo of a blue bag"
    check, _ = _check({few: 0.6, fine: 0.78}, class_accuracy=0.72, half_width=0.16)
    hard = {("m", "coat", 0): few, ("m", "bag", 0): fine}
    rows = {r["class"]: r for r in name_modes(hard, {}, _grammar(), check).to_pylist()}
    assert not rows["coat"]["named"] and rows["coat"]["undecided"]  # [44%, 76%] vs 72%
    n = rows["coat"]["images_to_decide"]  # the fewest images at 60% whose interval is below 72%
    lo, hi = wilson_interval(np.array([0.6 * n, 0.6 * (n - 1)]), np.array([n, n - 1]))
    assert hi[0] < 0.72 <= hi[1] and rows["bag"]["images_to_decide"] is None
    assert not rows["bag"]["named"] and not rows["bag"]["undecided"]  # [62%, 94%]: no failure
    strict = name_modes(hard, {}, _grammar(), check, min_gap=0.3).to_pylist()
    assert not any(r["undecided"] for r in strict)  # a 30-point failure is ruled out for both
    check, _ = _check({few: 0.3}, class_accuracy=0.72, half_width=0.16)
    named = name_modes({("m", "coat", 0): few}, {}, _grammar(), check).to_pylist()[0]
    assert named["named"] and not named["undecided"] and named["images_to_decide"] is None


def test_a_planted_failure_counts_as_named_by_the_mode_that_names_it():
    """An oracle check's own logic: a class with a mode named by the planted value is named;
    with none, a mode reported unnamed counts as the audit saying it cannot name it."""
    from audit.naming import MODES_SCHEMA
    from audit.planted import named_evaluation

    base = {
        "class": "coat",
        "specific_caption": "",
        "slots": "{}",
        "dropped": "[]",
        "cv_score": 0.9,
    }
    base |= {"accuracy_on_nearest": 0.1, "ci_low": 0.0, "ci_high": 0.2, "class_accuracy": 0.8}
    base |= {"gap": 0.7, "order": 0, "checked_on": "attribute group", "n_checked": 20}
    modes = [
        {**base, "scope": "a", "mode": 0, "named": True, "caption": "a photo of a coat on grass"},
        {**base, "scope": "a", "mode": 1, "named": True, "caption": "a photo of a red coat"},
        {**base, "scope": "b", "mode": 0, "named": True, "caption": "a photo of a coat on grass"},
        {**base, "scope": "b", "mode": 1, "named": False, "caption": None},
    ]
    acc = [
        {"model": m, "class": "coat", "attribute": "group", "value": "coat:color=red"}
        | {"accuracy": 0.2, "class_accuracy": 0.8, "n": 10, "ci_low": 0.0, "ci_high": 0.5}
        for m in ("a", "b")
    ]
    rows = named_evaluation(
        pa.Table.from_pylist(acc), pa.Table.from_pylist(modes, schema=MODES_SCHEMA), 0.15
    )
    got = {r["model"]: (r["named"], r["caption_names_group"]) for r in rows.to_pylist()}
    assert got == {"a": (True, True), "b": (False, None)}
    # planted groups on grass and with dots too (no caption names dots): for the dots, model a
    # has only modes named by other planted groups; model b has an unnamed mode
    acc2 = [
        r | {"value": v}
        for r in acc
        for v in ("coat:color=red", "coat:background=grass", "coat:texture=dots")
    ]
    rows = named_evaluation(
        pa.Table.from_pylist(acc2), pa.Table.from_pylist(modes, schema=MODES_SCHEMA), 0.15
    ).to_pylist()
    other = {(r["model"], r["group"]): r["names_other_group"] for r in rows}
    assert other[("a", "coat:texture=dots")] and other[("b", "coat:texture=dots")] is False
    assert not other[("a", "coat:color=red")] and not other[("a", "coat:background=grass")]


def test_two_failures_of_a_class_that_share_a_top_caption_get_a_name_each():
    """Red coats fail and coats on moon fail: both modes' top caption is "a red coat on moon"
    and the red coat fails most. The first mode is named by the colour; the second is not named
    by it again (nor by a part of it) but by the background, from its own hard captions."""
    full, red = "a photo of a red coat on moon", "a photo of a red coat"
    moon, red_grass = "a photo of a coat on moon", "a photo of a red coat on grass"
    grass = "a photo of a coat on grass"
    acc = {full: 0.05, red: 0.1, moon: 0.12, red_grass: 0.1, grass: 0.7}
    check, _ = _check(acc, class_accuracy=0.8)
    hard = {("m", "coat", 0): [full, red], ("m", "coat", 1): [red_grass, red, full]}
    rows = {r["mode"]: r for r in name_modes(hard, {}, _grammar(), check).to_pylist()}
    assert rows[0]["caption"] == red and rows[0]["named"]
    assert rows[1]["caption"] == moon and rows[1]["named"]
    assert rows[1]["specific_caption"] == full  # the hard caption it was generalised from
    # no other failing name among the second mode's captions: it keeps the shared one, unless
    # the images its direction finds hardest lie mostly outside the red coats and still fail
    # (a failure of its own that the vocabulary cannot name: the background column is missing)
    check, _ = _check(acc | {moon: 0.75}, class_accuracy=0.8)
    rows = {r["mode"]: r for r in name_modes(hard, {}, _grammar(), check).to_pylist()}
    assert rows[1]["caption"] == red and rows[1]["specific_caption"] == red_grass
    asked = []

    def beyond(share_covered, accuracy):
        def f(key, names):
            asked.append((key, names))
            row = {"accuracy_on_nearest": accuracy, "ci_low": accuracy - 0.1}
            return (
                row
                | {"ci_high": accuracy + 0.1, "class_accuracy": 0.8, "n": 40, "k": 50}
                | {
                    "share_covered": share_covered,
                    "checked_on": "direction, beyond the earlier names",
                }
            )

        return f

    rows = name_modes(hard, {}, _grammar(), check, beyond=beyond(0.6, 0.3)).to_pylist()
    second = {r["mode"]: r for r in rows}[1]
    assert not second["named"] and second["caption"] is None and second["slots"] == "{}"
    assert second["checked_on"] == "direction, beyond the earlier names"
    assert asked == [(("m", "coat", 1), [red])]
    # nearly all red coats again (the same failure found twice), or no failure left: keeps it
    for b in (beyond(0.9, 0.3), beyond(0.2, 0.75)):
        second = {
            r["mode"]: r for r in name_modes(hard, {}, _grammar(), check, beyond=b).to_pylist()
        }[1]
        assert second["named"] and second["caption"] == red


def test_every_named_mode_of_a_class_with_a_name_of_its_own_is_generated():
    """The generate stage asks for each distinct name of a class, not only the first."""
    from audit.naming import MODES_SCHEMA, with_comparisons
    from audit.pipeline.name import named_modes, pairs_of

    base = {"specific_caption": "", "slots": "{}", "dropped": "[]", "cv_score": 0.9}
    base |= {"accuracy_on_nearest": 0.1, "ci_low": 0.0, "ci_high": 0.2, "class_accuracy": 0.8}
    base |= {"gap": 0.7, "checked_on": "attribute group", "n_checked": 20, "scope": "m"}
    caps = ["a photo of a red coat", "a photo of a coat on moon", "a photo of a red coat"]
    modes = [
        {**base, "class": "coat", "mode": i, "named": True, "caption": c, "order": i}
        for i, c in enumerate(caps)
    ]
    modes.append({**base, "class": "bag", "mode": 0, "named": False, "caption": None, "order": 3})
    easy = [
        {"scope": "m", "class": "coat", "mode": i, "caption": f"easy {i}", "source": "grammar"}
        | {"score": 1.0, "rank": 1, "polarity": "easy"}
        for i in range(3)
    ]
    table = pa.Table.from_pylist(modes, schema=MODES_SCHEMA)
    named = named_modes(with_comparisons(table, pa.Table.from_pylist(easy), _grammar()))
    assert pairs_of(named) == {
        ("m", "coat", 0): (caps[0], "easy 0"),
        ("m", "coat", 1): (caps[1], "easy 1"),
    }


def test_a_modes_comparison_caption_shows_no_named_failure_of_its_class():
    """Red coats and coats on moon both fail (named in two scopes): the red coats' top easy
    caption is "a coat on moon", the other failure, so confirmation would compare two failing
    sets; each mode is compared with its first easy caption that holds no name's slots, and a
    mode whose easy captions all do with the class's reference caption (its typical images)."""
    from audit.naming import MODES_SCHEMA, with_comparisons

    red, moon = "a photo of a red coat", "a photo of a coat on moon"
    base = {"class": "coat", "specific_caption": "", "dropped": "[]", "cv_score": 0.9}
    base |= {"accuracy_on_nearest": 0.1, "ci_low": 0.0, "ci_high": 0.2, "class_accuracy": 0.8}
    base |= {"gap": 0.7, "checked_on": "attribute group", "n_checked": 20, "order": 0}
    modes = [
        {
            **base,
            "scope": "a",
            "mode": 0,
            "named": True,
            "caption": red,
            "slots": '{"color": "red"}',
        },
        {**base, "scope": "b", "mode": 0, "named": True, "caption": moon}
        | {"slots": '{"background": "moon"}'},
        {**base, "scope": "c", "mode": 0, "named": False, "caption": None, "slots": "{}"},
    ]
    ranked = {
        "a": [moon, "a photo of a blue coat on grass"],
        "b": ["a photo of a red coat on grass", "a photo of a coat", "a photo of a blue coat"],
        "c": ["a photo of a red coat on moon", moon],
    }
    easy = [
        {"scope": sc, "class": "coat", "mode": 0, "caption": c, "source": "data", "score": 1.0}
        | {"rank": i + 1, "polarity": "easy"}
        for sc, caps in ranked.items()
        for i, c in enumerate(caps)
    ]
    table = pa.Table.from_pylist(modes, schema=MODES_SCHEMA)
    got = {
        r["scope"]: r["easy_caption"]
        for r in with_comparisons(table, pa.Table.from_pylist(easy), _grammar()).to_pylist()
    }
    assert got == {
        "a": "a photo of a blue coat on grass",
        "b": "a photo of a coat",
        "c": _grammar().compose("coat", {}),
    }
    assert got["c"] == "a photo of a coat"


def test_beyond_an_earlier_name_compares_with_the_class_outside_that_name():
    """A class at 48% whose orange coats (a third of it) are at 5%: once they are set aside,
    the mode's other hardest images (40%) are compared with the class without them (70%), not
    with a class accuracy the earlier failure drags down."""
    from types import SimpleNamespace

    from audit.pipeline.name import _EvalCheck

    n = 60
    correct = np.ones(n, bool)
    orange = np.arange(20)  # the earlier name's images: 1 of 20 right
    correct[orange[1:]] = False
    hard = np.arange(20, 40)  # the direction's other hardest images: 8 of 20 right
    correct[hard[8:]] = False
    chk = object.__new__(_EvalCheck)
    chk.ev = SimpleNamespace(correct={"m": correct}, labels=np.zeros(n, int))
    chk.scopes, chk.classes = {}, ["coat"]
    chk.hardest = lambda row: np.concatenate([orange[:10], hard])
    chk.covered = lambda cls, caption: orange
    out = chk.beyond({"scope": "m", "class": "coat"}, ["a photo of an orange coat"])
    assert out["accuracy_on_nearest"] == 0.4 and out["n"] == 20
    assert abs(out["share_covered"] - 1 / 3) < 1e-12
    assert out["class_accuracy"] == 0.7  # 28 of the 40 coats outside the orange ones
    assert out["ci_high"] < out["class_accuracy"]  # its own failure (against 48% it is not)
    assert out["ci_high"] > correct.mean()


def test_a_reference_comparison_caption_is_labelled_with_its_class(tmp_path, monkeypatch):
    """The classify stage labels every generated prompt by its class; a named mode's comparison
    caption may be the class's reference caption, which no ranked caption is."""
    import audit.pipeline.confirm as confirm
    from audit.naming import MODES_SCHEMA
    from audit.pipeline.classify import caption_classes
    from audit.store import RunStore

    store = RunStore(str(tmp_path / "run"))
    hard = "a photo of a red coat"
    caps = [{"scope": "m", "class": "coat", "mode": 0, "caption": hard, "source": "data"}]
    store.write_table(
        "captions.parquet",
        pa.Table.from_pylist([caps[0] | {"score": 1.0, "rank": 1, "polarity": "hard"}]),
    )
    mode = {"scope": "m", "class": "coat", "mode": 0, "named": True, "caption": hard}
    mode |= {"specific_caption": hard, "slots": '{"color": "red"}', "dropped": "[]"}
    mode |= {"cv_score": 0.9, "accuracy_on_nearest": 0.1, "ci_low": 0.0, "ci_high": 0.2}
    mode |= {"class_accuracy": 0.8, "gap": 0.7, "order": 0, "checked_on": "attribute group"}
    mode |= {"n_checked": 20, "easy_caption": "a photo of a coat"}
    store.write_table("modes.parquet", pa.Table.from_pylist([mode], schema=MODES_SCHEMA))
    monkeypatch.setattr(confirm, "probe_captions", lambda pairs, data: {})
    assert caption_classes(store, None) == {hard: "coat", "a photo of a coat": "coat"}
