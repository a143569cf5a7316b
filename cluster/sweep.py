"""The distributed zoo sweep: every model of a zoo over one decoded dataset, on Ray.

The driver decodes the data once and puts it in the object store batch by batch; every
:class:`~cluster.shard.ZooShard` actor receives every batch and runs all of its models on
it. Outputs come back to the driver, which writes a model's predictions (and features)
through :class:`~audit.store.RunStore` as soon as its shard has seen every batch, and
records the model's content hash in the manifest.

Resilience:
- a shard actor that dies is restarted by Ray (``max_restarts``) and its unfinished calls
  are retried (``max_task_retries``); results are keyed by batch, so the finished run is
  identical to an uninterrupted one;
- a model whose outputs exist with a matching content hash (spec + weights + data +
  classes + options) is skipped, so a resumed run does only the rest and a rerun of a
  finished run does nothing;
- a model that fails to load or run gets an ``errors.parquet`` row; the others go on.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from audit.evaluate import ModelResult, feature_path, prediction_path, store_result
from audit.predictions import predictions_table
from audit.store import RunStore, content_hash, file_hash
from audit.zoo.spec import ModelSpec

log = logging.getLogger(__name__)

SWEEP_VERSION = 1  # bump when the meaning of stored predictions changes


@dataclass
class SweepResult:
    done: list[str] = field(default_factory=list)  # models run and stored by this call
    skipped: list[str] = field(default_factory=list)  # already stored with a matching hash
    failed: dict[str, str] = field(default_factory=dict)  # model -> reason (an errors.parquet row)
    shards: list[list[str]] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the call, actor start and model loading included
    load_seconds: float = 0.0  # of which: starting the shard actors and loading their models
    n_images: int = 0

    @property
    def images_per_s(self) -> float:
        """Model-images per second of this call's sweep (images x models run / seconds)."""
        n_models = len(self.done) + len(self.failed)
        return self.n_images * n_models / self.seconds if self.seconds > 0 else float("nan")


def weights_key(spec: ModelSpec, weights_path: str | None) -> str:
    """What identifies a model's weights: the checkpoint's bytes, else its source string."""
    for p in (weights_path, spec.weights, spec.pretrained):
        if p and os.path.isfile(p):
            return file_hash(p)
    return f"{spec.builder}:{spec.weights}:{spec.pretrained}"


def model_key(spec: ModelSpec, weights_path: str | None, data_key: str, classes: Sequence[str], split: str,
              with_features: bool) -> str:  # fmt: skip
    """Content hash of everything a model's stored outputs depend on."""
    return content_hash(SWEEP_VERSION, spec.to_dict(), weights_key(spec, weights_path), data_key, list(classes),
                        split, bool(with_features))  # fmt: skip


def sweep_records(store: RunStore) -> dict[str, dict]:
    """``{model: {"key", "status", ...}}`` from the run manifest."""
    return dict(store.manifest().get("sweep", {}).get("models", {}))


def _record(store: RunStore, name: str, entry: dict) -> None:
    models = sweep_records(store)
    models[name] = entry
    store.update_manifest(sweep={"models": models})


def is_current(store: RunStore, name: str, key: str, with_features: bool) -> bool:
    e = sweep_records(store).get(name, {})
    return (
        e.get("status") == "done"
        and e.get("key") == key
        and store.exists(prediction_path(name))
        and (not with_features or store.exists(feature_path(name)))
    )


def _gpu_count() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def run_sweep(store: RunStore, images: np.ndarray, example_ids: np.ndarray, labels: np.ndarray,
              classes: Sequence[str], specs: Sequence[ModelSpec], weights: Mapping[str, str], *,
              data_key: str, split: str = "debug", num_workers: int = 2, threads_per_worker: int | None = None,
              gpus: str | bool = "auto", batch_size: int = 256, with_features: bool = False,
              max_restarts: int = 3, max_in_flight: int = 4,
              on_batch: Callable[[dict], None] | None = None, progress: bool = True) -> SweepResult:  # fmt: skip
    """Run ``specs`` over uint8 ``images [N, H, W, 3]`` on Ray (which must be initialised).

    Shards: one actor per GPU (``num_gpus=1``) when the cluster has GPUs and ``gpus`` is not
    False, else ``num_workers`` CPU actors with ``threads_per_worker`` torch threads each
    (default: the cluster's CPUs / workers). ``on_batch`` is called after every finished
    (shard, batch) with ``{"actors", "shards", "finished", "total"}`` (used by tests to kill
    an actor mid-sweep). Returns what was run, skipped and failed.
    """
    import ray
    from tqdm.auto import tqdm

    from cluster.shard import ZooShard, model_costs, plan_shards

    t0 = time.perf_counter()
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    n = len(images)
    if len(example_ids) != n or len(labels) != n:
        raise ValueError(f"images ({n}), example_ids ({len(example_ids)}) and labels ({len(labels)}) differ in length")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised; call cluster.pipeline.connect() first")
    result = SweepResult(n_images=n)
    keys = {s.name: model_key(s, weights.get(s.name), data_key, classes, split, with_features) for s in specs}
    todo = []
    for s in specs:
        if is_current(store, s.name, keys[s.name], with_features):
            result.skipped.append(s.name)
        else:
            todo.append(s)
    if result.skipped:
        log.info("skipping %d model(s) with current outputs: %s", len(result.skipped), result.skipped)
    if not todo or n == 0:
        result.seconds = time.perf_counter() - t0
        return result

    n_gpu = _gpu_count() if gpus not in (False, "no", "false", "off") else 0
    if n_gpu:
        n_shards, res_opts, device, threads = n_gpu, {"num_gpus": 1, "num_cpus": 1}, "cuda", None
    else:
        total = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        threads = int(threads_per_worker or max(1, total // max(1, num_workers)))
        n_shards, res_opts, device = max(1, int(num_workers)), {"num_cpus": threads}, "cpu"
    plan = plan_shards(model_costs(todo, len(classes)), min(n_shards, len(todo)))
    result.shards = plan
    by_name = {s.name: s for s in todo}
    store.update_manifest(sweep={"shards": plan, "split": split, "device": device, "n_images": n})
    for name in by_name:
        _record(store, name, {"key": keys[name], "status": "running", "split": split})

    Shard = ray.remote(ZooShard).options(max_restarts=max_restarts, max_task_retries=max_restarts, **res_opts)
    actors = [
        Shard.remote([by_name[m] for m in names], list(classes), {m: weights.get(m) for m in names}, device,
                     threads, batch_size, with_features)  # fmt: skip
        for names in plan
    ]
    t_load = time.perf_counter()
    for si, ref in enumerate([a.info.remote() for a in actors]):
        try:
            info = ray.get(ref)
            log.info("shard %d on %s (pid %s, %s threads): %s", si, info["device"], info["pid"], info["threads"], plan[si])
        except ray.exceptions.RayActorError as e:  # handled below, when its batches fail
            log.error("shard %d did not start: %s", si, e)
    result.load_seconds = time.perf_counter() - t_load
    starts = list(range(0, n, batch_size))
    logits: dict[str, np.ndarray] = {}
    feats: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    alive = [True] * len(actors)
    finished_batches = [0] * len(actors)
    pending: dict = {}
    refs: dict[int, object] = {}
    outstanding: dict[int, int] = {}
    next_b, finished = 0, 0
    total = len(starts) * len(actors)
    bar = tqdm(total=total, desc=f"sweep {len(todo)} models x {n} images", disable=not progress)

    def write_shard(si: int) -> None:
        for name in plan[si]:
            if name in failed or name not in logits:
                reason = failed.get(name, "no outputs (shard ended early)")
                failed[name] = reason
                store.record_errors([{"stage": "sweep", "item": f"model {name}", "reason": reason}])
                _record(store, name, {"key": keys[name], "status": "failed", "split": split})
                continue
            table = predictions_table(example_ids, labels, logits.pop(name))
            store_result(store, ModelResult(name, table, feats.pop(name, None), None, batch_size), stage="sweep")
            _record(store, name, {"key": keys[name], "status": "done", "split": split, "shard": si})
            result.done.append(name)

    try:
        while next_b < len(starts) or pending:
            while next_b < len(starts) and len(refs) < max_in_flight and any(alive):
                s = starts[next_b]
                refs[next_b] = ray.put(images[s : s + batch_size])
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
                    log.error("shard %d died after %d restarts: %s", si, max_restarts, e)
                    alive[si] = False
                    for name in plan[si]:
                        failed.setdefault(name, f"shard actor died: {type(e).__name__}: {e}")
                    write_shard(si)
            else:
                failed.update({k: v for k, v in out["failed"].items() if k in by_name})
                s, k = out["start"], out["n"]
                for name, o in out["outputs"].items():
                    if name not in logits:
                        logits[name] = np.zeros((n, o["logits"].shape[1]), np.float32)
                        if "features" in o:
                            feats[name] = np.zeros((n, o["features"].shape[1]), np.float32)
                    logits[name][s : s + k] = o["logits"]
                    if "features" in o:
                        feats[name][s : s + k] = o["features"]
                finished_batches[si] += 1
                if finished_batches[si] == len(starts):
                    write_shard(si)
            outstanding[b] -= 1
            if outstanding[b] == 0:
                del refs[b], outstanding[b]  # frees the batch in the object store
            finished += 1
            bar.update(1)
            if on_batch is not None:
                on_batch({"actors": actors, "shards": plan, "finished": finished, "total": total})
    finally:
        bar.close()
        for a in actors:
            ray.kill(a, no_restart=True)
    result.failed = {k: failed[k] for k in by_name if k in failed}
    result.seconds = time.perf_counter() - t0
    return result
