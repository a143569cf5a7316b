"""The sweep half of ``benchmarks/gpu_check.sh`` (see there; the diffusers half is
``pytest -m gpu``). Prints what it measured, with ratios against a baseline measured in the
same run, and exits non-zero when a check fails."""

from __future__ import annotations

import os
import platform
import sys
import time

import numpy as np
from _common import ratio


class Keep:
    """A sweep sink that keeps each model's logits and failures."""

    def __init__(self):
        self.logits, self.failed = {}, {}

    def model_done(self, name, logits, features, shard):
        self.logits[name] = logits

    def model_failed(self, name, reason):
        self.failed[name] = reason


def demo_job(n_images: int):
    """(the demo zoo, a SweepJob of ``n_images`` images of the demo config's fit split), the
    zoo trained on the GPU if not cached."""
    from audit.data.default_world import prepare_world
    from audit.pipeline.config import load_config
    from audit.pipeline.sweep import SweepJob
    from audit.zoo.spec import ZooSpec
    from audit.zoo.train import train_zoo, trained_weights

    t = time.perf_counter()
    data, _ = prepare_world()
    zoo = ZooSpec.from_toml("demo")
    train_zoo(zoo, data, device="cuda", progress=False)
    weights = trained_weights(zoo, data)
    print(
        f"demo zoo ready ({len(weights)} models, {time.perf_counter() - t:.0f}s incl. training on the GPU)"
    )
    part = data.split(load_config("demo").data.split)
    images, ok, _ = part.decode()
    images, part = images[:n_images], part.take(ok[:n_images])
    ids = part.example_ids.astype(str)
    return zoo, SweepJob(images, ids, part.labels, data.classes, list(zoo), weights, 256)


def sweep_check(n_images: int) -> bool:
    """The demo zoo over the world's fit split, CPU vs GPU with fp16 autocast; one Ray
    shard per GPU."""
    import ray
    import torch

    from audit.zoo.shard import LocalSweeper
    from cluster.sweep import RaySweeper

    zoo, job = demo_job(n_images)
    images = job.images
    cpu, gpu = Keep(), Keep()
    t = time.perf_counter()
    LocalSweeper("cpu", threads=os.cpu_count()).run(job, cpu)
    t_cpu = time.perf_counter() - t
    n_gpus = torch.cuda.device_count()
    ray.init(num_cpus=os.cpu_count(), num_gpus=n_gpus, include_dashboard=False, log_to_driver=False)
    try:
        t = time.perf_counter()
        info = RaySweeper(gpus="auto").run(job, gpu)
        t_gpu = time.perf_counter() - t
    finally:
        ray.shutdown()
    agree = {
        m: float(np.mean(cpu.logits[m].argmax(1) == gpu.logits[m].argmax(1)))
        for m in cpu.logits
        if m in gpu.logits
    }
    worst = min(agree.values()) if agree else 0.0
    print(
        f"sweep {len(zoo)} models x {len(images)} images: CPU {t_cpu:.1f}s, GPU shards {t_gpu:.1f}s "
        f"(ratio {ratio(t_cpu, t_gpu, '.2f')}, GPU incl. actor start and model load)"
    )
    print(
        f"  prediction agreement GPU fp16 vs CPU fp32: worst model {worst:.2%}, mean {np.mean(list(agree.values())):.2%} "
        f"(target >= 99%); failed on GPU: {sorted(gpu.failed) or 'none'}"
    )
    shards_ok = info["device"] == "cuda" and len(info["shards"]) == min(n_gpus, len(zoo))
    print(
        f"  placement: {len(info['shards'])} shard(s) on {info['device']} for {n_gpus} GPU(s): {'ok' if shards_ok else 'WRONG'}"
    )
    return worst >= 0.99 and not gpu.failed and shards_ok


def learned_check(steps: int) -> bool:
    """The learned generator (audit.synthetic.learned) on the default world: ``steps`` of
    training on CUDA against 20 steps on the CPU (seconds per step, ratio), images per second
    edited on each, and the training loss falling."""
    import tempfile

    from audit.data.default_world import prepare_world
    from audit.slots import SlotGrammar
    from audit.synthetic.learned import LearnedModel, train_learned

    data, _ = prepare_world()
    grammar = SlotGrammar.of(data)
    per_step = {}
    roots = {}
    for device, n in (("cpu", 20), ("cuda", steps)):
        t = time.perf_counter()
        roots[device] = train_learned(
            data, grammar, {"steps": n, "device": device}, cache=tempfile.mkdtemp()
        )
        per_step[device] = (time.perf_counter() - t) / n
    m = LearnedModel(roots["cuda"])
    caps = ["a photo of a blue pullover"] * 32
    t = time.perf_counter()
    m.generate(caps, list(range(32)))
    ips = 32 / (time.perf_counter() - t)
    falls = m.meta["loss_last"] < m.meta["loss_first"]
    print(
        f"learned generator: {per_step['cpu']:.2f} s/step CPU, {per_step['cuda']:.3f} s/step CUDA "
        f"(ratio {ratio(per_step['cpu'], per_step['cuda'], '.1f')}); {steps} CUDA steps, loss "
        f"{m.meta['loss_first']:.3f} -> {m.meta['loss_last']:.3f}; {ips:.1f} images/s edited (model on CPU)"
    )
    return falls


def main() -> int:
    import torch

    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}"
    )
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (exit 0)")
        return 0
    print(
        "GPUs: "
        + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    )
    n = int(os.environ.get("GPU_CHECK_IMAGES", "1800"))
    results = {"sweep": sweep_check(n)}
    results["learned"] = learned_check(int(os.environ.get("GPU_CHECK_LEARNED_STEPS", "2000")))
    print("gpu_check: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
