"""``zoo-audit demo``: the whole audit on the embedded default, offline, on a laptop CPU.

World -> demo zoo (trained once, cached) -> Ray sweep over the debug split -> accuracy per
planted group -> failure overlap and architecture clustering -> failure directions named
by captions and checked on the nearest images. Every stage is skipped when its outputs in
the run directory are current, so a second run only prints the summary.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict

from audit.demo import DemoConfig, accuracy_tables, format_summary, prepare_world
from audit.paths import config_path
from audit.store import RunStore, content_hash, file_hash


def run_demo(cfg: DemoConfig) -> RunStore:
    from audit import versions
    from audit.zoo.spec import ZooSpec
    from audit.zoo.train import train_zoo, trained_weights
    from cluster.directions_stage import DirectionsConfig, directions_stage, format_directions
    from cluster.generate_stage import GenerateConfig, format_sets, generate_stage
    from cluster.pipeline import connect, stats_stage, sweep_stage
    from cluster.sweep import sweep_records

    t0 = time.perf_counter()
    store = RunStore(cfg.out)
    data, world_dir = prepare_world(cfg.world_spec, cfg.world_dir)
    zoo = ZooSpec.from_toml(cfg.zoo).select(cfg.models)
    families = {m.name: m.family for m in zoo}
    store.update_manifest(
        kind="demo",
        config={"world_spec": cfg.world_spec or config_path("world", "default.toml"), "zoo": zoo.path,
                "split": cfg.split, "device": cfg.device},  # fmt: skip
        data={"world_dir": os.path.abspath(world_dir), "examples_hash": file_hash(os.path.join(world_dir, "examples.parquet")),
              "classes": data.classes},  # fmt: skip
        zoo={"name": zoo.name, "models": zoo.names, "families": families},
        versions=versions(),
    )
    print(f"world: {len(data)} images in {world_dir} ({time.perf_counter() - t0:.1f}s)")

    t = time.perf_counter()
    results = train_zoo(zoo, data, device=cfg.device, progress=cfg.progress)
    n_trained = sum(r.trained for r in results)
    print(f"zoo: {len(zoo)} models, {n_trained} trained now, {len(results) - n_trained} from cache ({time.perf_counter() - t:.1f}s)")
    store.set_stage("train", "done", trained=[r.name for r in results if r.trained])
    weights = trained_weights(zoo, data)

    t = time.perf_counter()
    dcfg = DirectionsConfig(fit_split=cfg.split)
    started = False
    try:
        # debug: where failures are found; test: where captions are checked on nearest images
        res = sweep_stage(store, data, [cfg.split, dcfg.eval_split], zoo, weights, num_cpu_workers=max(1, min(2, os.cpu_count() or 1)),
                          with_features=True, progress=cfg.progress)  # fmt: skip
        print(f"sweep: {len(res.done)} run, {len(res.skipped)} up to date, {len(res.failed)} failed ({time.perf_counter() - t:.1f}s)")
        for name, reason in res.failed.items():
            print(f"  FAILED {name}: {reason.splitlines()[0]}")
        done = sorted(res.done + res.skipped)

        # the report depends only on the models' stored outputs and the stage configs
        records = sweep_records(store)
        key = content_hash("report", {m: records.get(m, {}).get("key") for m in done}, asdict(dcfg), cfg.split)
        if store.stage_done("report", key) and store.exists("summary.txt"):
            print("\n" + store.read_bytes("summary.txt").decode())
            print("(statistics and directions are current: nothing recomputed)")
        else:
            split = data.split(cfg.split)
            acc = accuracy_tables(store, split, done)
            store.write_table("accuracy.parquet", acc)
            store.set_stage("accuracy", "done")
            parts = [format_summary(acc, zoo)]
            print("\n" + parts[-1])
            stats = stats_stage(store, families, models=done, example_ids=split.example_ids.astype(str))
            parts.append(stats.summary)
            print("\n" + parts[-1])
            t = time.perf_counter()
            started = connect(None, num_cpus=os.cpu_count())  # directions of the models fit in parallel Ray tasks
            d = directions_stage(store, data, done, dcfg, world_dir=world_dir, progress=cfg.progress)
            parts.append(format_directions(d.directions, d.captions, d.subpopulations, d.planted, families, sim=d.similarity))
            print(f"\ndirections: {d.directions.num_rows} rows, {d.captions.num_rows} captions ({time.perf_counter() - t:.1f}s)")
            print(parts[-1])
            t = time.perf_counter()
            sets = generate_stage(store, d.captions, d.directions, key, GenerateConfig(backend=f"world:{world_dir}"))
            parts.append(format_sets(sets))
            print(f"\ngeneration ({time.perf_counter() - t:.1f}s)\n" + parts[-1])
            store.write_bytes("summary.txt", "\n\n".join(parts).encode())
            store.set_stage("report", "done", key=key)
    finally:
        if started:
            import ray

            ray.shutdown()
    store.update_manifest(seconds=round(time.perf_counter() - t0, 1))
    print(f"\nrun directory: {store.uri}  ({time.perf_counter() - t0:.1f}s)")
    return store
