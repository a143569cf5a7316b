"""The torch head solver against the scipy one it replaced, the rows a fit moves, and the
device it runs on (the CUDA test is ``gpu``-marked and skipped without CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone

from audit.mitigate.classes import active_classes, confusion_mass, weakest_classes
from audit.mitigate.head import LinearHead, resolve_device
from audit.mitigate.reference import ScipyHead


def anchored_problem(n=800, c=12, d=16, seed=0):
    """Gaussian classes, an imperfect anchor head and random example weights."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(c, d))
    y = rng.integers(0, c, n)
    X = mu[y] + rng.normal(size=(n, d))
    return X, y, rng.random(n), 0.5 * mu, 0.1 * rng.normal(size=c)


def objective(X, y, w, W, b, W0, alpha):
    """The head's objective and its gradient in W, by hand in float64 numpy."""
    w = w / w.sum()
    Z = X @ W.T + b
    Z -= Z.max(1, keepdims=True)
    P = np.exp(Z) / np.exp(Z).sum(1, keepdims=True)
    Y = np.eye(len(W))[y]
    loss = -(w * np.log(P[np.arange(len(y)), y])).sum() + 0.5 * alpha * ((W - W0) ** 2).sum()
    return loss, ((P - Y) * w[:, None]).T @ X + alpha * (W - W0)


def test_torch_solver_agrees_with_the_scipy_solver_it_replaced():
    X, y, w, W0, b0 = anchored_problem()
    kw = dict(alpha=1e-2, max_iter=500)
    t = LinearHead(**kw).fit(X, y, w, W0, b0)
    s = ScipyHead(**kw).fit(X, y, w, W0, b0)
    np.testing.assert_allclose(t.coef_, s.coef_, atol=2e-3)
    np.testing.assert_allclose(t.intercept_, s.intercept_, atol=2e-3)
    assert np.mean(t.predict(X) == s.predict(X)) >= 0.995
    lt = objective(X, y, w, t.coef_, t.intercept_, W0, 1e-2)[0]
    ls = objective(X, y, w, s.coef_, s.intercept_, W0, 1e-2)[0]
    assert lt == pytest.approx(ls, abs=1e-6)
    assert t.active_.tolist() == list(range(12)) and t.n_iter_ > 0
    assert clone(t).get_params() == {**kw, "tol": 1e-7, "device": None}


def test_a_restricted_fit_freezes_the_other_rows_at_their_optimum():
    """Moving rows 1, 3, 5 only: the others are the anchor's, and the full objective's
    gradient vanishes on the rows that moved (first-order optimality, checked by hand)."""
    X, y, w, W0, b0 = anchored_problem()
    A = [5, 1, 3, 3]
    h = LinearHead(alpha=1e-2, max_iter=500).fit(X, y, w, W0, b0, active=A)
    assert h.active_.tolist() == [1, 3, 5]
    frozen = np.setdiff1d(np.arange(12), A)
    assert np.array_equal(h.coef_[frozen], W0[frozen])
    assert np.array_equal(h.intercept_[frozen], b0[frozen])
    given = LinearHead(alpha=1e-2, max_iter=500).fit(
        X, y, w, W0, b0, active=A, init_logits=X @ W0.T + b0
    )  # the frozen rows' terms read from the caller's logits: the same fit
    np.testing.assert_allclose(given.coef_, h.coef_, atol=1e-6)
    loss, grad = objective(X, y, w, h.coef_, h.intercept_, W0, 1e-2)
    assert np.abs(grad[h.active_]).max() < 1e-5 and np.abs(grad[frozen]).max() > 1e-3
    assert loss < objective(X, y, w, W0, b0, W0, 1e-2)[0]
    with pytest.raises(ValueError, match="active"):
        LinearHead().fit(X, y, w, W0, b0, active=[12])
    with pytest.raises(ValueError, match="every class"):
        ScipyHead().fit(X, y, w, W0, b0, active=[1])


def test_confusions_pick_the_rows_a_planted_failure_moves():
    """Class 0 is confused with 4 (mass 0.5 + 0.3) and 2 (0.2); the cap takes the focus
    class first, then each focus class's main confusions in turns."""
    proba = np.array([[0.3, 0, 0.2, 0, 0.5], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0.3, 0, 0, 0, 0.7]])
    labels = np.array([0, 1, 2, 4])
    m = confusion_mass(proba, labels, 0)
    np.testing.assert_allclose(m, [0, 0, 0.2, 0, 0.8])
    masses = {0: m, 1: np.array([0, 0, 0, 0.1, 0])}
    assert active_classes([0], masses, cap=2, n_classes=5).tolist() == [0, 4]
    assert active_classes([0, 1], masses, cap=4, n_classes=5).tolist() == [0, 1, 3, 4]
    assert active_classes([0], masses, cap=4, n_classes=5).tolist() == [0, 2, 4]  # mass > 0 only
    assert active_classes([0], masses, cap=5, n_classes=5) is None  # every class: no restriction
    assert active_classes([0], masses, cap=0, n_classes=5) is None
    correct = np.array([True, False, False, False, True])
    assert weakest_classes(correct, np.array([0, 3, 3, 1, 1]), 2).tolist() == [3, 1]


def test_restricted_fit_fixes_a_planted_failure_among_many_classes():
    """100 classes; a subgroup of class 7 sits on class 9's side. Moving 7 and its main
    confusions (from the anchor's probabilities) fixes it as well as moving every row."""
    rng = np.random.default_rng(0)
    C, D, n = 100, 32, 2000
    mu = 3 * rng.normal(size=(C, D)) / np.sqrt(D)
    y = rng.integers(0, C, n)
    X = mu[y] + 0.3 * rng.normal(size=(n, D))
    W0, b0 = mu.copy(), -0.5 * (mu**2).sum(1)
    sub = 0.6 * mu[9] + 0.4 * mu[7] + 0.5 * np.eye(D)[0] * 3
    Xs = sub + 0.3 * rng.normal(size=(300, D))
    before = np.mean((Xs[:150] @ W0.T + b0).argmax(1) == 7)
    Xf, yf = np.concatenate([X, Xs[150:]]), np.r_[y, np.full(150, 7)]
    w = np.r_[np.full(n, 0.5 / n), np.full(150, 0.5 / 150)]
    fit_split = np.concatenate([X[:1000], Xs[:150]])  # the split the failure was found on
    Z = fit_split @ W0.T + b0
    P = np.exp(Z - Z.max(1, keepdims=True))
    masses = {7: confusion_mass(P / P.sum(1, keepdims=True), np.r_[y[:1000], [7] * 150], 7)}
    A = active_classes([7], masses, 8, C)
    fits = {
        k: LinearHead(max_iter=100).fit(Xf, yf, w, W0, b0, active=a)
        for k, a in (("all", None), ("some", A))
    }
    acc = {k: np.mean(h.predict(Xs[:150]) == 7) for k, h in fits.items()}
    assert before < 0.2 and 9 in A and len(A) == 8
    assert acc["some"] >= 0.8 and acc["some"] >= acc["all"] - 0.05, (acc, before)
    kept = {k: np.mean(h.predict(X) == y) for k, h in fits.items()}
    assert kept["some"] >= np.mean((X @ W0.T + b0).argmax(1) == y) - 0.01, kept


def test_the_device_comes_from_the_features_or_what_the_machine_has(monkeypatch):
    import torch

    X, y, w, W0, b0 = anchored_problem(n=200)
    assert resolve_device(torch.zeros(2, 2)) == torch.device("cpu")
    assert resolve_device(X, "cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(X) == torch.device("cuda")
    assert resolve_device(torch.zeros(2, 2)) == torch.device("cpu")  # the tensor's own device
    monkeypatch.undo()
    a = LinearHead(max_iter=50, device="cpu").fit(X, y, w, W0, b0)
    b = LinearHead(max_iter=50).fit(torch.as_tensor(X), torch.as_tensor(y), w, W0, b0)
    np.testing.assert_allclose(a.coef_, b.coef_, atol=1e-6)


@pytest.mark.gpu
def test_the_head_fits_on_cuda_as_on_the_cpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    X, y, w, W0, b0 = anchored_problem(n=2000, c=50, d=64)
    cpu = LinearHead(alpha=1e-2, max_iter=300, device="cpu").fit(X, y, w, W0, b0, active=[1, 2, 3])
    Xg = torch.as_tensor(X, device="cuda")
    gpu = LinearHead(alpha=1e-2, max_iter=300).fit(Xg, y, w, W0, b0, active=[1, 2, 3])
    assert gpu.coef_.dtype == np.float64 and isinstance(gpu.coef_, np.ndarray)
    np.testing.assert_allclose(gpu.coef_, cpu.coef_, atol=2e-3)
    assert np.mean(gpu.predict(Xg) == cpu.predict(X)) >= 0.995


def test_model_data_predicts_a_restricted_head_from_the_cached_logits():
    """The stage's fast path (the original logits, the moved rows recomputed) predicts what
    the head itself predicts, and a fit moves the hard class and its confusions only."""
    from audit.mitigate.task import ModelData, Setting
    from audit.pipeline.config import MitigateSection

    X, y, _, W0, b0 = anchored_problem(n=900, c=12)
    F = {"train": X[:300], "debug": X[300:600], "test": X[600:]}
    Y = {"train": y[:300], "debug": y[300:600], "test": y[600:]}
    cfg = MitigateSection(head_classes=4, max_iter=30)
    data = ModelData(F, Y, {}, (W0, b0), cfg, Setting("debug", "test", 4), hard=[5])
    head = data.fit(X[:20], np.full(20, 2), lam=0.5)
    assert {2, 5} <= set(head.active_.tolist()) and len(head.active_) == 4
    assert np.array_equal(data.predict(head, "test"), head.predict(F["test"]))
    assert data.active() is not None and 5 in data.active()
    everything = ModelData(F, Y, {}, (W0, b0), MitigateSection(head_classes=12), data.setting)
    assert everything.active() is None and len(everything.fit().active_) == 12


def test_small_fits_on_several_threads_leave_torch_threads_as_they_were():
    """Small CPU fits run on one torch thread (a setting of the whole process): fits on a
    thread pool restore it once the last one is done."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    X, y, w, W0, b0 = anchored_problem(n=200)
    before = torch.get_num_threads()
    with ThreadPoolExecutor(4) as pool:
        heads = list(pool.map(lambda _: LinearHead(max_iter=20).fit(X, y, w, W0, b0), range(8)))
    assert torch.get_num_threads() == before
    assert all(np.array_equal(h.coef_, heads[0].coef_) for h in heads)
