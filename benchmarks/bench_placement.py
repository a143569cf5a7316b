"""Shard placement for a real zoo, simulated: the ``imagenet40`` manifest on 1-8 GPUs.

Each model's forward FLOPs per image and parameter count are counted on the ``meta``
device (``audit.zoo.shard.model_profiles``: timm models whole, open_clip models by their
image tower; no weights are loaded or needed). The planner the sweep uses
(``audit.zoo.shard.plan_shards``, as ``cluster.sweep.RaySweeper`` calls it: FLOPs as cost,
fp32 weight bytes as size, GPU memory as each shard's capacity) assigns the models to N
GPUs; the planned makespan (the heaviest GPU's FLOPs per image) is compared with the lower
bound max(total / N, largest model). Baseline in the same run: plain longest-processing-
time-first (LPT) without the planner's improvement pass and without memory.

    python benchmarks/bench_placement.py                     # imagenet40, 24 GiB per GPU
    python benchmarks/bench_placement.py --gpu-memory-gib 2  # memory binds: see it refuse or spread
"""

from __future__ import annotations

import argparse
import os
import time

from _common import machine_line


def lpt(costs: dict[str, float], n: int) -> float:
    """Makespan of plain LPT (the baseline)."""
    load = [0.0] * n
    for name in sorted(costs, key=lambda k: (-costs[k], k)):
        i = min(range(n), key=lambda j: load[j])
        load[i] += costs[name]
    return max(load)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="configs/zoo/imagenet40.toml")
    ap.add_argument("--gpus", default="1,2,4,8")
    ap.add_argument(
        "--gpu-memory-gib", type=float, default=24.0, help="memory per GPU for the models' weights"
    )
    ap.add_argument("--classes", type=int, default=1000)
    a = ap.parse_args()

    import logging

    import torch  # noqa: F401 - its import is not part of the timed profiling

    logging.getLogger().setLevel(
        logging.ERROR
    )  # open_clip warns on the root logger that it has no weights (none are wanted)
    from audit.zoo.shard import model_profiles, plan_shards
    from audit.zoo.spec import ZooSpec

    zoo = ZooSpec.from_toml(a.zoo)
    t = time.perf_counter()
    flops, params = model_profiles(list(zoo), a.classes)
    t_prof = time.perf_counter() - t
    sizes = {k: 4.0 * v for k, v in params.items()}  # fp32 weights, as RaySweeper counts them
    cap = a.gpu_memory_gib * 2**30
    print(
        f"{machine_line('torch', prefix='#')}; "
        f"{len(flops)} models of {os.path.basename(a.zoo)} profiled on the meta device in {t_prof:.1f} s"
    )
    top = sorted(flops, key=lambda k: -flops[k])[:5]
    print(
        "# largest: "
        + ", ".join(f"{k} {flops[k] / 1e9:.1f} GFLOPs/{params[k] / 1e6:.0f}M" for k in top)
    )
    total, largest = sum(flops.values()), max(flops.values())
    print(
        f"# total {total / 1e9:.1f} GFLOPs per image, weights {sum(sizes.values()) / 2**30:.2f} GiB fp32; "
        f"GPU memory {a.gpu_memory_gib:g} GiB"
    )
    print(
        f"{'GPUs':>4} {'bound GF':>9} {'planned GF':>10} {'planned/bound':>13} {'LPT GF':>8} {'LPT/bound':>9} "
        f"{'max mem GiB':>11} {'models/GPU':>12}"
    )
    for n in (int(x) for x in a.gpus.split(",")):
        bound = max(total / n, largest)
        try:
            plan = plan_shards(flops, n, sizes, cap)
        except ValueError as e:
            print(f"{n:>4} {bound / 1e9:>9.1f}  does not fit: {str(e)[:90]}")
            continue
        loads = [sum(flops[m] for m in s) for s in plan]
        mem = max(sum(sizes[m] for m in s) for s in plan) / 2**30
        base = lpt(flops, n)
        counts = "/".join(str(len(s)) for s in plan)
        print(
            f"{n:>4} {bound / 1e9:>9.1f} {max(loads) / 1e9:>10.1f} {max(loads) / bound:>13.3f} {base / 1e9:>8.1f} "
            f"{base / bound:>9.3f} {mem:>11.2f} {counts:>12}"
        )


if __name__ == "__main__":
    main()
