"""The distributed zoo sweep: Ray shard actors over one decoded dataset.

The driver puts the decoded data in the object store batch by batch; every shard actor
(:class:`audit.zoo.shard.ZooShard` under ``ray.remote``) receives every batch and runs all
of its models on it. When a shard has seen every batch, its models go to the sink (which
writes them to the run directory at once). Resilience:

- a shard actor that dies is restarted by Ray (``max_restarts``) and its unfinished calls
  are retried (``max_task_retries``); outputs are keyed by batch, so the finished run is
  identical to an uninterrupted one;
- a shard that is gone for good costs its models (error rows), not the sweep;
- a model that fails to load or run is reported failed; the others go on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from audit.pipeline.sweep import Sink, SweepJob
from audit.zoo.shard import ZooShard, model_costs, plan_shards

log = logging.getLogger(__name__)


def _gpu_count() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


@dataclass
class _Collect:
    """Outputs of the shards, batch by batch, until each shard has seen every batch."""

    n: int
    n_batches: int
    logits: dict[str, np.ndarray] = field(default_factory=dict)
    feats: dict[str, np.ndarray] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    batches_seen: dict[int, int] = field(default_factory=dict)

    def add(self, si: int, out: dict) -> bool:
        """Store one shard's batch; True when that shard has now seen every batch."""
        self.failed.update(out["failed"])
        s, k = out["start"], out["n"]
        for name, o in out["outputs"].items():
            if name not in self.logits:
                self.logits[name] = np.zeros((self.n, o["logits"].shape[1]), np.float32)
                if "features" in o:
                    self.feats[name] = np.zeros((self.n, o["features"].shape[1]), np.float32)
            self.logits[name][s : s + k] = o["logits"]
            if "features" in o:
                self.feats[name][s : s + k] = o["features"]
        self.batches_seen[si] = self.batches_seen.get(si, 0) + 1
        return self.batches_seen[si] == self.n_batches

    def flush(self, si: int, names: list[str], sink: Sink) -> None:
        for name in names:
            if name in self.failed or name not in self.logits:
                sink.model_failed(name, self.failed.get(name, "no outputs (its shard ended early)"))
            else:
                sink.model_done(name, self.logits.pop(name), self.feats.pop(name, None), si)


class RaySweeper:
    """Shards on Ray (which must be initialised): one actor per GPU when the cluster has GPUs
    and ``gpus`` is not ``"no"``, else ``num_workers`` CPU actors with ``threads_per_worker``
    torch threads each (default: the cluster's CPUs / workers), models balanced by FLOPs.

    ``on_batch`` is called after every finished (shard, batch) with ``{"actors", "shards",
    "finished", "total"}`` (tests use it to kill an actor mid-sweep).
    """

    def __init__(self, num_workers: int = 2, threads_per_worker: int | None = None, gpus: str = "auto",
                 max_restarts: int = 3, max_in_flight: int = 4, on_batch: Callable[[dict], None] | None = None,
                 progress: bool = False):  # fmt: skip
        self.num_workers, self.threads_per_worker, self.gpus = num_workers, threads_per_worker, gpus
        self.max_restarts, self.max_in_flight, self.on_batch, self.progress = max_restarts, max_in_flight, on_batch, progress

    def _placement(self, job: SweepJob) -> tuple[list[list[str]], dict, str, int | None]:
        import ray

        n_gpu = _gpu_count() if self.gpus != "no" else 0
        if n_gpu:
            n_shards, opts, device, threads = n_gpu, {"num_gpus": 1, "num_cpus": 1}, "cuda", None
        else:
            total = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
            threads = int(self.threads_per_worker or max(1, total // max(1, self.num_workers)))
            n_shards, opts, device = max(1, int(self.num_workers)), {"num_cpus": threads}, "cpu"
        plan = plan_shards(model_costs(job.specs, len(job.classes)), min(n_shards, len(job.specs)))
        return plan, opts, device, threads

    def run(self, job: SweepJob, sink: Sink) -> dict:
        import ray
        from tqdm.auto import tqdm

        if not ray.is_initialized():
            raise RuntimeError("Ray is not initialised; cluster.runtime.connect() first")
        plan, opts, device, threads = self._placement(job)
        by_name = {s.name: s for s in job.specs}
        Shard = ray.remote(ZooShard).options(max_restarts=self.max_restarts, max_task_retries=self.max_restarts, **opts)
        actors = [Shard.remote([by_name[m] for m in names], job.classes, {m: job.weights.get(m) for m in names}, device,
                               threads, job.batch_size, job.with_features) for names in plan]  # fmt: skip
        starts = list(range(0, len(job.images), job.batch_size))
        col = _Collect(len(job.images), len(starts))
        total = len(starts) * len(actors)
        bar = tqdm(total=total, desc=f"sweep {len(job.specs)} models", disable=not self.progress, leave=False)
        try:
            self._feed(job, actors, plan, starts, col, sink, bar, total)
        finally:
            bar.close()
            for a in actors:
                ray.kill(a, no_restart=True)
        return {"shards": plan, "device": device}

    def _feed(self, job, actors, plan, starts, col: _Collect, sink, bar, total) -> None:
        """Keep up to ``max_in_flight`` batches in the object store, each sent to every live shard."""
        import ray

        alive = [True] * len(actors)
        pending: dict = {}
        refs: dict[int, object] = {}
        outstanding: dict[int, int] = {}
        next_b = finished = 0
        while next_b < len(starts) or pending:
            while next_b < len(starts) and len(refs) < self.max_in_flight and any(alive):
                s = starts[next_b]
                refs[next_b] = ray.put(job.images[s : s + job.batch_size])
                outstanding[next_b] = 0
                for si, a in enumerate(actors):
                    if alive[si]:
                        pending[a.run_batch.remote(refs[next_b], s)] = (si, next_b)
                        outstanding[next_b] += 1
                if not outstanding[next_b]:
                    del refs[next_b], outstanding[next_b]
                next_b += 1
            if not pending:
                break
            (fut,), _ = ray.wait(list(pending), num_returns=1)
            si, b = pending.pop(fut)
            try:
                out = ray.get(fut)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                if alive[si]:
                    log.error("shard %d died after %d restarts: %s", si, self.max_restarts, e)
                    alive[si] = False
                    for name in plan[si]:
                        col.failed.setdefault(name, f"shard actor died: {type(e).__name__}: {e}")
                    col.flush(si, plan[si], sink)
            else:
                if col.add(si, out):
                    col.flush(si, plan[si], sink)
            outstanding[b] -= 1
            if outstanding[b] == 0:
                del refs[b], outstanding[b]  # frees the batch in the object store
            finished += 1
            bar.update(1)
            if self.on_batch is not None:
                self.on_batch({"actors": actors, "shards": plan, "finished": finished, "total": total})
