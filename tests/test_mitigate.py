"""Head retraining and its evaluation: estimators on arrays with planted answers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone

from audit.mitigate import (
    LinearHead,
    choose,
    mix_weights,
    paired_gain,
    select_lowest,
    select_random,
)


def planted_features(n: int = 600, seed: int = 0):
    """3 classes in 4-d; class 2 has a rare subgroup (feature 3 set) that looks like class 0
    on features 0-2, so a head fit on the common examples misclassifies it."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    X = rng.normal(0, 0.3, (n, 4))
    X[np.arange(n), y] += 2.0
    rare = (y == 2) & (rng.random(n) < 0.15)
    X[rare, 2] -= 2.0
    X[rare, 0] += 2.0
    X[rare, 3] += 2.0
    return X, y, rare


def test_linear_head_matches_logistic_regression_and_keeps_the_sklearn_contract():
    from sklearn.linear_model import LogisticRegression

    X, y, _ = planted_features()
    h = LinearHead(alpha=1e-2).fit(X, y)
    ref = LogisticRegression(C=1 / (1e-2 * len(X)), max_iter=1000).fit(
        X, y
    )  # same objective, sklearn's scaling
    assert np.mean(h.predict(X) == ref.predict(X)) > 0.99
    assert clone(h).get_params() == {"alpha": 1e-2, "max_iter": 200, "tol": 1e-7}
    with pytest.raises(ValueError, match="labels"):
        LinearHead().fit(X, y + 5, n_classes=3)


def test_anchor_keeps_the_initial_head_and_targeted_data_fixes_the_subgroup():
    X, y, rare = planted_features()
    common = ~rare
    base = LinearHead(alpha=1e-3).fit(X[common], y[common])
    acc_rare = lambda h: float(np.mean(h.predict(X[rare]) == 2))  # noqa: E731
    assert acc_rare(base) < 0.3  # the planted failure
    # a very strong anchor: the retrained head is the initial one
    same = LinearHead(alpha=1e6).fit(
        X[common], y[common], coef_init=base.coef_, intercept_init=base.intercept_
    )
    np.testing.assert_allclose(same.coef_, base.coef_, atol=1e-3)
    # 20 "synthetic" examples of the subgroup with weight lambda fix it, the rest stays
    rng = np.random.default_rng(1)
    Xs = rng.normal(0, 0.3, (20, 4)) + np.array([2.0, 0, 0, 2.0])
    ys = np.full(20, 2)
    w = mix_weights(int(common.sum()), 20, 0.3)
    fixed = LinearHead(alpha=1e-3).fit(
        np.concatenate([X[common], Xs]),
        np.concatenate([y[common], ys]),
        w,
        base.coef_,
        base.intercept_,
    )
    assert acc_rare(fixed) > 0.9
    assert (
        np.mean(fixed.predict(X[common]) == y[common])
        >= np.mean(base.predict(X[common]) == y[common]) - 0.01
    )


def test_mix_weights_and_selections():
    w = mix_weights(8, 2, 0.25)
    assert (
        w.sum() == pytest.approx(1.0)
        and w[:8].sum() == pytest.approx(0.75)
        and w[8:].sum() == pytest.approx(0.25)
    )
    assert mix_weights(4, 0, 0.5).tolist() == [0.25] * 4
    with pytest.raises(ValueError, match="lambda"):
        mix_weights(4, 2, 1.0)
    assert select_lowest(np.array([3.0, -1.0, 2.0, -1.0]), 2).tolist() == [1, 3]
    r = select_random(100, 10, seed=3)
    assert len(set(r.tolist())) == 10 and r.tolist() == select_random(100, 10, seed=3).tolist()


def test_choose_respects_the_overall_constraint_and_reports_every_try():
    scores = {"a": (0.5, 0.90), "b": (0.9, 0.80), "c": (0.7, 0.899)}
    best, tried = choose(["a", "b", "c"], lambda c: scores[c], baseline_overall=0.9, max_drop=0.005)
    assert best == "c" and [t[0] for t in tried] == ["a", "b", "c"]
    best, _ = choose(
        ["b"], lambda c: scores[c], baseline_overall=0.9
    )  # none keeps it: the least drop
    assert best == "b"


def test_paired_gain_interval_covers_the_gain():
    before = np.r_[np.zeros(50), np.ones(50)]
    after = np.ones(100)
    g, lo, hi = paired_gain(before, after, n_boot=500)
    assert g == pytest.approx(0.5) and lo < 0.5 < hi and lo > 0.3
    assert all(np.isnan(v) for v in paired_gain(np.zeros(0), np.zeros(0)))


LEARNING_ZOO = """
name = "learning"
[defaults]
builder = "timm"
weights = "train"
input = { input_size = 16, mean = [0.5, 0.5, 0.5], std = [0.25, 0.25, 0.25] }
train = { epochs = 8, batch_size = 32, lr = 0.005 }

[[models]]
name = "small-a"
family = "resnet"
arch = "resnet18"
kwargs = { layers = [1, 1, 1, 1], channels = [8, 16, 16, 16], stem_width = 8 }

[[models]]
name = "small-b"
family = "resnet"
arch = "resnet18"
kwargs = { layers = [1, 1, 1, 1], channels = [8, 16, 16, 16], stem_width = 8 }
train = { seed = 1 }
"""


@pytest.fixture(scope="module")
def mitigated(tmp_path_factory, tiny_world):
    """The tiny world through every stage on threads; tiny models trained for seconds have no
    significant direction, so every mode-0 direction is marked significant after the
    directions stage, which makes generate and mitigate do their whole job."""
    import pyarrow as pa
    from test_runner import RecordingGenerator, threads, write_config

    from audit.pipeline import runner
    from audit.pipeline.config import load_config
    from audit.pipeline.inputs import RunInputs, load_inputs
    from audit.store import RunStore

    root = tmp_path_factory.mktemp("mitigate")
    (root / "zoo.toml").write_text(LEARNING_ZOO)
    cfg = load_config(
        write_config(
            root / "audit.toml",
            f'path = "{tiny_world}"',
            str(root / "zoo.toml"),
            "[report]\nenabled = false\n[generate]\nk = 4\nprobe_k = 8\n[mitigate]\nlambdas = [0.25, 0.5]\npool_k = 10\nk_nearest = 10\nn_boot = 100\n",
        )
    )
    store = RunStore(str(root / "run"))

    def significant(store_, inputs, section):
        from audit.pipeline.directions import directions_stage

        line = directions_stage(store_, inputs, section)
        t = store_.read_table("directions.parquet")
        rows = [
            {**r, "status": "ok" if r["mode"] == 0 and r["direction"] is not None else r["status"]}
            for r in t.to_pylist()
        ]
        store_.write_table("directions.parquet", pa.Table.from_pylist(rows, schema=t.schema))
        return line

    stages = [
        runner.Stage(**{**s.__dict__, "fn": significant}) if s.name == "directions" else s
        for s in runner.default_stages()
    ]
    base = load_inputs(cfg)
    inputs = RunInputs(
        cfg,
        base.data,
        base.data_key,
        base.world_dir,
        base.zoo,
        threads(RecordingGenerator(world_dir=tiny_world, store=store)),
    )
    out = runner.run_pipeline(store, inputs, stages=stages, console=lambda s: None)
    assert out.failed is None, out.failed
    return store, inputs, stages


def test_mitigate_stage_writes_every_method_and_confirmation(mitigated):
    from audit.pipeline.mitigate import METHODS

    store, inputs, _ = mitigated
    t = store.read_table("mitigation.parquet").to_pylist()
    assert {r["method"] for r in t} == set(METHODS)
    assert {r["model"] for r in t} == {"small-a", "small-b"}
    assert {r["eval"] for r in t} == {"nearest_caption"} | (
        {"planted"} if any(r["eval"] == "planted" for r in t) else set()
    )
    for r in t:
        assert (
            r["gain"] == pytest.approx(r["hard_after"] - r["hard_before"])
            and r["gain_ci_low"] <= r["gain"] <= r["gain_ci_high"]
        )
        assert (r["scope"].startswith("cluster:")) == (r["method"] == "synthetic_cluster")
    syn = [r for r in t if r["method"] == "synthetic"]
    assert all(
        r["lambda"] in (0.25, 0.5) and "chose lambda" in r["choice"] and r["n_added"] > 0
        for r in syn
    )
    assert all(r["lambda"] == 0.0 and r["n_added"] == 0 for r in t if r["method"] == "control")
    conf = store.read_table("confirmations.parquet").to_pylist()
    assert conf and all(r["n_images"] == 8 for r in conf)
    assert all(
        r["counterfactual_caption"] != r["caption"] for r in conf if r["counterfactual_caption"]
    )
    assert any(r["counterfactual_caption"] for r in conf)


def test_eval_split_is_never_used_for_a_choice(mitigated, monkeypatch):
    """Scrambling the eval split's labels changes the measured gains, never what was chosen."""
    from audit.pipeline.inputs import RunInputs

    store, inputs, stages = mitigated
    before = {
        (r["model"], r["method"]): (r["lambda"], r["n_added"], r["choice"])
        for r in store.read_table("mitigation.parquet").to_pylist()
    }
    table = inputs.data.table
    split = table["split"].to_numpy(zero_copy_only=False)
    labels = table["label"].to_numpy().copy()
    ev = np.flatnonzero(split == inputs.eval_split)
    labels[ev] = np.random.default_rng(0).permutation(labels[ev])
    from audit.data.table import ImageTable

    scrambled = ImageTable(
        table.set_column(table.schema.get_field_index("label"), "label", pa_array(labels)),
        inputs.data.classes,
    )
    inputs2 = RunInputs(
        inputs.config, scrambled, inputs.data_key, inputs.world_dir, inputs.zoo, inputs.services
    )
    from audit.pipeline.mitigate import mitigate_stage

    mitigate_stage(store, inputs2, inputs.config.mitigate)
    after = {
        (r["model"], r["method"]): (r["lambda"], r["n_added"], r["choice"])
        for r in store.read_table("mitigation.parquet").to_pylist()
    }
    assert after == before


def pa_array(values):
    import pyarrow as pa

    return pa.array(values.astype(np.int32))
