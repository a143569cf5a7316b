"""Failure directions for every model x class: FailureDirections vs the paper's serial loop.

The reference is written the way MadryLab/failure-directions fits its per-class SVMs:
whiten with the statistics of the embeddings, L2-normalise, and per model and class loop
over C in logspace(-6, 0, 7) with ``cross_val_score(SVC(kernel="linear",
class_weight="balanced"), cv=2, scoring=balanced accuracy)`` plus a refit per C, keeping
the first best. Both run on the same embeddings: a run directory's cached embeddings and
predictions when present (``--run``), else synthetic ones of the demo's size (12 models x
6 classes x 300 examples, D=256) with planted failure directions.

Reported: wall time of each (the fast one warmed up and repeated, median), the speed
ratio (target >= 10x) and the largest |CV score difference| (target < 0.01); then the
full default estimator (CI, permutation p-values, several modes) for scale; then the audit's
settings (50 permutations, 2 modes) with p-values near alpha resolved by more permutations
(``max_permutations`` 800) against the single draw of 50: the time ratio and the modes whose
status the draw decided.

    python benchmarks/bench_directions.py [--run runs/demo] [--synthetic] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import warnings

import numpy as np
from _common import machine_line, median_time, ratio, timed


def synthetic(n_models=12, n_classes=6, per_class=300, dim=256, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_classes * per_class, dim)).astype(np.float32)
    labels = np.repeat(np.arange(n_classes), per_class)
    class_dirs = rng.normal(size=(n_classes, dim))
    correct = {}
    for m in range(n_models):
        # models share a class's failure direction in part (as architectures of a family do)
        u = class_dirs[labels] + 0.7 * rng.normal(size=(n_classes, dim))[labels]
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        s = np.einsum("nd,nd->n", X, u)
        p_err = 1 / (1 + np.exp(-(-2.0 + 1.5 * s)))
        correct[f"model{m:02d}"] = rng.random(len(X)) > p_err
    return X, labels, correct, "synthetic"


def _vectors(table) -> tuple[list[str], np.ndarray]:
    names = table.column_names
    col = "vector" if "vector" in names else [c for c in names if c != "example_id"][0]
    return table["example_id"].to_pylist(), np.asarray(table[col].to_pylist(), np.float32)


def _correct(view, models: list[str], pos: dict) -> tuple[dict, list, dict]:
    """``({model: correct [N]}, example ids, {id: label})`` on the ids that have embeddings and
    predictions (the first model's order); a model missing one of them is left out."""
    correct, labels, keep_ids = {}, None, None
    for m in models:
        pt = view.table(f"predictions/model={m}", ["example_id", "label", "correct"])
        pid = pt["example_id"].to_pylist()
        if keep_ids is None:
            keep_ids = [e for e in pid if e in pos]
            labels = dict(zip(pid, pt["label"].to_pylist(), strict=True))
        c = dict(zip(pid, pt["correct"].to_pylist(), strict=True))
        if all(e in c for e in keep_ids):
            correct[m] = np.asarray([c[e] for e in keep_ids])
    return correct, keep_ids, labels


def from_run(run: str, embedder: str | None, split: str = ""):
    """(X, labels, {model: correct}, description) from a run directory (read through RunView:
    its embedder is the run's ``[directions] embedder`` unless given; ``split``: that split's
    examples only, e.g. the fit split the audit's directions are fitted on), or None if absent."""
    from audit.view import RunView

    if not os.path.isdir(run):  # RunStore would create it
        return None
    try:
        view = RunView.open(run)
    except FileNotFoundError:  # not a run (yet): the synthetic data instead
        return None
    listed = view.store.listdir("embeddings")
    embs = [e.split("=", 1)[1] for e in listed if e.startswith("embedder=")]
    models = sorted(m for m in view.zoo_models if view.has(f"predictions/model={m}"))
    if not embs or not models:
        return None
    own = view.config.directions.embedder
    name = embedder or (own if own in embs else embs[0])
    ids, V = _vectors(view.table(f"embeddings/embedder={name}"))
    pos = {e: i for i, e in enumerate(ids)}
    if split:
        keep = set(view.data.split(split).example_ids.astype(str).tolist())
        pos = {e: i for e, i in pos.items() if e in keep}
    correct, keep_ids, labels = _correct(view, models, pos)
    if not keep_ids or not correct:
        return None
    X = V[[pos[e] for e in keep_ids]]
    y = np.asarray([labels[e] for e in keep_ids])
    return X, y, correct, f"run {run} (embedder {name}{f', {split} split' if split else ''})"


def reference(X, labels, correct, Cs):
    """The paper's code path: serial per model and class, cross_val_score per C, refit per C."""
    from sklearn import metrics
    from sklearn.model_selection import cross_val_score
    from sklearn.svm import SVC

    mean = X.mean(axis=0)
    std = (X - mean).std(axis=0, ddof=1)  # torch's std, as SVMPreProcessing.update_stats
    Z = (X - mean) / std
    Z = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    scorer = metrics.make_scorer(metrics.balanced_accuracy_score)
    out = {}
    for name, c in correct.items():
        for k in np.unique(labels):
            mask = labels == k
            x, gt = Z[mask], c[mask].astype(int)
            if min(np.bincount(gt, minlength=2)) < 2:
                continue
            best = -np.inf
            for C in Cs:
                clf = SVC(gamma="auto", kernel="linear", C=C, class_weight="balanced")
                score = np.mean(cross_val_score(clf, x, gt, cv=2, scoring=scorer))
                clf.fit(x, gt)
                if score > best:
                    best = score
            out[name, int(k)] = best
    return out


def _args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--run", default="runs/demo", help="run directory with embeddings/ and predictions/"
    )
    ap.add_argument("--embedder", default=None, help="default: the run's [directions] embedder")
    ap.add_argument("--synthetic", action="store_true", help="ignore any run directory")
    ap.add_argument("--split", default="", help="that split of the run only (e.g. debug)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--n-jobs", type=int, default=2, help="threads for the extra threaded timing")
    return ap.parse_args(argv)


def same_work_estimator():
    """FailureDirections doing the reference's work: one mode, no interval, no p-value."""
    from audit.directions import FailureDirections

    return FailureDirections(
        max_modes=1, n_permutations=0, n_bootstrap=0, min_errors=2, min_correct=2
    )


def same_work(X, labels, correct, repeat: int) -> float:
    """The reference and FailureDirections doing the same work (1 mode, no p-value); prints
    both, their ratio and the largest CV score difference; returns the reference's seconds."""
    from audit.directions import DEFAULT_CS, fit_directions

    comparable = same_work_estimator()
    first = {k: v[:200] for k, v in list(correct.items())[:1]}
    fit_directions(X[:200], first, labels[:200], estimator=comparable)  # warm-up
    ref, t_ref = timed(lambda: reference(X, labels, correct, DEFAULT_CS))
    fitted, t_fast, n = median_time(
        lambda: fit_directions(X, correct, labels, estimator=comparable), repeat
    )
    diffs = [
        abs(fitted[m].mode(k).cv_score - s)
        for (m, k), s in ref.items()
        if fitted[m].mode(k).direction is not None
    ]
    print(
        f"reference (serial SVC + cross_val_score per C, {len(ref)} model x class pairs): {t_ref:8.2f} s"
    )
    print(
        f"FailureDirections, same work (1 mode, no p-value), serial:            {t_fast:8.2f} s  (median of {n})"
    )
    print(
        f"speed ratio: {ratio(t_ref, t_fast)}   max |CV score difference|: {max(diffs):.2e} over {len(diffs)} pairs"
    )
    return t_ref


def threaded_and_full(X, labels, correct, t_ref: float, n_jobs: int) -> None:
    """The same work on ``n_jobs`` threads, then the full default estimator, against the reference."""
    from audit.directions import FailureDirections, fit_directions

    comparable = same_work_estimator()
    _, t_thr = timed(
        lambda: fit_directions(X, correct, labels, estimator=comparable, n_jobs=n_jobs)
    )
    print(f"same work, {n_jobs} threads: {t_thr:.2f} s ({ratio(t_ref, t_thr)})")
    full, t_full = timed(lambda: fit_directions(X, correct, labels))
    modes = [m for f in full.values() for m in f.modes_]
    n_ok = sum(m.status == "ok" for m in modes)
    n_pairs = len(correct) * len(np.unique(labels))
    default = FailureDirections()
    print(
        f"full default (CI, {default.n_permutations} permutations, up to {default.max_modes} modes), serial: "
        f"{t_full:.2f} s ({ratio(t_ref, t_full)} vs the reference that does less); {len(modes)} rows, {n_ok} ok, "
        f"{sum(m.mode > 0 and m.status == 'ok' for m in modes)} further modes ok, {n_pairs} pairs"
    )


def permutation_resolution(X, labels, correct, n: int = 50, limit: int = 800) -> None:
    """The audit's directions with p-values near alpha resolved (up to ``limit`` permutations)
    against one draw of ``n``: time ratio, modes whose status differs, p-values extended."""
    from audit.directions import FailureDirections, fit_directions

    def fit(max_permutations):
        est = FailureDirections(max_modes=2, n_permutations=n, max_permutations=max_permutations)
        return fit_directions(X, correct, labels, estimator=est)

    one, t_one = timed(lambda: fit(n))
    res, t_res = timed(lambda: fit(limit))
    a = {(m, x.label, x.mode): x for m, f in one.items() for x in f.modes_}
    b = {(m, x.label, x.mode): x for m, f in res.items() for x in f.modes_}
    near = [k for k, x in a.items() if 0.025 < x.p_value <= 0.1]
    flips = [k for k in a.keys() & b.keys() if a[k].status != b[k].status]
    gained = sum(b[k].status == "ok" for k in flips)
    print(
        f"p-values near alpha resolved (up to {limit} permutations) vs one draw of {n}: "
        f"{t_res:.2f} s vs {t_one:.2f} s (x{t_res / t_one:.2f} the time); {len(near)} of {len(a)} modes "
        f"near alpha after {n}; status changed for {len(flips)} ({gained} became significant, "
        f"{len(flips) - gained} not); modes {len(a)} -> {len(b)}"
    )


def main(argv=None):
    a = _args(argv)
    warnings.filterwarnings("ignore")
    data = None if a.synthetic else from_run(a.run, a.embedder, a.split)
    X, labels, correct, what = data if data is not None else synthetic()
    print(f"data: {what}: {len(correct)} models x {len(np.unique(labels))} classes, X {X.shape}")
    print(machine_line("sklearn", "numpy"))
    t_ref = same_work(X, labels, correct, a.repeat)
    threaded_and_full(X, labels, correct, t_ref, a.n_jobs)
    permutation_resolution(X, labels, correct)


if __name__ == "__main__":
    main()
