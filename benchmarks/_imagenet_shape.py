"""One model's mitigation inputs at ImageNet shape, from random features with a planted
failure (for ``bench_mitigation.py``; nothing outside ``benchmarks/`` imports it).

Classes are Gaussian blobs around random means and the model's head is their true posterior
(nearest mean, calibrated). Each hard class has a subgroup (a fifth of its fit, eval and pool images, 1% of
its train images) that sits between its mean and one confusion class's mean, so the head
sends it there; each generator's synthetic images of the hard caption are drawn around the
subgroup's mean, the cluster's shared set with other seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUBGROUP = 0.2  # share of a hard class's fit / eval / pool images in the failing subgroup


@dataclass
class Shape:
    classes: int = 1000
    dim: int = 2048
    examples: int = 50_000  # fit + eval images (half each)
    train: int = 3000  # real train examples (the stage's [mitigate] max_real)
    pool: int = 5000
    hard: int = 10  # hard classes of the model
    generators: tuple[str, ...] = ("world", "retrieval")
    k: int = 16  # synthetic images per hard caption ([generate] k)


def _blobs(rng, mu, labels, noise):
    X = mu[labels] + noise * rng.standard_normal((len(labels), mu.shape[1]), np.float32)
    return X.astype(np.float32)


def _split(rng, mu, sub_mu, n, hard, rate, noise):
    """``(X, y, in_subgroup)``: ``n`` images of random classes; a ``rate`` share of each
    hard class's images come from its subgroup."""
    y = rng.integers(0, len(mu), n)
    X = _blobs(rng, mu, y, noise)
    sub = np.isin(y, hard) & (rng.random(n) < rate)
    pos = np.searchsorted(hard, y[sub])
    X[sub] = _blobs(rng, sub_mu, pos, noise)
    return X, y, sub


def planted(shape: Shape, seed: int = 0, noise: float = 0.7):
    """``(F, Y, head, hard classes, subgroup masks, synthetic features)`` at ``shape``."""
    rng = np.random.default_rng(seed)
    C, D = shape.classes, shape.dim
    mu = (rng.standard_normal((C, D), np.float32) * np.sqrt(2.0 / D) * 2).astype(np.float32)
    hard = np.sort(rng.choice(C, shape.hard, replace=False))
    confused = (hard + 1 + rng.integers(0, C - 1, len(hard))) % C
    sub_mu = 0.35 * mu[hard] + 0.65 * mu[confused]
    sub_mu += rng.standard_normal(sub_mu.shape).astype(np.float32) * np.sqrt(4.0 / D)
    n_fit = shape.examples // 2
    F, Y, sub = {}, {}, {}
    sizes = {"train": shape.train, "debug": n_fit, "test": shape.examples - n_fit}
    sizes["pool"] = shape.pool
    for split, n in sizes.items():
        rate = 0.01 if split == "train" else SUBGROUP
        F[split], Y[split], sub[split] = _split(rng, mu, sub_mu, n, hard, rate, noise)
    m = mu.astype(np.float64) / noise**2  # the classes' true posterior: a calibrated head
    head = (m, -0.5 * (mu.astype(np.float64) * m).sum(1))
    syn = {}
    for key in [*shape.generators, *(f"cluster-{g}" for g in shape.generators)]:
        lab = np.repeat(np.arange(len(hard)), shape.k)
        syn[key] = (_blobs(rng, sub_mu, lab, noise), hard[lab])
    return F, Y, head, hard, sub, syn


def model_context(shape: Shape, cfg, seed: int = 0):
    """A :class:`~audit.mitigate.task.MethodContext` for one model at ``shape`` (``cfg`` a
    ``MitigateSection``), and the planted groups' eval rows."""
    from audit.mitigate.synthetic import SyntheticIndex
    from audit.mitigate.task import HardClass, MethodContext, ModelData, ModelTask, Setting

    F, Y, head, hard, sub, syn = planted(shape, seed)
    conf = {s: np.random.default_rng(1).random(len(y)) for s, y in Y.items()}
    data = ModelData(F, Y, conf, head, cfg, Setting("debug", "test", shape.k), hard)
    hcs, planted_rows = [], []
    for c in hard.tolist():

        def rows(split, c=c):  # the class's rows, its subgroup first
            in_c = np.flatnonzero(Y[split] == c)
            return in_c[np.argsort(~sub[split][in_c], kind="stable")]

        near = {s: rows(s)[: int(cfg.k_nearest)] for s in ("debug", "test")}
        hcs.append(
            HardClass(c, f"a failing {c}", near["debug"], near["test"], rows("pool"), rows("debug"))
        )
        planted_rows.append((c, f"group-{c}", np.flatnonzero(sub["test"] & (Y["test"] == c))))
    idx, parts, sets = 0, [], {}
    for key, (X, y) in syn.items():
        for i, c in enumerate(hard.tolist()):
            sets[f"{key}:{c}"] = np.arange(idx + i * shape.k, idx + (i + 1) * shape.k)
        idx += len(y)
        parts.append((X, y, np.tile(np.arange(shape.k), len(hard)), key.removeprefix("cluster-")))
    index = SyntheticIndex(
        np.asarray([f"p{i}" for i in range(idx)]),
        np.arange(idx),
        np.concatenate([np.full(len(p[0]), p[3]) for p in parts]),
        np.concatenate([p[2] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        sets,
    )
    own = {g: [s for s in sets if s.startswith(f"{g}:")] for g in shape.generators}
    cluster = {g: [s for s in sets if s.startswith(f"cluster-{g}:")] for g in shape.generators}
    task = ModelTask("planted-model", "cluster:0", hcs, planted_rows, own, cluster)
    syn_X = np.concatenate([p[0] for p in parts])
    return MethodContext(task, data, index, syn_X)
