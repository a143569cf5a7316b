"""FAISS index and nearest-caption evaluation: exactness, class restriction, hand-computed accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from audit.embed.base import l2_normalize
from audit.index import ClassIndex, VectorIndex, exact_search, recall_at_k, subpopulations_table


def _unit(n, d, seed=0):
    return l2_normalize(np.random.default_rng(seed).standard_normal((n, d)))


def _brute(vectors, queries, k):
    s = queries @ vectors.T
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def test_flat_index_matches_brute_force():
    x, q = _unit(300, 16), _unit(20, 16, seed=1)
    ix = VectorIndex(x)
    assert ix.kind_ == "flat" and ix.recall_ == 1.0
    scores, ids = ix.search(q, 5)
    assert ids.shape == (20, 5) and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, _brute(x, q, 5))
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, ids, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_index_measures_recall_and_agrees_with_exact(kind):
    # clustered data, like real embeddings
    rng = np.random.default_rng(0)
    centres = _unit(20, 24, seed=3)
    x = l2_normalize(
        centres[rng.integers(0, 20, 3000)] + 0.3 * rng.standard_normal((3000, 24)) / np.sqrt(24)
    )
    ix = VectorIndex(x, kind=kind, target_recall=0.95, recall_k=10, recall_queries=100)
    assert ix.kind_ == kind and ix.recall_ >= 0.95
    q = x[:50] + 0.01 * rng.standard_normal((50, 24)).astype(np.float32)
    _, ids = ix.search(q, 10)
    _, truth = exact_search(x, q, 10)
    assert recall_at_k(ids, truth) >= 0.9


def test_auto_kind_by_size():
    assert VectorIndex(_unit(100, 8), exact_max=100).kind_ == "flat"
    assert VectorIndex(_unit(400, 8), exact_max=100, target_recall=None).kind_ == "hnsw"
    assert VectorIndex(_unit(400, 8), exact_max=100, ivf_min=300, target_recall=None).kind_ == "ivf"
    with pytest.raises(ValueError, match="unknown index kind"):
        VectorIndex(_unit(10, 8), kind="lsh")


def test_subset_and_class_restriction():
    x, q = _unit(200, 8), _unit(4, 8, seed=5)
    labels = np.arange(200) % 3
    cix = ClassIndex(x, labels)
    for c in range(3):
        _, ids = cix.search(q, 7, c)
        assert (labels[ids] == c).all()
        rows = np.flatnonzero(labels == c)
        np.testing.assert_array_equal(ids, rows[_brute(x[rows], q, 7)])
        _, ids2 = VectorIndex(x).search(q, 7, subset=rows)
        np.testing.assert_array_equal(ids2, ids)
    # a class smaller than k pads with -1
    small = ClassIndex(x[:5], np.array([0, 0, 1, 1, 1]))
    _, ids = small.search(q[:1], 4, 0)
    assert sorted(ids[0][:2]) == [0, 1] and (ids[0][2:] == -1).all()
    with pytest.raises(ValueError, match="indexed classes"):
        small.search(q[:1], 2, 7)


def test_subpopulation_accuracy_matches_hand_computation():
    # class 0: six images on a circle; class 1: two images. The caption points at images 0-2.
    angles = np.array([0.0, 0.2, 0.4, 2.0, 2.5, 3.0, 0.1, 0.3])
    x = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    correct = {
        "m1": np.array([0, 0, 1, 1, 1, 1, 1, 1], bool),  # fails near angle 0
        "m2": np.array([1, 1, 1, 1, 0, 1, 0, 1], bool),
    }
    caption_vecs = {
        "hard": np.array([1.0, 0.0], np.float32),
        "easy": np.array([np.cos(2.5), np.sin(2.5)], np.float32),
    }
    rows = [
        {"scope": "m1", "class": "a", "caption": "hard", "polarity": "hard"},
        {"scope": "m1", "class": "a", "caption": "easy", "polarity": "easy"},
        {"scope": "fam", "class": "a", "caption": "hard", "polarity": "hard"},
        {"scope": "m2", "class": "b", "caption": "hard", "polarity": "hard"},
    ]
    t = subpopulations_table(
        rows,
        correct,
        caption_vecs,
        ClassIndex(x, labels),
        ["a", "b"],
        k=3,
        scopes={"fam": ["m1", "m2"]},
    )
    r = t.to_pylist()
    # m1, hard: nearest of class a are images 0,1,2 -> 1/3 correct; class a accuracy 4/6
    assert r[0]["accuracy_on_nearest"] == pytest.approx(1 / 3) and r[0][
        "class_accuracy"
    ] == pytest.approx(4 / 6)
    assert r[0]["n"] == 3 and r[0]["k"] == 3 and r[0]["ci_low"] < 1 / 3 < r[0]["ci_high"]
    # m1, easy: nearest to angle 2.5 are images 4,3,5 -> all correct
    assert r[1]["accuracy_on_nearest"] == pytest.approx(1.0)
    # the family pools both models: (1 + 3) / 6 on the nearest, (4 + 5) / 12 on the class
    assert r[2]["accuracy_on_nearest"] == pytest.approx(4 / 6) and r[2][
        "class_accuracy"
    ] == pytest.approx(9 / 12)
    assert r[2]["n"] == 6 and r[2]["n_models"] == 2
    # class b has only 2 images: k is capped, m2 gets 1 of 2
    assert r[3]["n"] == 2 and r[3]["accuracy_on_nearest"] == pytest.approx(0.5)
    from audit.predictions import wilson_interval

    lo, hi = wilson_interval(np.array([1]), np.array([3]))
    assert (r[0]["ci_low"], r[0]["ci_high"]) == pytest.approx((lo[0], hi[0]))
    assert t.column_names[:10] == [
        "scope",
        "class",
        "caption",
        "polarity",
        "k",
        "accuracy_on_nearest",
        "class_accuracy",
        "ci_low",
        "ci_high",
        "n",
    ]
    with pytest.raises(ValueError, match="neither a model"):
        subpopulations_table(
            [{**rows[0], "scope": "nobody"}],
            correct,
            caption_vecs,
            ClassIndex(x, labels),
            ["a", "b"],
        )
    with pytest.raises(ValueError, match="aligned"):
        subpopulations_table(
            rows[:1], {"m1": correct["m1"][:3]}, caption_vecs, ClassIndex(x, labels), ["a", "b"]
        )


def test_a_clusters_interval_counts_its_images_not_its_model_image_pairs():
    """Models of a cluster share their failures: two copies of a model know no more than one,
    so the pooled interval is the one model's; models that never agree count every pair."""
    from audit.predictions import effective_counts, wilson_interval

    rng = np.random.default_rng(0)
    a = rng.random(40) < 0.6
    rows = np.arange(40)
    one = effective_counts({"m": a}, ["m"], rows)
    assert one == (float(a.sum()), 40.0)  # a model alone: its hits and images, exactly
    twins = effective_counts({"m": a, "n": a.copy()}, ["m", "n"], rows)
    assert twins == pytest.approx(one)
    half = np.arange(40) % 2 == 0  # each image right for exactly one of the two models
    k, n = effective_counts({"m": half, "n": ~half}, ["m", "n"], rows)
    assert (k, n) == pytest.approx((40.0, 80.0))
    # independent models: between the images and the pairs, so the interval is narrower than
    # one model's but no narrower than the pairs'
    b = rng.random((3, 400)) < 0.5
    k, n = effective_counts({str(i): b[i] for i in range(3)}, ["0", "1", "2"], np.arange(400))
    assert 400 <= n <= 1200 and k / n == pytest.approx(b.mean())
    lo2, hi2 = wilson_interval(np.array([k]), np.array([n]))
    lo1, hi1 = wilson_interval(np.array([b.mean() * 400]), np.array([400]))
    assert hi2 - lo2 < hi1 - lo1
