"""Ray zoo sweep versus the plain single-process loop, and the speed of the overlap statistics.

Same models (random weights; speed does not depend on them), same decoded images, same
total threads, measured in one run:

- plain loop (one model after another, each preprocessing the decoded data itself with
  ``audit.zoo.inference.predict_arrays``, as timm's validate.py does) with T torch threads;
- the Ray sweep (``cluster.sweep.RaySweeper``) with W CPU shard actors of T/W threads.

at T = 1 (1 worker) and T = 2 (1 and 2 workers); then the overlap statistics on a
synthetic 40 models x 1,000,000 examples failure matrix.

    python benchmarks/bench_sweep.py                       # demo-zoo architectures, 32x32
    python benchmarks/bench_sweep.py --n-images 512 --repeats 1   # quicker
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import NamedTuple

import numpy as np
from _common import best_of, machine_line, ratio

DEFAULT_MODELS = "resnet10-w16,resnet18-w16,resnet10-w24,densenet-g12,convnext-atto-s,mixer-p4"


def random_weights(specs, n_classes: int, directory: str) -> dict[str, str]:
    import torch
    from safetensors.torch import save_file

    from audit.zoo.models import create_timm

    out = {}
    for i, spec in enumerate(specs):
        torch.manual_seed(i)
        model = create_timm(spec, n_classes)
        out[spec.name] = os.path.join(directory, f"{spec.name}.safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out[spec.name])
    return out


def plain_loop(
    specs, classes, images, ids, labels, weights, threads: int, batch_size: int
) -> float:
    import torch

    from audit.zoo.inference import predict_arrays
    from audit.zoo.models import build_model

    torch.set_num_threads(threads)
    t = time.perf_counter()
    for spec in specs:
        out = predict_arrays(build_model(spec, classes, weights.get(spec.name)), images, batch_size)
        assert out["logits"].shape == (len(images), len(classes))
    return time.perf_counter() - t


class _Count:
    def __init__(self):
        self.done, self.failed = [], {}

    def model_done(self, name, logits, features, shard):
        self.done.append(name)

    def model_failed(self, name, reason):
        self.failed[name] = reason


def ray_sweep(
    specs, classes, images, ids, labels, weights, workers: int, threads: int, batch_size: int
) -> float:
    from audit.pipeline.sweep import SweepJob
    from cluster.sweep import RaySweeper

    sink = _Count()
    t = time.perf_counter()
    RaySweeper(num_workers=workers, threads_per_worker=threads, gpus="no").run(
        SweepJob(images, ids, labels, list(classes), list(specs), weights, batch_size), sink
    )
    dt = time.perf_counter() - t
    assert sorted(sink.done) == sorted(s.name for s in specs), f"sweep failed: {sink.failed}"
    return dt


class Work(NamedTuple):
    """The same models and decoded images for every setup."""

    specs: list
    classes: list[str]
    images: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    weights: dict[str, str]
    batch_size: int

    def head(self, n_models: int, n_images: int) -> Work:
        """The first models on the first images (the warm-up)."""
        return self._replace(
            specs=self.specs[:n_models],
            images=self.images[:n_images],
            ids=self.ids[:n_images],
            labels=self.labels[:n_images],
        )

    def plain(self, threads: int) -> float:
        w = self
        return plain_loop(
            w.specs, w.classes, w.images, w.ids, w.labels, w.weights, threads, w.batch_size
        )

    def ray(self, workers: int, threads: int) -> float:
        w = self
        return ray_sweep(
            w.specs, w.classes, w.images, w.ids, w.labels, w.weights, workers, threads, w.batch_size
        )


def make_work(args, wdir: str) -> Work:
    """The zoo's chosen models (random weights saved under ``wdir``) and random images."""
    from audit.zoo.spec import ZooSpec

    zoo = ZooSpec.from_toml(args.zoo).select(args.models.split(",") if args.models else None)
    specs = list(zoo)
    classes = [f"c{i}" for i in range(6)]
    rng = np.random.default_rng(0)
    size = int(specs[0].input.get("input_size", 32))
    images = rng.integers(0, 256, (args.n_images, size, size, 3), dtype=np.uint8)
    ids = np.asarray([f"ex{i}" for i in range(args.n_images)])
    labels = rng.integers(0, len(classes), args.n_images)
    weights = random_weights(specs, len(classes), wdir)
    return Work(specs, classes, images, ids, labels, weights, args.batch_size)


def measure(w: Work, total: int, repeats: int) -> dict[str, float]:
    """Best wall time of each setup, after a warm-up (imports, allocator, one Ray actor start)."""
    warm = w.head(1, w.batch_size)
    warm.plain(1)
    warm.ray(1, 1)
    r = {"plain T=1": best_of(lambda: w.plain(1), repeats)}
    r["ray 1x1"] = best_of(lambda: w.ray(1, 1), repeats)
    if total >= 2:
        r[f"plain T={total}"] = best_of(lambda: w.plain(total), repeats)
        r[f"ray 1x{total}"] = best_of(lambda: w.ray(1, total), repeats)
        r[f"ray {total}x1"] = best_of(lambda: w.ray(total, 1), repeats)
    return r


def print_sweep(r: dict[str, float], work: int, total: int) -> None:
    print(f"\n{'setup':12s} {'wall s':>7s} {'img/s':>7s}")
    for k, wall in r.items():
        print(f"{k:12s} {wall:7.2f} {work / wall:7.0f}")
    print(
        "(img/s = model-images per second; wall includes loading the models, and for Ray starting the actors)"
    )
    print("\nratios of throughput:")

    def rt(a, b):  # throughput of a over b = wall of b over a
        return f"{ratio(r[b], r[a], '5.2f')}"

    print(
        f"  ray 1 worker vs plain loop, 1 thread           {rt('ray 1x1', 'plain T=1')}   (target >= 0.9)"
    )
    if total >= 2:
        print(
            f"  ray 1 worker vs plain loop, {total} threads          {rt(f'ray 1x{total}', f'plain T={total}')}   (target >= 0.9)"
        )
        print(
            f"  ray {total} workers x 1 vs plain loop, {total} threads    {rt(f'ray {total}x1', f'plain T={total}')}"
        )
        print(
            f"  ray {total} workers x 1 thread vs 1 worker x 1     {rt(f'ray {total}x1', 'ray 1x1')}   (target >= 1.8)"
        )
        # what this machine gives at all: the same models in one process, 1 -> N threads
        print(
            f"  plain loop {total} threads vs 1 thread (machine's own scaling) {rt(f'plain T={total}', 'plain T=1')}"
        )


def bench_sweep(args) -> None:
    import ray
    import torch

    total = args.threads
    wdir = tempfile.mkdtemp(prefix="bench-weights-")
    w = make_work(args, wdir)
    ray.init(num_cpus=total, include_dashboard=False, log_to_driver=False)
    work = args.n_images * len(w.specs)
    size = w.images.shape[1]
    print(
        f"{len(w.specs)} models x {args.n_images} images ({size}x{size}), batch {args.batch_size}, "
        f"best of {args.repeats}; {work} model-images per run"
    )
    try:
        r = measure(w, total, args.repeats)
    finally:
        ray.shutdown()
        shutil.rmtree(wdir, ignore_errors=True)
        torch.set_num_threads(total)
    print_sweep(r, work, total)


def bench_overlap(n_models: int = 40, n_examples: int = 1_000_000, repeats: int = 3) -> None:
    from audit.failures import (
        FailureMatrix,
        cluster_models,
        overlap_statistics,
        pair_rates,
        similarity_matrix,
    )

    rng = np.random.default_rng(0)
    base = rng.random((8, n_examples)) < 0.1  # 8 planted families of 5 models
    fails = base[np.arange(n_models) % 8] ^ (rng.random((n_models, n_examples)) < 0.02)
    t = time.perf_counter()
    fm = FailureMatrix.from_dense(fails, [f"m{i}" for i in range(n_models)])
    t_pack = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        n_fail, n_both = fm.counts()
        pair_rates(n_fail, n_both)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    st = overlap_statistics(fm, n_boot=1000)
    t_all = time.perf_counter() - t
    t = time.perf_counter()
    labels = cluster_models(similarity_matrix(st, "jaccard"), n_clusters=8)
    t_cl = time.perf_counter() - t
    ok = len(set(zip(labels, np.arange(n_models) % 8, strict=True))) == 8
    print(f"\noverlap statistics, {n_models} models x {n_examples:,} examples:")
    print(f"  pack bool -> bits                          {t_pack:7.3f} s")
    print(f"  all pairwise Jaccard + conditional rates   {min(times):7.3f} s   (target < 1 s)")
    print(f"  + error consistency, 1000-draw bootstrap   {t_all:7.3f} s")
    print(
        f"  clustering (average linkage, 8 clusters)   {t_cl:7.3f} s   planted families recovered "
        f"(oracle: the matrix's planted families): {ok}"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--zoo", default="demo")
    p.add_argument("--models", default=DEFAULT_MODELS)
    p.add_argument("--n-images", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--threads", type=int, default=min(2, os.cpu_count() or 1), help="total threads / Ray CPUs"
    )
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-sweep", action="store_true")
    args = p.parse_args()
    print(machine_line("torch", "ray", "numpy"))
    if not args.skip_sweep:
        bench_sweep(args)
    bench_overlap()


if __name__ == "__main__":
    main()
