"""Failure matrix, overlap statistics and clustering against hand-computed values."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from audit.failures import (
    FailureMatrix,
    bootstrap_error_consistency,
    cluster_models,
    clusters_table,
    error_consistency,
    extreme_pairs,
    failure_matrix,
    family_similarity,
    format_stats,
    overlap_statistics,
    overlap_table,
    similarity_matrix,
)

# 3 models x 10 examples (1 = fails)
FAILS = np.array(
    [
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # A: 4 failures
        [1, 1, 1, 0, 1, 0, 0, 0, 0, 0],  # B: 4 failures, 3 shared with A
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 1],  # C: 2 failures, none shared
    ],
    bool,
)


def preds(fails_row: np.ndarray, ids, order=None) -> pa.Table:
    order = np.arange(len(ids)) if order is None else order
    return pa.table(
        {"example_id": [ids[i] for i in order], "correct": [not bool(fails_row[i]) for i in order]}
    )


def test_packing_roundtrip_and_counts_match_dense():
    rng = np.random.default_rng(0)
    for n in (1, 7, 64, 65, 1000):
        f = rng.random((5, n)) < 0.3
        fm = FailureMatrix.from_dense(f, list("abcde"))
        assert fm.packed.shape[1] % 8 == 0
        np.testing.assert_array_equal(fm.dense(), f)
        n_fail, n_both = fm.counts(block=64)  # several column blocks
        np.testing.assert_array_equal(n_fail, f.sum(1))
        np.testing.assert_array_equal(n_both, f.astype(int) @ f.T.astype(int))


def test_pair_statistics_match_hand_computed_values():
    st = overlap_statistics(FailureMatrix.from_dense(FAILS, ["A", "B", "C"]), n_boot=0)
    # A, B: |A&B| = 3, |A|B| = 5
    assert st.jaccard[0, 1] == pytest.approx(3 / 5)
    assert st.p_b_fails_given_a[0, 1] == pytest.approx(3 / 4)
    assert st.shared_fraction[0, 1] == pytest.approx(3 / 4)
    # kappa(A, B): c_obs = 8/10 (agree on 3 failures + 5 successes); p_A = p_B = 0.6
    # c_exp = 0.36 + 0.16 = 0.52 -> (0.8 - 0.52) / 0.48
    assert st.error_consistency[0, 1] == pytest.approx((0.8 - 0.52) / 0.48)
    # A, C: disjoint failures; c_obs = 4/10, p_A = .6, p_C = .8, c_exp = .48 + .08 = .56
    assert st.jaccard[0, 2] == 0 and st.p_b_fails_given_a[2, 0] == 0
    assert st.error_consistency[0, 2] == pytest.approx((0.4 - 0.56) / 0.44)
    # conditional rates are not symmetric in general
    assert st.p_b_fails_given_a[1, 0] == pytest.approx(3 / 4) and st.p_b_fails_given_a[0, 0] == 1


def test_undefined_statistics_are_nan():
    f = np.array([[0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
    st = overlap_statistics(
        FailureMatrix.from_dense(f, ["never", "half", "always", "never2"]), n_boot=50
    )
    assert np.isnan(st.jaccard[0, 0]) and np.isnan(st.p_b_fails_given_a[0, 1])
    assert np.isnan(st.error_consistency[0, 3])  # both always right: c_exp = 1, kappa undefined
    assert np.isnan(st.ci_low[0, 3]) and np.isnan(st.ci_high[0, 3])
    assert st.error_consistency[0, 2] == 0  # accuracies 1 and 0: c_exp = c_obs = 0
    assert st.jaccard[1, 2] == pytest.approx(0.5)


def test_bootstrap_ci_is_seeded_covers_the_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    base = rng.random(4000) < 0.3
    f = np.stack([base ^ (rng.random(4000) < 0.1), base ^ (rng.random(4000) < 0.1)])

    def ci(n):
        fm = FailureMatrix.from_dense(f[:, :n], ["a", "b"])
        n_fail, n_both = fm.counts()
        return bootstrap_error_consistency(n_fail, n_both, n, n_boot=2000, seed=3)

    lo, hi = ci(4000)
    lo2, hi2 = ci(4000)
    np.testing.assert_array_equal(lo, lo2)
    kappa = error_consistency(f[0].sum(), f[1].sum(), (f[0] & f[1]).sum(), 4000)
    assert lo[0, 1] < kappa < hi[0, 1] and lo[0, 1] == lo[1, 0]
    slo, shi = ci(400)
    assert shi[0, 1] - slo[0, 1] > 2 * (hi[0, 1] - lo[0, 1])


def test_bootstrap_matches_resampling_examples():
    """The 4-cell multinomial shortcut has the spread of resampling examples directly."""
    rng = np.random.default_rng(2)
    f = rng.random((2, 300)) < np.array([[0.3], [0.4]])
    f[1, :60] = f[0, :60]
    n_fail, n_both = f.sum(1), f.astype(int) @ f.T.astype(int)
    lo, hi = bootstrap_error_consistency(n_fail, n_both, 300, n_boot=4000, seed=0)
    idx = rng.integers(0, 300, (4000, 300))
    a, b = f[0][idx], f[1][idx]
    k = error_consistency(a.sum(1), b.sum(1), (a & b).sum(1), 300)
    direct_lo, direct_hi = np.quantile(k, [0.025, 0.975])
    assert lo[0, 1] == pytest.approx(direct_lo, abs=0.03) and hi[0, 1] == pytest.approx(
        direct_hi, abs=0.03
    )


def test_failure_matrix_aligns_tables_on_example_id():
    ids = [f"e{i}" for i in range(10)]
    tables = {
        "A": preds(FAILS[0], ids),
        "B": preds(FAILS[1], ids, order=np.arange(10)[::-1]),  # another row order
        "C": preds(FAILS[2], ids, order=np.arange(1, 10)),  # no prediction for e0
    }
    fm = failure_matrix(tables)
    assert fm.n_examples == 9 and fm.n_dropped == 1 and fm.example_ids.tolist() == ids[1:]
    np.testing.assert_array_equal(fm.dense(), FAILS[:, 1:])
    with pytest.raises(ValueError, match="model 'C' has no prediction for 1"):
        failure_matrix(tables, example_ids=ids)
    with pytest.raises(ValueError, match="lack column"):
        failure_matrix({"A": pa.table({"example_id": ids})})


def test_overlap_table_follows_the_contract():
    st = overlap_statistics(FailureMatrix.from_dense(FAILS, ["A", "B", "C"]), n_boot=100)
    t = overlap_table(st)
    assert t.column_names[:8] == [
        "model_a",
        "model_b",
        "jaccard",
        "p_b_fails_given_a",
        "shared_fraction",
        "error_consistency",
        "ci_low",
        "ci_high",
    ]
    assert t.num_rows == 6
    rows = {(r["model_a"], r["model_b"]): r for r in t.to_pylist()}
    assert rows[("A", "B")]["jaccard"] == pytest.approx(0.6) and rows[("B", "A")]["n_both"] == 3
    # kappa by hand: A and B agree on 8 of 10 (3 both fail, 5 both right); chance agreement
    # 0.4 * 0.4 + 0.6 * 0.6 = 0.52; (0.8 - 0.52) / (1 - 0.52) = 7/12
    ab = rows[("A", "B")]
    assert ab["error_consistency"] == pytest.approx(7 / 12)
    assert (
        ab["ci_low"] < 7 / 12 < ab["ci_high"] and ab["ci_high"] - ab["ci_low"] > 0.3
    )  # 10 examples
    top, bottom = extreme_pairs(t, "jaccard", k=1)
    assert (top[0]["model_a"], top[0]["model_b"]) == ("A", "B") and bottom[0]["jaccard"] == 0


def planted_families(n_families=4, per_family=4, n=5000, seed=0):
    """Each family shares a base failure set; members flip a few of it and add noise."""
    rng = np.random.default_rng(seed)
    rows, names, fams = [], [], {}
    for f in range(n_families):
        base = rng.random(n) < 0.15
        for k in range(per_family):
            own = (base & (rng.random(n) > 0.15)) | (rng.random(n) < 0.03)
            rows.append(own)
            name = f"fam{f}-m{k}"
            names.append(name)
            fams[name] = f"fam{f}"
    order = rng.permutation(len(names))  # families not contiguous
    return np.stack(rows)[order], [names[i] for i in order], fams


@pytest.mark.parametrize("metric", ["jaccard", "error_consistency", "shared_fraction"])
def test_clustering_recovers_planted_families(metric):
    from sklearn.metrics import adjusted_rand_score

    f, names, fams = planted_families()
    st = overlap_statistics(FailureMatrix.from_dense(f, names), n_boot=0)
    sim = similarity_matrix(st, metric)
    truth = [fams[m] for m in names]
    by_count = cluster_models(sim, n_clusters=4)
    assert adjusted_rand_score(truth, by_count) == 1.0
    within = family_similarity(sim, names, fams).to_pylist()[-1]
    by_threshold = cluster_models(sim, threshold=(within["within"] + within["between"]) / 2)
    assert adjusted_rand_score(truth, by_threshold) == 1.0
    assert by_count[0] == 0 and set(by_count) == {0, 1, 2, 3}


def test_family_table_and_clusters_table():
    f, names, fams = planted_families(n_families=2, per_family=3)
    st = overlap_statistics(FailureMatrix.from_dense(f, names), n_boot=0)
    sim = similarity_matrix(st, "jaccard")
    fam = family_similarity(sim, names, fams)
    rows = {r["family"]: r for r in fam.to_pylist()}
    assert set(rows) == {"fam0", "fam1", "*"}
    for r in rows.values():
        assert r["within"] > r["between"] + 0.3 and r["gap"] == pytest.approx(
            r["within"] - r["between"]
        )
    assert rows["fam0"]["n_within_pairs"] == 3 and rows["fam0"]["n_between_pairs"] == 9
    assert rows["*"]["n_within_pairs"] == 6 and rows["*"]["n_between_pairs"] == 9
    labels = cluster_models(sim, n_clusters=2)
    ct = clusters_table(names, fams, labels)
    assert ct.column_names == ["model", "family", "cluster"] and ct.num_rows == 6
    text = format_stats(overlap_table(st), ct, fam)
    assert "cluster 0" in text and "fam0" in text


def test_input_errors_name_the_fix():
    with pytest.raises(ValueError, match="exactly one of threshold"):
        cluster_models(np.eye(3))
    with pytest.raises(ValueError, match="n_clusters must be between"):
        cluster_models(np.eye(3), n_clusters=5)
    with pytest.raises(ValueError, match="unknown similarity"):
        similarity_matrix(
            overlap_statistics(FailureMatrix.from_dense(FAILS, "ABC"), n_boot=0), "cosine"
        )
    with pytest.raises(ValueError, match="2 model names for a failure matrix with 3 rows"):
        FailureMatrix.from_dense(FAILS, ["A", "B"])
    with pytest.raises(ValueError, match="run the sweep first"):
        failure_matrix({})
    assert cluster_models(np.ones((1, 1)), n_clusters=1).tolist() == [0]


def test_pairwise_counts_at_scale():
    """40 models x 1,000,000 examples: all pairwise counts, Jaccard and conditional rates
    (their speed is measured in benchmarks/bench_sweep.py, not asserted here)."""
    from audit.failures import pair_rates

    rng = np.random.default_rng(0)
    packed = rng.integers(0, 256, (40, 125_000), dtype=np.uint8)
    fm = FailureMatrix(tuple(f"m{i}" for i in range(40)), np.arange(1_000_000).astype(str), packed)
    n_fail, n_both = fm.counts()
    rates = pair_rates(n_fail, n_both)
    assert np.all(np.isfinite(rates["jaccard"])) and np.allclose(np.diag(rates["jaccard"]), 1.0)
    assert n_both[3, 3] == n_fail[3] and abs(n_both[0, 1] / 1_000_000 - 0.25) < 0.01


def test_blocked_counts_split_over_an_executor_match_the_dense_product():
    """Ranges of blocks run as separate executor calls (Ray tasks on a cluster) and add up
    to the dense counts, whatever the block size and the padding."""
    from audit.pipeline.executor import SerialExecutor, ThreadExecutor
    from audit.stats_blocks import pair_counts

    rng = np.random.default_rng(5)
    f = rng.random((17, 5_000)) < rng.random((17, 1))  # failure rates from 0 to 1
    fm = FailureMatrix.from_dense(f, [f"m{i}" for i in range(17)])
    want = f.astype(np.int64) @ f.T.astype(np.int64)
    runs = (
        (64, ThreadExecutor(3)),
        (1024, SerialExecutor()),
        (1 << 15, None),
        (128, ThreadExecutor(2)),
    )
    for method in ("auto", "int8", "float32"):
        for block, ex in runs:
            n_fail, n_both = pair_counts(fm.packed, fm.n_examples, block, ex, method=method)
            np.testing.assert_array_equal(n_both, want)
            np.testing.assert_array_equal(n_fail, f.sum(1))
    with pytest.raises(ValueError, match="multiple of 64"):
        pair_counts(fm.packed, fm.n_examples, 100)
    with pytest.raises(ValueError, match="uint8"):
        pair_counts(f, fm.n_examples)
    with pytest.raises(ValueError, match="unknown method"):
        pair_counts(fm.packed, fm.n_examples, method="int4")


def test_bootstrap_in_pair_chunks_bounds_memory_and_keeps_its_intervals():
    """A large zoo's bootstrap runs in chunks of pairs; chunked intervals are seeded and
    agree with the one-chunk intervals up to Monte Carlo error."""
    from unittest import mock

    from audit import stats_blocks
    from audit.stats_blocks import pair_chunks

    assert pair_chunks(10, 1000) == [(0, 10)]
    chunks = pair_chunks(500_500, 1000)
    assert chunks[0] == (0, 4194) and chunks[-1][1] == 500_500 and len(chunks) == 120
    rng = np.random.default_rng(2)
    base = rng.random(3000) < 0.3
    f = np.stack([base ^ (rng.random(3000) < r) for r in (0.05, 0.1, 0.2, 0.4, 0.5)])
    n_fail, n_both = FailureMatrix.from_dense(f, list("abcde")).counts()
    lo, hi = bootstrap_error_consistency(n_fail, n_both, 3000, n_boot=2000, seed=1)

    def small(n_pairs, n_boot):
        return stats_blocks.pair_chunks(n_pairs, n_boot, max_elements=4 * n_boot * 2)

    with mock.patch("audit.failures.overlap.pair_chunks", small):
        lo2, hi2 = bootstrap_error_consistency(n_fail, n_both, 3000, n_boot=2000, seed=1)
        lo3, _ = bootstrap_error_consistency(n_fail, n_both, 3000, n_boot=2000, seed=1)
    np.testing.assert_array_equal(lo2, lo3)
    np.testing.assert_allclose(lo2, lo, atol=0.02)
    np.testing.assert_allclose(hi2, hi, atol=0.02)


def test_group_accuracy_counts_every_class_and_attribute_value_as_masks_would():
    """One pass per class over its slice of the rows sorted by label, checked against the
    plain definition (a mask per class and value) on random data with empty values, classes
    without examples and labels out of order."""
    from audit.predictions import group_accuracy

    rng = np.random.default_rng(7)
    n, classes = 400, ["a", "b", "c", "d", "e"]
    labels = rng.integers(0, 4, n)  # class "e" has no example
    correct = rng.random(n) < 0.6
    attrs = {"color": rng.choice(["red", "blue", ""], n), "bg": rng.choice(["x", "y"], n)}
    got = {
        (r["class"], r["attribute"], r["value"]): (r["n"], r["n_correct"], r["class_accuracy"])
        for r in group_accuracy("m", correct, labels, classes, attrs).to_pylist()
    }
    want = {("*", "*", "*"): (n, int(correct.sum()), correct.mean())}
    for ci, c in enumerate(classes[:4]):
        in_c = labels == ci
        want[(c, "*", "*")] = (int(in_c.sum()), int(correct[in_c].sum()), correct[in_c].mean())
        for a, vals in attrs.items():
            for v in {"red", "blue", "x", "y"} & set(vals[in_c]):
                m = in_c & (vals == v)
                want[(c, a, v)] = (int(m.sum()), int(correct[m].sum()), correct[in_c].mean())
    assert got.keys() == want.keys()
    for key, (cnt, hits, cls_acc) in want.items():
        assert got[key][:2] == (cnt, hits) and np.isclose(got[key][2], cls_acc), key
