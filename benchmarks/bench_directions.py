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
full default estimator (CI, permutation p-values, several modes) for scale.

    python benchmarks/bench_directions.py [--run runs/demo] [--synthetic] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import numpy as np


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


def from_run(run: str, embedder: str | None):
    """(X, labels, {model: correct}, description) from a run directory, or None if absent."""
    from audit.store import RunStore

    if not os.path.isdir(run):
        return None
    store = RunStore(run)
    embs = [e.split("=", 1)[1] for e in store.listdir("embeddings") if e.startswith("embedder=")]
    models = [m.split("=", 1)[1] for m in store.listdir("predictions") if m.startswith("model=")]
    if not embs or not models:
        return None
    name = embedder or embs[0]
    et = store.read_table(f"embeddings/embedder={name}")
    vec_col = (
        "vector"
        if "vector" in et.column_names
        else [c for c in et.column_names if c != "example_id"][0]
    )
    ids = et["example_id"].to_pylist()
    pos = {e: i for i, e in enumerate(ids)}
    V = np.asarray(et[vec_col].to_pylist(), np.float32)
    correct, labels, keep_ids = {}, None, None
    for m in models:
        pt = store.read_table(f"predictions/model={m}", columns=["example_id", "label", "correct"])
        pid = pt["example_id"].to_pylist()
        if keep_ids is None:
            keep_ids = [e for e in pid if e in pos]
            labels = dict(zip(pid, pt["label"].to_pylist(), strict=True))
        c = dict(zip(pid, pt["correct"].to_pylist(), strict=True))
        if not all(e in c for e in keep_ids):
            continue
        correct[m] = np.asarray([c[e] for e in keep_ids])
    if not keep_ids or not correct:
        return None
    X = V[[pos[e] for e in keep_ids]]
    y = np.asarray([labels[e] for e in keep_ids])
    return X, y, correct, f"run {run} (embedder {name})"


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--run", default="runs/demo", help="run directory with embeddings/ and predictions/"
    )
    ap.add_argument("--embedder", default=None)
    ap.add_argument("--synthetic", action="store_true", help="ignore any run directory")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--n-jobs", type=int, default=2, help="threads for the extra threaded timing")
    a = ap.parse_args(argv)

    import sklearn

    from audit.directions import DEFAULT_CS, FailureDirections, fit_directions

    warnings.filterwarnings("ignore")
    data = None if a.synthetic else from_run(a.run, a.embedder)
    X, labels, correct, what = data if data is not None else synthetic()
    n_pairs = len(correct) * len(np.unique(labels))
    print(f"data: {what}: {len(correct)} models x {len(np.unique(labels))} classes, X {X.shape}")
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
        f"python {platform.python_version()} sklearn {sklearn.__version__} numpy {np.__version__}"
    )

    comparable = FailureDirections(
        max_modes=1, n_permutations=0, n_bootstrap=0, min_errors=2, min_correct=2
    )
    fit_directions(
        X[:200],
        {k: v[:200] for k, v in list(correct.items())[:1]},
        labels[:200],
        estimator=comparable,
    )  # warm-up

    t0 = time.perf_counter()
    ref = reference(X, labels, correct, DEFAULT_CS)
    t_ref = time.perf_counter() - t0

    times = []
    for _ in range(max(1, a.repeat)):
        t0 = time.perf_counter()
        fitted = fit_directions(X, correct, labels, estimator=comparable)
        times.append(time.perf_counter() - t0)
    t_fast = statistics.median(times)
    diffs = [
        abs(fitted[m].mode(k).cv_score - s)
        for (m, k), s in ref.items()
        if fitted[m].mode(k).direction is not None
    ]
    print(
        f"reference (serial SVC + cross_val_score per C, {len(ref)} model x class pairs): {t_ref:8.2f} s"
    )
    print(
        f"FailureDirections, same work (1 mode, no p-value), serial:            {t_fast:8.2f} s  (median of {len(times)})"
    )
    print(
        f"speed ratio: {t_ref / t_fast:.1f}x   max |CV score difference|: {max(diffs):.2e} over {len(diffs)} pairs"
    )

    t0 = time.perf_counter()
    fit_directions(X, correct, labels, estimator=comparable, n_jobs=a.n_jobs)
    t_thr = time.perf_counter() - t0
    print(f"same work, {a.n_jobs} threads: {t_thr:.2f} s ({t_ref / t_thr:.1f}x)")

    t0 = time.perf_counter()
    full = fit_directions(X, correct, labels)
    t_full = time.perf_counter() - t0
    modes = [m for f in full.values() for m in f.modes_]
    n_ok = sum(m.status == "ok" for m in modes)
    print(
        f"full default (CI, {FailureDirections().n_permutations} permutations, up to {FailureDirections().max_modes} modes), serial: "
        f"{t_full:.2f} s ({t_ref / t_full:.1f}x vs the reference that does less); {len(modes)} rows, {n_ok} ok, "
        f"{sum(m.mode > 0 and m.status == 'ok' for m in modes)} further modes ok, {n_pairs} pairs"
    )


if __name__ == "__main__":
    main()
