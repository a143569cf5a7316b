"""``zoo-audit run CONFIG --out RUN``: the Ray sweep and the failure statistics from a TOML config.

Ray starts embedded in this process (``ray.init(num_cpus=..., include_dashboard=False)``)
unless ``--address`` or ``RAY_ADDRESS`` names a cluster (``ray job submit`` sets it), in
which case the run joins that cluster. Ray is imported inside functions, so the demo can
import :func:`stats_stage` without starting anything.

Config (see ``configs/audit/demo.toml``)::

    [data]   path (world dir / Parquet / ImageFolder) or world_spec; split; limit
    [zoo]    manifest; models (subset); train (train missing members); cache (checkpoints)
    [ray]    num_cpus (embedded Ray); num_cpu_workers; threads_per_worker; gpus;
             batch_size; with_features; max_restarts
    [stats]  similarity; threshold or n_clusters; method; n_boot; ci; seed
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import tomllib

from audit.data.table import ImageTable
from audit.store import RunStore, content_hash
from audit.zoo.spec import ZooSpec

log = logging.getLogger(__name__)


# -- config --------------------------------------------------------------------------------
@dataclass
class DataConfig:
    path: str = ""
    world_spec: str = ""
    split: str = "debug"
    limit: int = 0  # 0 = every example of the split


@dataclass
class ZooConfig:
    manifest: str = "demo"
    models: list[str] = field(default_factory=list)
    train: bool = True
    cache: str = ""  # checkpoint directory (default $ZOO_AUDIT_CACHE/zoo)


@dataclass
class RayConfig:
    num_cpus: int = 0  # embedded Ray only; 0 = all cores
    num_cpu_workers: int = 2
    threads_per_worker: int = 0  # 0 = CPUs / workers
    gpus: str = "auto"  # auto | no
    batch_size: int = 256
    with_features: bool = False
    max_restarts: int = 3


@dataclass
class StatsConfig:
    similarity: str = "jaccard"
    threshold: float | None = None
    n_clusters: int | None = None  # default (neither given): the number of families
    method: str = "average"
    n_boot: int = 1000
    ci: float = 0.95
    seed: int = 0


def _directions_config():
    from cluster.directions_stage import DirectionsConfig

    return DirectionsConfig()


def _generate_config():
    from cluster.generate_stage import GenerateConfig

    return GenerateConfig()


@dataclass
class AuditConfig:
    data: DataConfig = field(default_factory=DataConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    directions: object = field(default_factory=_directions_config)  # cluster.directions_stage.DirectionsConfig
    generate: object = field(default_factory=_generate_config)  # cluster.generate_stage.GenerateConfig
    path: str | None = None

    @classmethod
    def from_toml(cls, path: str) -> AuditConfig:
        if not os.path.exists(path):
            from audit.paths import config_path

            shipped = config_path("audit", path if path.endswith(".toml") else path + ".toml")
            if not shipped:
                raise FileNotFoundError(f"audit config {path!r} not found (give a TOML path or a shipped name such as 'demo')")
            path = shipped
        with open(path, "rb") as f:
            d = tomllib.load(f)
        from cluster.directions_stage import DirectionsConfig
        from cluster.generate_stage import GenerateConfig

        sections = {"data": DataConfig, "zoo": ZooConfig, "ray": RayConfig, "stats": StatsConfig,
                    "directions": DirectionsConfig, "generate": GenerateConfig}  # fmt: skip
        unknown = set(d) - set(sections)
        if unknown:
            raise ValueError(f"{path}: unknown section(s) {sorted(unknown)}; known: {', '.join(sections)}")
        base = os.path.dirname(os.path.abspath(path))
        parts = {}
        for name, klass in sections.items():
            try:
                parts[name] = klass(**d.get(name, {}))
            except TypeError as e:
                fields = list(klass.__dataclass_fields__)
                raise ValueError(f"{path}: bad [{name}] section: {e}; known keys: {fields}") from e
        cfg = cls(**parts, path=os.path.abspath(path))
        cfg.data.path = _resolve(cfg.data.path, base)
        cfg.data.world_spec = _resolve(cfg.data.world_spec, base)
        cfg.zoo.cache = _resolve(cfg.zoo.cache, base)
        if os.path.exists(os.path.join(base, cfg.zoo.manifest)):
            cfg.zoo.manifest = os.path.join(base, cfg.zoo.manifest)
        if not cfg.data.path and not cfg.data.world_spec:
            raise ValueError(f"{path}: [data] needs a 'path' (dataset) or a 'world_spec' (built on first use)")
        return cfg

    def key(self) -> str:
        d = asdict(self)
        d.pop("path")
        return content_hash(d)


def _resolve(p: str, base: str) -> str:
    """A config path: as given when it exists from the working directory, else next to the config."""
    if not p or os.path.isabs(p) or os.path.exists(p):
        return os.path.abspath(p) if p else p
    cand = os.path.join(base, p)
    return cand if os.path.exists(cand) else p


# -- Ray -----------------------------------------------------------------------------------
def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join ``address`` (or ``$RAY_ADDRESS``), or start an embedded local Ray.

    Returns True when this call started Ray (the caller then shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or None, include_dashboard=False, log_to_driver=True)
    return True


# -- stages --------------------------------------------------------------------------------
def sweep_stage(store: RunStore, data_table: ImageTable, split: str, zoo: ZooSpec | Sequence, weights: Mapping[str, str],
                *, num_cpu_workers: int = 2, threads_per_worker: int | None = None, gpus: str | bool = "auto",
                batch_size: int = 256, with_features: bool = False, max_restarts: int = 3, limit: int = 0,
                address: str | None = None, on_batch: Callable[[dict], None] | None = None,
                progress: bool = True):  # fmt: skip
    """Decode ``split`` of ``data_table`` once and run every model of ``zoo`` on it with Ray.

    Writes ``predictions/model=NAME/`` (and ``features/`` when asked), error rows, and per
    model content hashes in the manifest; models already stored with a matching hash are
    skipped. Uses the running Ray, else joins ``address`` / ``$RAY_ADDRESS``, else starts an
    embedded one (and shuts down what it started). Returns a :class:`cluster.sweep.SweepResult`.
    """
    from audit.zoo.train import data_hash
    from cluster.sweep import SweepResult, is_current, model_key, run_sweep

    part = data_table.split(split)
    if limit:
        part = part.take(list(range(min(int(limit), len(part)))))
    if len(part) == 0:
        raise ValueError(f"split {split!r} of the dataset is empty; choose another split in [data] split")
    store.set_stage("sweep", "running", split=split)
    images, ok, errors = part.decode()
    store.record_errors(e.as_row() for e in errors)
    part = part.take(ok)
    specs = list(zoo)
    dkey = data_hash(part)
    keys = {s.name: model_key(s, weights.get(s.name), dkey, data_table.classes, split, with_features) for s in specs}
    if all(is_current(store, name, key, with_features) for name, key in keys.items()):
        # nothing to run: do not start (or join) Ray at all
        store.set_stage("sweep", "done", split=split, models=sorted(keys), failed=[], seconds=0.0)
        return SweepResult(skipped=sorted(keys), n_images=len(part))
    started = connect(address)
    try:
        res = run_sweep(store, images, part.example_ids.astype(str), part.labels, data_table.classes, specs, weights,
                        data_key=dkey, split=split, num_workers=num_cpu_workers,
                        threads_per_worker=threads_per_worker or None, gpus=gpus, batch_size=batch_size,
                        with_features=with_features, max_restarts=max_restarts, on_batch=on_batch,
                        progress=progress)  # fmt: skip
    finally:
        if started:
            import ray

            ray.shutdown()
    store.set_stage("sweep", "done", split=split, models=sorted(res.done + res.skipped), failed=sorted(res.failed),
                    seconds=round(res.seconds, 2))  # fmt: skip
    return res


@dataclass
class StatsResult:
    overlap: pa.Table
    clusters: pa.Table
    families: pa.Table
    summary: str


def stats_stage(store: RunStore, families: Mapping[str, str], models: Sequence[str] | None = None, *,
                similarity: str = "jaccard", threshold: float | None = None, n_clusters: int | None = None,
                method: str = "average", n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                example_ids: Sequence[str] | None = None) -> StatsResult:  # fmt: skip
    """Failure matrix, overlap and clustering from the stored predictions (no Ray).

    ``models`` defaults to those the sweep stored in this run; ``example_ids`` restricts the
    failure matrix to those examples (e.g. the debug split of a sweep over several). Without ``threshold`` and
    ``n_clusters`` the models are cut into as many clusters as there are families. Writes
    ``overlap.parquet``, ``clusters.parquet`` and ``family_similarity.parquet``.
    """
    from audit.evaluate import load_predictions
    from audit.failures import (
        cluster_models,
        clusters_table,
        failure_matrix,
        family_similarity,
        format_stats,
        overlap_statistics,
        overlap_table,
        similarity_matrix,
    )
    from cluster.sweep import sweep_records

    if models is None:
        done = [m for m, e in sweep_records(store).items() if e.get("status") == "done"]
        models = sorted(done) or None
    preds = load_predictions(store, models)
    if len(preds) < 2:
        raise ValueError(f"failure overlap needs predictions of at least 2 models; the run has {sorted(preds)}")
    names = sorted(preds)
    fm = failure_matrix({m: preds[m] for m in names}, example_ids=None if example_ids is None else list(example_ids))
    stats = overlap_statistics(fm, n_boot=n_boot, ci=ci, seed=seed)
    sim = similarity_matrix(stats, similarity)
    if threshold is None and n_clusters is None:
        n_clusters = max(1, min(len(names), len({families.get(m, "") for m in names})))
    labels = cluster_models(sim, threshold=threshold, n_clusters=n_clusters, method=method)
    overlap = overlap_table(stats)
    clusters = clusters_table(names, families, labels)
    fam = family_similarity(sim, names, families)
    store.write_table("overlap.parquet", overlap)
    store.write_table("clusters.parquet", clusters)
    store.write_table("family_similarity.parquet", fam)
    store.set_stage("stats", "done", models=names, similarity=similarity, n_examples=fm.n_examples,
                    n_dropped=fm.n_dropped, n_clusters=int(labels.max() + 1) if len(labels) else 0)  # fmt: skip
    return StatsResult(overlap, clusters, fam, format_stats(overlap, clusters, fam, similarity))


# -- the entry point -----------------------------------------------------------------------
def load_data(cfg: DataConfig) -> ImageTable:
    from audit.data.readers import read_dataset
    from audit.demo import default_world_dir

    if cfg.path and os.path.exists(cfg.path):
        return read_dataset(cfg.path)
    if cfg.world_spec:
        from audit.data.world import build_world

        out = cfg.path or default_world_dir(cfg.world_spec)
        return build_world(cfg.world_spec, out)
    raise FileNotFoundError(f"dataset {cfg.path!r} not found; give an existing [data] path or a world_spec to build")


def run_audit(config_path: str, out: str, address: str | None = None, resume: bool = False) -> RunStore:
    """Sweep + statistics for the audit config at ``config_path`` into run directory ``out``.

    A finished run with the same config does nothing. A run directory holding an
    unfinished (killed) run, or a run of another config, needs ``resume=True``: then
    models whose outputs exist with matching content hashes are skipped and only the rest
    run.
    """
    from audit import versions
    from audit.zoo.train import train_zoo, trained_weights

    t0 = time.perf_counter()
    cfg = AuditConfig.from_toml(config_path)
    key = cfg.key()
    store = RunStore(out)
    m = store.manifest()
    stages = m.get("stages", {})
    if stages.get("audit", {}).get("status") == "done" and m.get("config_key") == key:
        print(f"run {store.uri} is finished for this config; nothing to do")
        return store
    if stages and not resume:
        what = "an unfinished run" if m.get("config_key") == key else "a run of another config"
        raise ValueError(f"run directory {store.uri} holds {what}; rerun with --resume to redo only the "
                         "models whose outputs are missing or stale, or choose a new --out")  # fmt: skip

    data = load_data(cfg.data)
    zoo = ZooSpec.from_toml(cfg.zoo.manifest).select(cfg.zoo.models or None)
    families = {s.name: s.family for s in zoo}
    store.update_manifest(kind="audit", config=asdict(cfg), config_key=key, versions=versions(),
                          data={"path": cfg.data.path or cfg.data.world_spec, "split": cfg.data.split,
                                "classes": data.classes},
                          zoo={"name": zoo.name, "path": zoo.path, "models": zoo.names, "families": families})  # fmt: skip
    cache = cfg.zoo.cache or None
    if cfg.zoo.train:
        results = train_zoo(zoo, data, cache=cache)
        store.set_stage("train", "done", trained=[r.name for r in results if r.trained])
    weights = trained_weights(zoo, data, cache=cache)

    dcfg = cfg.directions
    run_directions = bool(dcfg.embedder) and len(data.split(dcfg.eval_split)) > 0
    # the fit split finds failures; the eval split checks captions on its nearest images
    splits = [cfg.data.split, dcfg.eval_split] if run_directions and dcfg.eval_split != cfg.data.split else cfg.data.split
    started = connect(address, cfg.ray.num_cpus or None)
    try:
        res = sweep_stage(store, data, splits, zoo, weights, num_cpu_workers=cfg.ray.num_cpu_workers,
                          threads_per_worker=cfg.ray.threads_per_worker or None, gpus=cfg.ray.gpus,
                          batch_size=cfg.ray.batch_size, with_features=cfg.ray.with_features,
                          max_restarts=cfg.ray.max_restarts, limit=cfg.data.limit)  # fmt: skip
        print(f"sweep: {len(res.done)} model(s) run, {len(res.skipped)} up to date, {len(res.failed)} failed "
              f"({res.seconds:.1f}s; shards {res.shards})")  # fmt: skip
        for name, reason in res.failed.items():
            print(f"  FAILED {name}: {reason.splitlines()[0]}")
        done = sorted(res.done + res.skipped)
        fit_part = data.split(cfg.data.split)
        fit_ids = fit_part.example_ids.astype(str)
        if cfg.data.limit:
            fit_ids = fit_ids[: int(cfg.data.limit)]
        from audit.demo import accuracy_tables

        store.write_table("accuracy.parquet", accuracy_tables(store, fit_part, done))
        s = cfg.stats
        stats = stats_stage(store, families, models=done, similarity=s.similarity, threshold=s.threshold,
                            n_clusters=s.n_clusters, method=s.method, n_boot=s.n_boot, ci=s.ci, seed=s.seed,
                            example_ids=fit_ids)  # fmt: skip
        print(stats.summary)
        if not run_directions:
            print(f"directions skipped: no embedder configured or the {dcfg.eval_split!r} split is empty")
        else:
            from cluster.directions_stage import directions_stage, format_directions

            dcfg.fit_split = cfg.data.split
            from audit.demo import default_world_dir

            world_dir = cfg.data.path or (default_world_dir(cfg.data.world_spec) if cfg.data.world_spec else None)
            d = directions_stage(store, data, done, dcfg, world_dir=world_dir)
            print(format_directions(d.directions, d.captions, d.subpopulations, d.planted, families, sim=d.similarity))
            if cfg.generate.enabled:
                from cluster.generate_stage import format_sets, generate_stage

                g = cfg.generate
                if not g.url and g.backend == "world" and world_dir:
                    g.backend = f"world:{world_dir}"
                print(format_sets(generate_stage(store, d.captions, d.directions, key, g)))
    finally:
        if started:
            import ray

            ray.shutdown()
    store.set_stage("audit", "done")
    store.update_manifest(seconds=round(time.perf_counter() - t0, 1))
    print(f"\nrun directory: {store.uri}")
    return store
