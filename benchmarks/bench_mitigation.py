"""Head retraining on cached features vs re-running the backbone, and its cost at ImageNet shape.

1. One demo-zoo architecture (random weights: speed does not depend on them) on N 32x32
   images: the same head training (E epochs of minibatch AdamW on the linear head) once on
   features computed a single time and cached, once re-running the frozen backbone on every
   batch of every epoch, as the head retraining of a pipeline without cached features must.
   Prints examples per second of each and their ratio, measured in this run.
2. :class:`audit.mitigate.LinearHead` (the estimator the mitigate stage uses) at ImageNet
   shape, 2048-d features and 1,000 classes: seconds per L-BFGS iteration measured at a few
   sizes, extrapolated linearly in N to 50,000 images and the stage's iteration budget.

    python benchmarks/bench_mitigation.py                 # ~1 minute on 2 cores
"""

from __future__ import annotations

import argparse
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


def bench_imagenet_shape(sizes=(2000, 4000), d: int = 2048, c: int = 1000, iters: int = 5) -> None:
    from audit.mitigate import LinearHead
    from audit.pipeline.config import MitigateSection

    budget = MitigateSection().max_iter

    rng = np.random.default_rng(0)
    per_iter = []
    for n in sizes:
        X = rng.normal(size=(n, d)).astype(np.float32)
        y = rng.integers(0, c, n)
        W0 = rng.normal(0, 0.01, (c, d))
        t = time.perf_counter()
        h = LinearHead(max_iter=iters).fit(
            X, y, coef_init=W0, intercept_init=np.zeros(c), n_classes=c
        )
        dt = time.perf_counter() - t
        per_iter.append(dt / max(1, h.n_iter_ + 1))
        print(
            f"  LinearHead {n:6d} x {d} -> {c} classes: {dt:6.2f} s for {h.n_iter_} L-BFGS iterations "
            f"({per_iter[-1]:.3f} s per iteration incl. line search)"
        )
    slope = (per_iter[-1] - per_iter[0]) / (sizes[-1] - sizes[0])
    at_50k = per_iter[-1] + slope * (50_000 - sizes[-1])
    print(
        f"  extrapolated to 50,000 images: {at_50k:.2f} s per iteration, {at_50k * budget / 60:.1f} min per model "
        f"at the stage's max_iter = {budget} (linear in N; measured above, extrapolated here)"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--arch", default="resnet18-w16")
    p.add_argument("--n-images", type=int, default=4096)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=256)
    a = p.parse_args()
    import torch

    print(f"{machine_line('torch')}; {torch.get_num_threads()} threads")
    bench_cached_vs_backbone(a.arch, a.n_images, a.epochs, a.batch)
    print("\nhead retraining at ImageNet shape (2048-d features, 1,000 classes):")
    bench_imagenet_shape()


if __name__ == "__main__":
    main()
