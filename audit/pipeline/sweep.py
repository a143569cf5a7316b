"""The sweep stage: every model of the zoo over the decoded fit (and eval) split.

The stage decodes the data once, decides which models are not current (a model is skipped
when its outputs exist with a matching content hash of spec, weights, data, classes and
options) and hands those to the injected :class:`Sweeper` (Ray shard actors in production,
:class:`LocalSweeper` in-process). The sweeper reports each model through a
:class:`StoreSink`, which writes its predictions (and features) and its manifest record as
soon as the model is finished, so a killed run resumes with only the rest.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from audit.cache import content_hash, file_hash
from audit.evaluate import ModelResult, feature_path, prediction_path, store_result
from audit.predictions import predictions_table
from audit.store import RunStore
from audit.zoo.spec import ModelSpec

log = logging.getLogger(__name__)

SWEEP_VERSION = 1  # bump when the meaning of stored predictions changes


@dataclass(frozen=True)
class SweepJob:
    """What a sweeper runs: uint8 ``images [N, H, W, 3]`` with their ids and labels, and the models."""

    images: np.ndarray
    example_ids: np.ndarray
    labels: np.ndarray
    classes: list[str]
    specs: list[ModelSpec]
    weights: Mapping[str, str]
    batch_size: int = 256
    with_features: bool = False

    def __post_init__(self):
        n = len(self.images)
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 [N, H, W, 3], got {self.images.dtype} {self.images.shape}"
            )
        if len(self.example_ids) != n or len(self.labels) != n:
            raise ValueError(
                f"images ({n}), example_ids ({len(self.example_ids)}) and labels ({len(self.labels)}) differ in length"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


class Sink(Protocol):
    def model_done(
        self, name: str, logits: np.ndarray, features: np.ndarray | None, shard: int
    ) -> None: ...
    def model_failed(self, name: str, reason: str) -> None: ...


class Sweeper(Protocol):
    def run(self, job: SweepJob, sink: Sink) -> dict:
        """Run every model of ``job``; report each to ``sink`` once. Returns info (shards, device, ...)."""


@dataclass
class SweepResult:
    done: list[str] = field(default_factory=list)  # models run and stored by this call
    skipped: list[str] = field(default_factory=list)  # already stored with a matching hash
    failed: dict[str, str] = field(default_factory=dict)  # model -> reason (an errors.parquet row)
    info: dict = field(default_factory=dict)
    seconds: float = 0.0
    n_images: int = 0


# -- keys and records ----------------------------------------------------------------------
def weights_key(spec: ModelSpec, weights_path: str | None) -> str:
    """What identifies a model's weights: the checkpoint's bytes, else its source string."""
    for p in (weights_path, spec.weights, spec.pretrained):
        if p and os.path.isfile(p):
            return file_hash(p)
    return f"{spec.builder}:{spec.weights}:{spec.pretrained}"


def model_key(
    spec: ModelSpec,
    weights_path: str | None,
    data_key: str,
    classes: Sequence[str],
    split,
    with_features: bool,
) -> str:
    """Content hash of everything a model's stored outputs depend on."""
    return content_hash(
        SWEEP_VERSION,
        spec.to_dict(),
        weights_key(spec, weights_path),
        data_key,
        list(classes),
        split,
        bool(with_features),
    )


def sweep_records(store: RunStore) -> dict[str, dict]:
    """``{model: {"key", "status", ...}}`` from the run manifest."""
    return dict(store.manifest().get("sweep", {}).get("models", {}))


def record_model(store: RunStore, name: str, entry: dict) -> None:
    store.update_manifest(sweep={"models": {**sweep_records(store), name: entry}})


def intact(store: RunStore, name: str, entry: dict) -> bool:
    """A finished model's stored outputs are all there with the checksums recorded when they
    were written (a corrupted predictions file or a deleted ``features/`` is not)."""
    recorded = {prediction_path(name): {}, **(entry.get("outputs") or {})}
    damaged = store.damaged(recorded)
    if damaged:
        log.warning("sweep: %s; model %s is run again", damaged, name)
    return damaged is None


def is_current(store: RunStore, name: str, key: str, with_features: bool) -> bool:
    e = sweep_records(store).get(name, {})
    return (
        e.get("status") == "done"
        and e.get("key") == key
        and (not with_features or store.exists(feature_path(name)))
        and intact(store, name, e)
    )


class StoreSink:
    """Writes each finished model to the run directory the moment the sweeper reports it."""

    def __init__(self, store: RunStore, job: SweepJob, keys: Mapping[str, str], split):
        self.store, self.job, self.keys, self.split = store, job, keys, split
        self.result = SweepResult(n_images=len(job.images))

    def model_done(self, name, logits, features, shard):
        if logits.shape != (len(self.job.images), len(self.job.classes)):
            return self.model_failed(
                name,
                f"model outputs logits of shape {logits.shape}, expected "
                f"{(len(self.job.images), len(self.job.classes))}",
            )
        table = predictions_table(self.job.example_ids, self.job.labels, logits)
        store_result(
            self.store, ModelResult(name, table, features, None, self.job.batch_size), stage="sweep"
        )
        written = [prediction_path(name)] + ([feature_path(name)] if features is not None else [])
        entry = {"key": self.keys[name], "status": "done", "split": self.split, "shard": shard}
        entry["outputs"] = {p: self.store.fingerprint(p) for p in written}
        record_model(self.store, name, entry)
        self.result.done.append(name)

    def model_failed(self, name, reason):
        if name in self.result.failed:
            return
        self.result.failed[name] = reason
        self.store.record_errors([{"stage": "sweep", "item": f"model {name}", "reason": reason}])
        record_model(
            self.store, name, {"key": self.keys[name], "status": "failed", "split": self.split}
        )


# -- the stage -----------------------------------------------------------------------------
def sweep_arrays(
    store: RunStore,
    images: np.ndarray,
    example_ids,
    labels,
    classes: Sequence[str],
    specs: Sequence[ModelSpec],
    weights: Mapping[str, str],
    sweeper: Sweeper,
    *,
    data_key: str,
    split,
    batch_size: int = 256,
    with_features: bool = False,
) -> SweepResult:
    """Run every model of ``specs`` that is not current over decoded uint8 ``images [N, H, W, 3]``."""
    t0 = time.perf_counter()
    keys = {
        s.name: model_key(s, weights.get(s.name), data_key, classes, split, with_features)
        for s in specs
    }
    todo = [s for s in specs if not is_current(store, s.name, keys[s.name], with_features)]
    skipped = sorted(set(keys) - {s.name for s in todo})
    if not todo:
        return SweepResult(skipped=skipped, n_images=len(images))
    job = SweepJob(
        np.asarray(images),
        np.asarray(example_ids).astype(str),
        np.asarray(labels),
        list(classes),
        list(todo),
        dict(weights),
        batch_size,
        with_features,
    )
    sink = StoreSink(store, job, keys, split)
    for s in todo:
        record_model(store, s.name, {"key": keys[s.name], "status": "running", "split": split})
    info = sweeper.run(job, sink)
    if (info or {}).get(
        "restarts"
    ):  # shards restarted on the way (a lost actor or node): kept for the record
        prior = store.manifest().get("sweep", {}).get("restarts", [])
        store.update_manifest(
            sweep={"restarts": [*prior, *({**r, "split": split} for r in info["restarts"])]}
        )
    for s in todo:  # a sweeper that lost a model without saying so
        if s.name not in sink.result.done and s.name not in sink.result.failed:
            sink.model_failed(s.name, "no outputs (its shard ended early)")
    res = sink.result
    res.skipped, res.info, res.seconds = skipped, dict(info or {}), time.perf_counter() - t0
    return res


def sweep_models(
    store: RunStore,
    table,
    specs: Sequence[ModelSpec],
    weights: Mapping[str, str],
    sweeper: Sweeper,
    *,
    data_key: str,
    split,
    batch_size: int = 256,
    with_features: bool = False,
) -> SweepResult:
    """:func:`sweep_arrays` over an ImageTable, decoded only when some model is not current;
    undecodable images get an error row and are left out."""
    keys = {
        s.name: model_key(s, weights.get(s.name), data_key, table.classes, split, with_features)
        for s in specs
    }
    if all(is_current(store, n, k, with_features) for n, k in keys.items()):
        return SweepResult(skipped=sorted(keys), n_images=len(table))
    images, ok, errors = table.decode()
    store.record_errors(e.as_row() for e in errors)
    if not len(ok):
        raise ValueError(
            f"no image of split {split!r} could be decoded ({len(errors)} errors in errors.parquet)"
        )
    part = table.take(ok)
    return sweep_arrays(
        store,
        images,
        part.example_ids,
        part.labels,
        table.classes,
        specs,
        weights,
        sweeper,
        data_key=data_key,
        split=split,
        batch_size=batch_size,
        with_features=with_features,
    )


def sweep_stage(store: RunStore, inputs, cfg) -> tuple[str, SweepResult]:
    """The zoo over the fit (and eval) split. ``cfg``: the ``[ray]`` section."""
    splits = inputs.sweep_splits()
    table = inputs.data.split(splits)
    limit = inputs.config.data.limit
    if limit:  # the first `limit` examples of each split
        keep = np.concatenate([np.flatnonzero(table.column("split") == s)[:limit] for s in splits])
        table = table.take(np.sort(keep))
    weights = inputs.weights
    res = sweep_models(
        store,
        table,
        list(inputs.zoo),
        weights,
        inputs.services.sweeper,
        data_key=inputs.data_key,
        split=splits,
        batch_size=cfg.batch_size,
        with_features=cfg.with_features,
    )
    n_models = len(res.done) + len(res.skipped) + len(res.failed)
    line = (
        f"{n_models} models x {len(table):,} images ({'+'.join(splits)}): {len(res.done)} run, "
        f"{len(res.skipped)} current, {len(res.failed)} failed"
    )
    if res.failed:
        line += "; failed: " + ", ".join(
            f"{k} ({v.splitlines()[0][:80]})" for k, v in res.failed.items()
        )
    if len(res.done) + len(res.skipped) == 0:
        raise RuntimeError("every model failed in the sweep; the reasons are in errors.parquet")
    return line, res


def swept_models(store: RunStore, zoo) -> list[str]:
    """The zoo's models whose predictions are stored in this run (in zoo order)."""
    rec = sweep_records(store)
    return [
        m.name
        for m in zoo
        if rec.get(m.name, {}).get("status") == "done" and store.exists(prediction_path(m.name))
    ]


def run_sweep_stage(store: RunStore, inputs, cfg) -> str:
    """Stage: :func:`sweep_stage`'s line."""
    return sweep_stage(store, inputs, cfg)[0]


def sweep_current(store: RunStore, inputs) -> bool:
    """Every model of the zoo has its stored outputs, as they were written."""
    rec = sweep_records(store)
    done = swept_models(store, inputs.zoo)
    return len(done) == len(inputs.zoo) and all(intact(store, m, rec[m]) for m in done)


def sweep_result(store: RunStore, inputs) -> list:
    """What the sweep produced: each model's output key and status (the stages after it rerun
    only when these change)."""
    rec = sweep_records(store)
    return sorted(
        (m.name, rec.get(m.name, {}).get("key"), rec.get(m.name, {}).get("status"))
        for m in inputs.zoo
    )
