"""Head retraining: on cached features vs re-running the backbone, and the mitigate stage's
cost at ImageNet shape, the torch solver against the scipy one it replaced.

1. One demo-zoo architecture (random weights: speed does not depend on them) on N 32x32
   images: the same head training (E epochs of minibatch AdamW on the linear head) once on
   features computed a single time and cached, once re-running the frozen backbone on every
   batch of every epoch, as the head retraining of a pipeline without cached features must.
   Prints examples per second of each and their ratio, measured in this run.
2. One head fit at ImageNet shape (``--classes 1000 --dim 2048``; random features with a
   planted failing subgroup in 10 classes, ``benchmarks/_imagenet_shape.py``): the real
   train examples (``--real``, the stage's ``max_real``) plus one generator's synthetic set,
   fitted by the scipy solver of before (every row), by the torch one (every row), and by the
   torch one moving only the hard classes and their main confusions (``[mitigate]
   head_classes``); seconds, iterations, ratio against the scipy fit, and each head's
   accuracy on the planted groups and overall on the eval split.
3. A whole model's mitigate work at that shape (``--examples`` fit + eval images, half
   each): every method (~15-20 fits with the lambda / k choices), the original head's logits
   computed once, and the evaluation with its bootstrap intervals; against the scipy solver's
   estimate (fits x the scipy fit above + one full eval product per prediction;
   ``--old-model`` runs it instead, feasible when scaled down).

How the cost grows (N fit examples ~ ``--real`` + added, M fit + eval images, D dimension,
C classes, A rows moved <= head_classes, I L-BFGS evaluations <= ~2 max_iter): the scipy fit
was 4 N D C per evaluation (I of them, every row), so linear in each of N, D and C; a
restricted torch fit costs one 2 N D (C - A) product (the frozen rows' log-sum-exp) plus
4 N D A per evaluation, so the classes enter once per fit and the iterations grow with A,
not C. Per model the evaluation adds 2 M D C once (the original logits, cached) plus
2 M D A per prediction instead of 2 M D C; at 1,000 classes the fits dominate, linear in N,
D and A.

    python benchmarks/bench_mitigation.py                       # ~3 minutes on 2 idle cores
    python benchmarks/bench_mitigation.py --only head --classes 100 --examples 5000 --dim 256
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from _common import machine_line, ratio


def head_epochs(feats_fn, n: int, labels, head, epochs: int, batch: int) -> float:
    import torch

    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    y = torch.as_tensor(labels)
    t = time.perf_counter()
    for _ in range(epochs):
        for i in range(0, n, batch):
            f = feats_fn(i, i + batch)
            loss = torch.nn.functional.cross_entropy(head(f), y[i : i + batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - t


def bench_cached_vs_backbone(arch: str, n: int, epochs: int, batch: int) -> None:
    import torch

    from audit.zoo.inference import preprocess
    from audit.zoo.models import create_timm
    from audit.zoo.spec import ZooSpec

    spec = ZooSpec.from_toml("demo").get(arch)
    model = create_timm(spec, 6).eval()
    cfg_size = int(spec.input.get("input_size", 32))
    from audit.zoo.spec import InputConfig

    cfg = InputConfig(input_size=cfg_size, mean=(0.5,) * 3, std=(0.25,) * 3)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 6, n)

    def backbone(i, j):
        with torch.inference_mode():
            f = model.forward_head(
                model.forward_features(preprocess(images[i:j], cfg)), pre_logits=True
            )
        return f.clone()

    t = time.perf_counter()
    cached = torch.cat([backbone(i, i + 256) for i in range(0, n, 256)])
    t_cache = time.perf_counter() - t
    d = cached.shape[1]
    head_epochs(
        lambda i, j: cached[i:j], min(n, 2 * batch), labels, torch.nn.Linear(d, 6), 1, batch
    )  # warm-up
    t_cached = head_epochs(
        lambda i, j: cached[i:j], n, labels, torch.nn.Linear(d, 6), epochs, batch
    )
    t_backbone = head_epochs(backbone, n, labels, torch.nn.Linear(d, 6), epochs, batch)
    work = n * epochs
    print(f"{arch} ({d}-d features), {n} images, {epochs} epochs, batch {batch}:")
    print(
        f"  cached features   {t_cached:7.2f} s  {work / t_cached:10,.0f} examples/s  (+ {t_cache:.2f} s to compute them once)"
    )
    print(f"  backbone per epoch {t_backbone:6.2f} s  {work / t_backbone:10,.0f} examples/s")
    print(
        f"  ratio cached / backbone: {ratio(t_backbone, t_cached)}  (with the one-off feature pass: "
        f"{ratio(t_backbone, t_cached + t_cache)})"
    )


def _variant(ctx, head_class, head_classes: int):
    """``ctx`` with a fresh ModelData (no cached logits) whose fits make ``head_class`` heads
    that move at most ``head_classes`` rows (0: all)."""
    from dataclasses import replace

    d = ctx.data
    cfg = d.cfg.model_copy(update={"head_classes": head_classes})
    data = type(d)(d.F, d.Y, d.conf, (d.W0, d.b0), cfg, d.setting, d.hard)
    data.head_class = head_class
    return replace(ctx, data=data, chosen={})


def _accuracy(ctx, head) -> tuple[float, float]:
    """``(planted groups', overall)`` accuracy on the eval split."""
    ok = ctx.data.predict(head, "test") == ctx.data.Y["test"]
    rows = np.concatenate([r for _, _, r in ctx.task.planted])
    return float(ok[rows].mean()), float(ok.mean())


def bench_one_fit(ctx, head_classes: int, repeats: int) -> float:
    """One synthetic fit (the real examples and the first generator's set, lambda 0.5) by the
    scipy solver (every row), torch (every row) and torch (the hard rows); returns the scipy
    fit's seconds."""
    from functools import partial

    import torch
    from _common import median_time

    from audit.mitigate import LinearHead
    from audit.mitigate.reference import ScipyHead

    X_add, y_add = ctx.syn_rows(next(iter(ctx.task.own_sets.values())), ctx.data.setting.k)
    new = _variant(ctx, LinearHead, head_classes)
    A = new.data.active(y_add)  # confusions from the fit split's logits: once per model
    LinearHead(max_iter=3).fit(X_add, y_add, n_classes=len(ctx.data.W0))  # warm-up
    cases = [("scipy L-BFGS-B, every row (before)", _variant(ctx, ScipyHead, 0), 1)]
    cases += [("torch L-BFGS, every row", _variant(ctx, LinearHead, 0), 1)]
    rows = f"{len(A) if A is not None else 'every'} rows"
    cases += [(f"torch L-BFGS, {rows}", new, repeats)]
    if torch.cuda.is_available():  # the same fits on the CPU's threads, for the ratio
        on_cpu = partial(LinearHead, device="cpu")
        cases += [(f"torch L-BFGS, {rows}, CPU", _variant(ctx, on_cpu, head_classes), repeats)]
    pg, ov = _accuracy(ctx, _Original(ctx.data))
    n = len(ctx.data.train_X) + len(X_add)
    print(
        f"  one fit, {n} examples, max_iter {ctx.data.cfg.max_iter} (eval before: planted "
        f"groups {pg:.1%}, overall {ov:.1%}):"
    )
    secs = []
    for label, c, reps in cases:
        head, s, _ = median_time(lambda c=c: c.data.fit(X_add, y_add, 0.5), reps)
        secs.append(s)
        pg, ov = _accuracy(c, head)
        print(
            f"    {label:36s} {s:7.2f} s {head.n_iter_:4d} iterations {ratio(secs[0], s):>7s}"
            f"   planted {pg:.1%}, overall {ov:.1%}"
        )
    return secs[0]


class _Original:
    """The model's own head, as a head that moved no row (for :func:`_accuracy`)."""

    def __init__(self, data):
        self.active_ = np.zeros(0, np.int64)
        self.coef_, self.intercept_ = data.W0, data.b0


class _Counting:
    """Wraps a ModelData's head class and its MethodContext's fit_score to count them."""

    def __init__(self, ctx):
        self.fits = self.scores = 0
        base, score = ctx.data.head_class, ctx.fit_score

        def head_class(**kw):
            self.fits += 1
            return base(**kw)

        def fit_score(head):
            self.scores += 1
            return score(head)

        ctx.data.head_class, ctx.fit_score = head_class, fit_score


def bench_model(ctx, head_classes: int, old_fit_s: float, old_model: bool) -> None:
    """A whole model's mitigate work, new solver vs the scipy one (estimated, or run)."""
    from _common import timed

    from audit.mitigate import LinearHead
    from audit.mitigate.reference import ScipyHead
    from audit.mitigate.task import mitigate_model

    classes = [str(c) for c in range(len(ctx.data.W0))]
    new = _variant(ctx, LinearHead, head_classes)
    count = _Counting(new)
    rows, t_new = timed(lambda: mitigate_model(new, classes, new.data.cfg.n_boot))
    n_eval = len({(r["method"], r["generator"], r["scope"]) for r in rows})
    X = ctx.data.F["test"]
    _, t_pred = timed(lambda: (X @ ctx.data.W0.T.astype(np.float32)).argmax(1))
    t_old = count.fits * old_fit_s + (count.scores + n_eval) * t_pred
    how = f"estimated: {count.fits} x {old_fit_s:.1f} s + {count.scores + n_eval} x {t_pred:.2f} s"
    if old_model:
        old = _variant(ctx, ScipyHead, 0)
        _, t_old = timed(lambda: mitigate_model(old, classes, old.data.cfg.n_boot))
        how = "measured"
    print(
        f"  whole model: {count.fits} fits, {count.scores} fit-split scores, {n_eval} heads "
        f"evaluated; {_gain(rows)}"
    )
    print(f"    before (scipy, every row; {how}) {t_old:8.1f} s")
    print(
        f"    now (torch, <= {head_classes} rows)  {t_new:8.1f} s   ratio {ratio(t_old, t_new)}"
        f"   (target <= 30 s on 2 cores)"
    )


def _gain(rows) -> str:
    by: dict[str, list] = {}
    for r in rows:
        if r["eval"] == "planted":
            by.setdefault(r["method"], []).append(
                (r["gain"], r["overall_after"] - r["overall_before"])
            )
    return "planted gain (overall change), points: " + ", ".join(
        f"{m} {np.nanmean([g for g, _ in v]) * 100:+.1f} ({np.mean([o for _, o in v]) * 100:+.1f})"
        for m, v in by.items()
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", choices=("backbone", "head"), help="one part (default: both)")
    p.add_argument("--arch", default="resnet18-w16")
    p.add_argument("--n-images", type=int, default=4096)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--examples", type=int, default=50_000, help="fit + eval images")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--real", type=int, default=None, help="real train examples (max_real)")
    p.add_argument("--head-classes", type=int, default=None, help="[mitigate] head_classes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--old-model", action="store_true", help="run the scipy model, not estimate")
    a = p.parse_args()
    import torch

    print(
        f"{machine_line('torch', 'scipy')}; {torch.get_num_threads()} threads; "
        f"load {os.getloadavg()[0]:.2f}; device {'cuda' if torch.cuda.is_available() else 'cpu'}"
    )
    if a.only in (None, "backbone"):
        bench_cached_vs_backbone(a.arch, a.n_images, a.epochs, a.batch)
    if a.only in (None, "head"):
        bench_head(a)


def bench_head(a) -> None:
    from _imagenet_shape import Shape, model_context

    from audit.pipeline.config import MitigateSection

    cfg = MitigateSection()
    real = cfg.max_real if a.real is None else a.real
    hc = cfg.head_classes if a.head_classes is None else a.head_classes
    shape = Shape(a.classes, a.dim, a.examples, train=real)
    t = time.perf_counter()
    ctx = model_context(shape, cfg.model_copy(update={"head_classes": hc, "max_real": real}))
    print(
        f"\nhead retraining at {a.classes} classes, {a.dim}-d features, {a.examples:,} fit + eval"
        f" images, {real} real train examples (planted data made in "
        f"{time.perf_counter() - t:.1f} s):"
    )
    old_fit = bench_one_fit(ctx, hc, a.repeats)
    bench_model(ctx, hc, old_fit, a.old_model)


if __name__ == "__main__":
    main()
