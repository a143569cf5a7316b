"""FailureDirections: planted directions, modes, sklearn contract, statuses, p-values, tables."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.svm import SVC

import audit.directions as fdmod
import audit.directions.svm as svmmod
from audit.directions import (
    DIRECTIONS_SCHEMA,
    FailureDirections,
    clusters_from_table,
    decision_from_row,
    direction_similarity,
    directions_table,
    fit_collective,
    fit_directions,
)

FAST = dict(n_permutations=0, n_bootstrap=0, max_modes=1)


def planted(seed=0, n=400, d=32, threshold=0.85):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    correct = ~(X @ u > threshold)  # errors lie along +u
    return X, correct, u


def test_planted_direction_is_recovered():
    X, correct, u = planted()
    est = FailureDirections(n_permutations=20).fit(X, correct)
    m = est.mode(0, 0)
    assert m.status == "ok"
    # the direction points to "easy": errors lie along -direction
    assert -m.direction @ u > 0.9
    # clearly better than chance (0.5), and the interval says so: its low end too
    assert m.cv_score > 0.8 and m.ci_low > 0.7 and m.ci_high - m.ci_low < 0.2
    assert m.p_value <= 0.05
    assert m.n_errors == int((~correct).sum()) and m.n_correct == int(correct.sum())
    dec = est.decision_function(X)
    assert np.mean(dec[~correct] < 0) > 0.8 and np.mean(dec[correct] >= 0) > 0.8


def test_second_planted_mode_is_the_second_direction():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(800, 16))
    u1, u2 = np.eye(16)[0], np.eye(16)[1]
    correct = ~((X @ u1 > 0.85) | (X @ u2 > 1.2))  # a big mode along u1, a smaller one along u2
    est = FailureDirections(n_permutations=20, max_modes=2).fit(X, correct)
    modes = [m for m in est.modes_ if m.label == 0]
    assert [m.status for m in modes] == ["ok", "ok"]
    assert -modes[0].direction @ u1 > 0.75
    assert -modes[1].direction @ u2 > 0.85
    assert -modes[1].direction @ u2 > -modes[1].direction @ u1
    assert np.isfinite(est.intercept_[0, 1])


def test_cv_score_matches_the_papers_reference():
    X, correct, _ = planted(seed=3, n=160, d=24, threshold=0.6)
    est = FailureDirections(**FAST).fit(X, correct)
    Z = fdmod.standardize(X, est.mean_, est.scale_)
    y = correct.astype(int)
    best, best_C = -np.inf, None
    for C in (
        fdmod.DEFAULT_CS
    ):  # the paper's loop: SVC(kernel="linear"), cross_val_score(cv=2), strict '>'
        s = cross_val_score(
            SVC(kernel="linear", C=C, class_weight="balanced"),
            Z,
            y,
            cv=2,
            scoring="balanced_accuracy",
        ).mean()
        if s > best:
            best, best_C = s, C
    m = est.mode(0)
    assert m.cv_score == pytest.approx(best, abs=1e-9)
    assert m.C == best_C
    ref = SVC(kernel="linear", C=best_C, class_weight="balanced").fit(Z, y)
    np.testing.assert_allclose(est.decision_function(X), ref.decision_function(Z), atol=1e-6)


def test_public_svc_fallback_gives_the_same_fit(monkeypatch):
    X, correct, _ = planted(seed=4, n=120, d=16)
    fast = FailureDirections(**FAST).fit(X, correct)
    monkeypatch.setattr(svmmod, "_LOWLEVEL", False)
    slow = FailureDirections(**FAST).fit(X, correct)
    assert slow.mode(0).cv_score == pytest.approx(fast.mode(0).cv_score, abs=1e-12)
    np.testing.assert_allclose(slow.coef_, fast.coef_, atol=1e-6)


def test_clone_and_pipeline():
    X, correct, u = planted(seed=1, n=300)
    est = FailureDirections(Cs=[0.01, 0.1, 1.0], max_modes=2, n_permutations=5, random_state=3)
    c = clone(est)
    assert c.get_params() == est.get_params() and not hasattr(c, "modes_")
    labels = np.arange(len(X)) % 2
    pipe = Pipeline([("id", FunctionTransformer()), ("fd", FailureDirections(**FAST))])
    pipe.fit(X, correct, fd__labels=labels)
    fd = pipe.named_steps["fd"]
    assert list(fd.classes_) == [0, 1] and fd.coef_.shape == (2, 1, X.shape[1])
    one = Pipeline([("id", FunctionTransformer()), ("fd", FailureDirections(**FAST))]).fit(
        X, correct
    )
    dec = one.decision_function(X)
    assert dec.shape == (len(X),) and np.isfinite(dec).all()
    assert clone(pipe).get_params()["fd__max_modes"] == 1


def test_classes_without_errors_or_correct_get_a_status():
    X, correct, _ = planted(seed=2, n=300)
    labels = np.repeat([0, 1, 2], 100)
    correct = correct.copy()
    correct[labels == 1] = True  # no errors
    correct[labels == 2] = False  # no correct examples
    correct[200:205] = True
    est = FailureDirections(**FAST).fit(X, correct, labels)
    status = {m.label: m.status for m in est.modes_}
    assert status[1] == "insufficient_errors" and status[2] == "insufficient_correct"
    dec = est.decision_function(X, labels)
    assert np.isnan(dec[labels == 1]).all() and np.isfinite(dec[labels == 0]).all()
    t = directions_table({"m": est}, ["a", "b", "c"])
    assert t.schema == DIRECTIONS_SCHEMA
    rows = {r["class"]: r for r in t.to_pylist()}
    assert rows["b"]["direction"] is None and rows["b"]["n_errors"] == 0


def test_p_value_small_for_real_and_large_for_random_labels():
    X, correct, _ = planted(seed=5)
    assert FailureDirections(n_permutations=20).fit(X, correct).mode(0).p_value <= 0.05
    rng = np.random.default_rng(0)
    random_correct = rng.permutation(correct)
    m = FailureDirections(n_permutations=20).fit(X, random_correct).mode(0)
    assert m.p_value > 0.1 and m.status == "not_significant"


def test_bad_inputs_name_the_fix():
    X, correct, _ = planted(n=50, d=4)
    with pytest.raises(ValueError, match="correct must be"):
        FailureDirections().fit(X, correct[:-1])
    with pytest.raises(ValueError, match="labels must be"):
        FailureDirections().fit(X, correct, labels=np.zeros(3))
    with pytest.raises(ValueError, match="Cs must be"):
        FailureDirections(Cs=[-1.0]).fit(X, correct)
    with pytest.raises(ValueError, match="X_stats"):
        FailureDirections().fit(X, correct, X_stats=np.zeros((5, 3)))


def test_many_models_clusters_table_and_similarity():
    rng = np.random.default_rng(7)
    n, d = 400, 24
    X = rng.normal(size=(n, d))
    labels = np.arange(n) % 2
    u, v = np.eye(d)[0], np.eye(d)[1]
    by_model = {
        "a1": ~(X @ u + 0.2 * rng.normal(size=n) > 0.9),
        "a2": ~(X @ u + 0.2 * rng.normal(size=n) > 0.9),
        "b1": ~(X @ v + 0.2 * rng.normal(size=n) > 0.9),
    }
    est = FailureDirections(n_permutations=0, n_bootstrap=50, max_modes=1)
    fitted = fit_directions(X, by_model, labels, estimator=est, X_stats=X[:200])
    clusters = clusters_from_table(
        __import__("pyarrow").table({"model": ["a1", "a2", "b1"], "cluster": [0, 0, 1]})
    )
    fitted.update(fit_collective(X, by_model, clusters, labels, estimator=est, X_stats=X[:200]))
    assert set(fitted) == {"a1", "a2", "b1", "cluster:0", "cluster:1"}
    assert -fitted["cluster:0"].mode(0).direction @ u > 0.9
    t = directions_table(fitted, ["even", "odd"])
    assert t.num_rows == 10 and set(t["status"].to_pylist()) == {"ok"}
    row = next(r for r in t.to_pylist() if r["scope"] == "a1" and r["class"] == "odd")
    np.testing.assert_allclose(
        decision_from_row(row, X[labels == 1]),
        fitted["a1"].decision_function(X[labels == 1], labels[labels == 1]),
        atol=1e-4,
    )
    sim = {
        (r["class"], r["scope_a"], r["scope_b"]): r["cosine"]
        for r in direction_similarity(t).to_pylist()
    }
    assert sim[("even", "a1", "a2")] > 0.8 and abs(sim[("even", "a1", "b1")]) < 0.4


def test_threads_give_the_same_fit():
    X, correct, _ = planted(seed=8, n=300)
    labels = np.arange(len(X)) % 3
    one = FailureDirections(n_permutations=3, max_modes=1).fit(X, correct, labels)
    two = FailureDirections(n_permutations=3, max_modes=1, n_jobs=2).fit(X, correct, labels)
    np.testing.assert_allclose(one.coef_, two.coef_)
    np.testing.assert_allclose(one.p_value_, two.p_value_)


def _scripted_fitter(exceed, **params):
    """A mode fitter whose permutation scores exceed the observed one at the draws in
    ``exceed`` (0-based) and nowhere else; ``draws`` counts the permutations run."""
    from audit.directions.fitter import _ModeFitter

    est = FailureDirections(**params)
    fitter = _ModeFitter(np.zeros((10, 2)), None, est, np.random.default_rng(0))
    draws = []

    def cv(err, grid, folds):
        draws.append(1)
        return np.array([1.0 if len(draws) - 1 in exceed else 0.0]), None, None

    fitter.cv = cv
    return fitter, draws


def test_a_p_value_near_alpha_is_resolved_with_more_permutations():
    """Two chance exceedances in 50 draws put p at 3/51 = 0.059 for a mode whose p is far
    smaller: the test goes on (twice as many at a time) until it is clear; clear cases cost no
    more, and max_permutations = n_permutations keeps the old single draw."""
    args = (np.zeros(10), np.zeros(10, int), 1.0, 0.5)
    fitter, draws = _scripted_fitter({3, 40}, n_permutations=50)
    assert fitter.p_value(*args) == pytest.approx(3 / 201) and len(draws) == 200
    fitter, draws = _scripted_fitter({3, 40}, n_permutations=50, max_permutations=50)
    assert fitter.p_value(*args) == pytest.approx(3 / 51) and len(draws) == 50
    fitter, draws = _scripted_fitter({3, 40}, n_permutations=50)  # no sign of a pattern
    assert fitter.p_value(*args, resolve=False) == pytest.approx(3 / 51) and len(draws) == 50
    fitter, draws = _scripted_fitter(set(), n_permutations=50)  # clearly significant
    assert fitter.p_value(*args) == pytest.approx(1 / 51) and len(draws) == 50
    fitter, draws = _scripted_fitter({0, 1, 2}, n_permutations=50)  # clearly not
    assert fitter.p_value(*args) == pytest.approx(1.0) and len(draws) == 3
    # exceedances that stay near alpha: resolved up to the limit (16 x 50), then decided there
    fitter, draws = _scripted_fitter(set(range(0, 800, 20)), n_permutations=50)
    assert fitter.p_value(*args) == pytest.approx(41 / 801) and len(draws) == 800
    with pytest.raises(ValueError, match="max_permutations"):
        FailureDirections(max_permutations=-1).fit(np.zeros((20, 2)), np.ones(20, bool))
