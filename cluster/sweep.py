"""The distributed zoo sweep: Ray shard actors over one decoded dataset.

The driver puts the decoded data in the object store batch by batch; every shard actor
(:class:`audit.zoo.shard.ZooShard` under ``ray.remote``) receives every batch and runs all
of its models on it. When a shard has seen every batch, its models go to the sink (which
writes them to the run directory at once). Resilience:

- a shard actor that dies is restarted by Ray (``max_restarts``) and its unfinished calls
  are retried (``max_task_retries``); a call that fails because the actor is unreachable
  while it restarts (its node was lost) is sent again; outputs are keyed by batch, so the
  finished run is identical to an uninterrupted one;
- a shard that is gone for good costs its models (error rows), not the sweep;
- a model that fails to load or run is reported failed; the others go on.

Placement uses Ray's own mechanisms: shard actors are spread over the cluster's nodes
(``SPREAD``), or, with ``shard_resource`` named, placed round-robin on the nodes that
advertise that custom resource (soft node affinity: a shard whose node is lost restarts on
another node that has the resource). The returned info says where each shard ran
(``nodes``) and which shards were restarted on the way (``restarts``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from audit.pipeline.sweep import Sink, SweepJob
from audit.zoo.shard import ZooShard, model_profiles, plan_shards

log = logging.getLogger(__name__)


def _gpu_count() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


class _RayShard(ZooShard):
    """The shard actor: a :class:`ZooShard` that can say where it runs."""

    def where(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {
            "node": ctx.get_node_id(),
            "pid": os.getpid(),
            "restarted": bool(ctx.was_current_actor_reconstructed),
        }


def _alive_nodes(resource: str | None = None) -> list[dict]:
    """``ray.nodes()`` that are alive (and advertise ``resource``, when named)."""
    import ray

    return [
        n
        for n in ray.nodes()
        if n.get("Alive") and (not resource or n.get("Resources", {}).get(resource, 0) > 0)
    ]


def _nodes_with(resource: str) -> list[str]:
    """Ids of the alive nodes that advertise ``resource`` (sorted, so placement is stable)."""
    return sorted(n["NodeID"] for n in _alive_nodes(resource))


def fit_cpu_shards(node_cpus: Sequence[float], n_shards: int, threads: int) -> tuple[int, int]:
    """``(shards, threads)``: ``n_shards`` shards of ``threads`` CPUs, the threads lowered until
    every shard fits on one of the nodes (``node_cpus``: each node's CPUs), then fewer shards
    when not even one CPU each fits. Every shard must be placed at once: the driver sends each
    batch to every shard and waits for all of them, so one shard left pending hangs the sweep."""
    cpus = [int(c) for c in node_cpus if c >= 1] or [1]

    def fits(t: int) -> int:
        return sum(c // t for c in cpus)

    t = max(1, int(threads))
    while t > 1 and fits(t) < n_shards:
        t -= 1
    return max(1, min(n_shards, fits(t))), t


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
    torch threads each (default: the cluster's CPUs / workers), models balanced by FLOPs
    with :func:`audit.zoo.shard.plan_shards` (``shard_memory``: bytes of weights a shard
    may hold, fp32 parameters counted; None: unbounded).

    ``shard_resource``: a custom resource that the nodes meant for shards advertise; each
    shard asks for one unit and is pinned (softly) to one of those nodes in turn. Without
    it, shards are spread over all nodes. ``on_batch`` is called after every finished
    (shard, batch) with ``{"actors", "shards", "nodes", "finished", "total"}`` (tests use it
    to kill an actor or remove a node mid-sweep).
    """

    def __init__(
        self,
        num_workers: int = 2,
        threads_per_worker: int | None = None,
        gpus: str = "auto",
        max_restarts: int = 3,
        max_in_flight: int = 4,
        on_batch: Callable[[dict], None] | None = None,
        progress: bool = False,
        shard_resource: str | None = None,
        shard_memory: float | None = None,
        unavailable_timeout_s: float = 120.0,
    ):
        self.num_workers, self.threads_per_worker, self.gpus = num_workers, threads_per_worker, gpus
        self.max_restarts, self.max_in_flight, self.on_batch, self.progress = (
            max_restarts,
            max_in_flight,
            on_batch,
            progress,
        )
        self.shard_resource, self.shard_memory = shard_resource, shard_memory
        self.unavailable_timeout_s = unavailable_timeout_s

    def _placement(self, job: SweepJob) -> tuple[list[list[str]], dict, str, int | None]:
        import ray

        n_gpu = _gpu_count() if self.gpus != "no" else 0
        if n_gpu:
            n_shards, opts, device, threads = n_gpu, {"num_gpus": 1, "num_cpus": 1}, "cuda", None
        else:
            total = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
            threads = int(self.threads_per_worker or max(1, total // max(1, self.num_workers)))
            n_shards = min(max(1, int(self.num_workers)), len(job.specs))
            n_shards, threads = self._fit(n_shards, threads, total)
            opts, device = {"num_cpus": threads}, "cpu"
        flops, params = model_profiles(job.specs, len(job.classes))
        sizes = {k: 4.0 * v for k, v in params.items()}  # fp32 weights
        plan = plan_shards(flops, min(n_shards, len(job.specs)), sizes, self.shard_memory)
        return plan, opts, device, threads

    def _fit(self, n_shards: int, threads: int, total: int) -> tuple[int, int]:
        """``(shards, threads)`` that the cluster can place at once, with one warning line when
        that is less than asked. Lowered, not refused: threads and shards do not change any
        prediction (they are no part of a stage's key), the cluster a run joins is only known
        here, and one config then runs on a laptop and on a cluster alike."""
        nodes = [
            n.get("Resources", {}).get("CPU", 0)
            for n in _alive_nodes(self.shard_resource)
            if n.get("Resources", {}).get("CPU", 0) >= 1
        ] or [total]
        fit_shards, fit_threads = fit_cpu_shards(nodes, n_shards, threads)
        if (fit_shards, fit_threads) != (n_shards, threads):
            log.warning(
                "[ray] num_cpu_workers = %d, threads_per_worker = %s: %d shard(s) of %d CPU(s) do "
                "not fit the cluster's %d CPUs (largest node %d), and a shard that cannot be placed "
                "would hang the sweep; running %d shard(s) of %d thread(s)",
                self.num_workers,
                self.threads_per_worker or "auto",
                n_shards,
                threads,
                int(sum(nodes)),
                int(max(nodes)),
                fit_shards,
                fit_threads,
            )
        return fit_shards, fit_threads

    def _actor_options(self, opts: dict, si: int) -> dict:
        """Ray options of shard ``si``: resources, restarts and where it may be scheduled."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        out = {**opts, "max_restarts": self.max_restarts, "max_task_retries": self.max_restarts}
        if not self.shard_resource:
            return {**out, "scheduling_strategy": "SPREAD"}
        nodes = _nodes_with(self.shard_resource)
        if not nodes:
            raise RuntimeError(
                f"no alive node advertises the custom resource {self.shard_resource!r}; "
                f"start the nodes with --resources='{{\"{self.shard_resource}\": 1}}'"
            )
        return {
            **out,
            "resources": {self.shard_resource: 1},
            "scheduling_strategy": NodeAffinitySchedulingStrategy(
                nodes[si % len(nodes)], soft=True
            ),
        }

    def run(self, job: SweepJob, sink: Sink) -> dict:
        import ray
        from tqdm.auto import tqdm

        if not ray.is_initialized():
            raise RuntimeError("Ray is not initialised; cluster.runtime.connect() first")
        plan, opts, device, threads = self._placement(job)
        by_name = {s.name: s for s in job.specs}
        actors = [
            ray.remote(_RayShard)
            .options(**self._actor_options(opts, si))
            .remote(
                [by_name[m] for m in names],
                job.classes,
                {m: job.weights.get(m) for m in names},
                device,
                threads,
                job.batch_size,
                job.with_features,
            )
            for si, names in enumerate(plan)
        ]
        starts = list(range(0, len(job.images), job.batch_size))
        col = _Collect(len(job.images), len(starts))
        total = len(starts) * len(actors)
        bar = tqdm(
            total=total,
            desc=f"sweep {len(job.specs)} models",
            disable=not self.progress,
            leave=False,
        )
        try:
            first = self._where(actors)
            self._feed(
                job, actors, plan, starts, col, sink, bar, total, [w.get("node") for w in first]
            )
            last = self._where(actors)
        finally:
            bar.close()
            for a in actors:
                ray.kill(a, no_restart=True)
        restarts = [
            {"shard": si, "models": plan[si], "from_node": a.get("node"), "to_node": b.get("node")}
            for si, (a, b) in enumerate(zip(first, last, strict=True))
            if b.get("restarted") or (a.get("pid"), a.get("node")) != (b.get("pid"), b.get("node"))
        ]
        return {
            "shards": plan,
            "device": device,
            "nodes": [w.get("node") for w in last],
            "restarts": restarts,
        }

    def _put(self, job, actors, starts, alive: list[bool], next_b: int, flight: tuple) -> int:
        """Put batches ``next_b``... in the object store while fewer than ``max_in_flight`` are
        there, each sent to every live shard; returns the next batch to put. ``flight`` is
        ``(refs, outstanding, pending)``: batch -> object ref, batch -> shards that have not
        answered, future -> (shard, batch), all updated in place."""
        import ray

        refs, outstanding, pending = flight
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
        return next_b

    def _lose(
        self, si: int, e: BaseException, alive: list[bool], plan, col: _Collect, sink
    ) -> None:
        """A shard gone for good: its models become error rows; the other shards go on."""
        if alive[si]:
            log.error("shard %d died after %d restarts: %s", si, self.max_restarts, e)
            alive[si] = False
            for name in plan[si]:
                col.failed.setdefault(name, f"shard actor died: {type(e).__name__}: {e}")
            col.flush(si, plan[si], sink)

    @staticmethod
    def _where(actors) -> list[dict]:
        """Where each shard actor runs now (``{}`` for one that is gone for good, or still
        unreachable after a minute: a restart it reports then has ``to_node`` None)."""
        import ray

        out = []
        for a in actors:
            try:
                out.append(ray.get(a.where.remote(), timeout=60))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                out.append({})
        return out

    def _feed(self, job, actors, plan, starts, col: _Collect, sink, bar, total, nodes) -> None:
        """Keep up to ``max_in_flight`` batches in the object store, each sent to every live shard."""
        import ray

        alive = [True] * len(actors)
        unavailable: dict[int, float] = {}  # shard -> since when it has been unreachable
        pending: dict = {}
        refs: dict[int, object] = {}
        outstanding: dict[int, int] = {}
        next_b = finished = 0
        while next_b < len(starts) or pending:
            next_b = self._put(job, actors, starts, alive, next_b, (refs, outstanding, pending))
            if not pending:
                break
            (fut,), _ = ray.wait(list(pending), num_returns=1)
            si, b = pending.pop(fut)
            try:
                out = ray.get(fut)
            except ray.exceptions.ActorUnavailableError as e:
                # its process or node was lost and Ray is restarting it: send the batch again (the
                # batch is still in the object store) until it answers or stays away too long
                since = unavailable.setdefault(si, time.monotonic())
                if alive[si] and time.monotonic() - since < self.unavailable_timeout_s:
                    log.warning(
                        "shard %d unavailable (%s); sending batch %d again", si, type(e).__name__, b
                    )
                    time.sleep(0.2)
                    pending[actors[si].run_batch.remote(refs[b], starts[b])] = (si, b)
                    continue
                self._lose(si, e, alive, plan, col, sink)
            except ray.exceptions.RayActorError as e:
                self._lose(si, e, alive, plan, col, sink)
            else:
                unavailable.pop(si, None)
                if col.add(si, out):
                    col.flush(si, plan[si], sink)
            outstanding[b] -= 1
            if outstanding[b] == 0:
                del refs[b], outstanding[b]  # frees the batch in the object store
            finished += 1
            bar.update(1)
            if self.on_batch is not None:
                self.on_batch(
                    {
                        "actors": actors,
                        "shards": plan,
                        "nodes": nodes,
                        "finished": finished,
                        "total": total,
                    }
                )
