"""The embedded default: build the world, train the demo zoo, audit it, print what it found.

Everything here runs offline on a laptop CPU. Stages that later issues add (the Ray sweep,
overlap and clustering, failure directions and captions) plug in through
``audit.pipeline`` hooks so this module stays the single place that wires the demo.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from audit.data.table import ImageTable
from audit.paths import cache_dir, config_path
from audit.store import RunStore, content_hash, file_hash

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    world_spec: str | None = None
    world_dir: str | None = None
    zoo: str = "demo"
    split: str = "debug"
    device: str = "cpu"
    models: list[str] | None = None
    progress: bool = True


def default_world_dir(spec_path: str) -> str:
    with open(spec_path, "rb") as f:
        return cache_dir("worlds", content_hash(f.read()))


def prepare_world(spec_path: str | None, world_dir: str | None) -> tuple[ImageTable, str]:
    """Build (or reuse) the world; returns the table and its directory."""
    from audit.data.world import build_world

    spec_path = spec_path or config_path("world", "default.toml")
    if spec_path is None:
        raise FileNotFoundError("no world spec given and configs/world/default.toml is not shipped with this install")
    world_dir = world_dir or default_world_dir(spec_path)
    return build_world(spec_path, world_dir), world_dir


def accuracy_tables(store: RunStore, data: ImageTable, models: list[str]) -> pa.Table:
    """Per model, class and attribute accuracy from the stored predictions."""
    from audit.evaluate import load_predictions
    from audit.predictions import group_accuracy

    ids = data.example_ids.astype(str)
    pos = {e: i for i, e in enumerate(ids)}
    attrs = [a for a in data.attributes if a in ("color", "background", "group", "item") or a.startswith("attr_")]
    attrs = [a for a in attrs if a != "item"]
    tables = []
    for name, preds in load_predictions(store, models).items():
        idx = np.asarray([pos[e] for e in preds["example_id"].to_pylist()])
        correct = preds["correct"].to_numpy(zero_copy_only=False)
        labels = preds["label"].to_numpy()
        tables.append(group_accuracy(name, correct, labels, data.classes, {a: data.column(a)[idx] for a in attrs}))
    return pa.concat_tables(tables)


def planted_summary(acc: pa.Table, threshold: float = 0.15) -> list[dict]:
    """Per planted group: mean accuracy on the group and on its class across models."""
    rows = [r for r in acc.to_pylist() if r["attribute"] == "group"]
    out = {}
    for r in rows:
        g = out.setdefault(r["value"], {"group": r["value"], "group_acc": [], "class_acc": [], "shows": 0, "models": 0})
        g["group_acc"].append(r["accuracy"])
        g["class_acc"].append(r["class_accuracy"])
        g["models"] += 1
        g["shows"] += int(r["class_accuracy"] - r["accuracy"] >= threshold)
    return [
        {**g, "group_acc": float(np.mean(g["group_acc"])), "class_acc": float(np.mean(g["class_acc"]))}
        for g in sorted(out.values(), key=lambda g: g["group"])
    ]


def run_demo(cfg: DemoConfig) -> RunStore:
    """The foundation demo: world -> trained zoo -> per-model predictions -> accuracy tables."""
    from audit import versions
    from audit.evaluate import evaluate_zoo
    from audit.zoo.spec import ZooSpec
    from audit.zoo.train import train_zoo, trained_weights

    t0 = time.perf_counter()
    store = RunStore(cfg.out)
    data, world_dir = prepare_world(cfg.world_spec, cfg.world_dir)
    zoo = ZooSpec.from_toml(cfg.zoo).select(cfg.models)
    store.update_manifest(
        kind="demo",
        config={"world_spec": cfg.world_spec or config_path("world", "default.toml"), "zoo": zoo.path, "split": cfg.split, "device": cfg.device},
        data={"world_dir": os.path.abspath(world_dir), "examples_hash": file_hash(os.path.join(world_dir, "examples.parquet")), "classes": data.classes},
        zoo={"name": zoo.name, "models": zoo.names, "families": {m.name: m.family for m in zoo}},
        versions=versions(),
    )
    print(f"world: {len(data)} images in {world_dir} ({time.perf_counter() - t0:.1f}s)")

    t1 = time.perf_counter()
    results = train_zoo(zoo, data, device=cfg.device, progress=cfg.progress)
    n_trained = sum(r.trained for r in results)
    print(f"zoo: {len(zoo)} models, {n_trained} trained now, {len(results) - n_trained} from cache ({time.perf_counter() - t1:.1f}s)")
    store.set_stage("train", "done", trained=[r.name for r in results if r.trained])

    split = data.split(cfg.split)
    images, ok, errors = split.decode()
    store.record_errors(e.as_row() for e in errors)
    split = split.take(ok)
    weights = trained_weights(zoo, data)
    t2 = time.perf_counter()
    done = evaluate_zoo(zoo, data.classes, images, split.example_ids, split.labels, store, weights, cfg.device, progress=cfg.progress)
    store.set_stage("predict", "done", models=done)
    print(f"evaluated {len(done)}/{len(zoo)} models on {len(split)} {cfg.split} images ({time.perf_counter() - t2:.1f}s)")

    acc = accuracy_tables(store, split, done)
    store.write_table("accuracy.parquet", acc)
    store.set_stage("accuracy", "done")
    print_summary(acc, zoo)
    store.update_manifest(seconds=round(time.perf_counter() - t0, 1))
    print(f"\nrun directory: {store.uri}  ({time.perf_counter() - t0:.1f}s)")
    return store


def print_summary(acc: pa.Table, zoo) -> None:
    rows = acc.to_pylist()
    overall = {r["model"]: r["accuracy"] for r in rows if r["class"] == "*"}
    fam = {m.name: m.family for m in zoo}
    print("\nDebug accuracy per model:")
    for name, a in overall.items():
        print(f"  {name:22s} {fam.get(name, ''):10s} {a:6.1%}")
    print("\nPlanted failure modes (mean over models; 'shows' = models with group >= 15 points below class):")
    print(f"  {'group':32s} {'group acc':>9s} {'class acc':>9s}  shows")
    for g in planted_summary(acc):
        print(f"  {g['group']:32s} {g['group_acc']:9.1%} {g['class_acc']:9.1%}  {g['shows']}/{g['models']}")
