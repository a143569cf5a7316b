"""Pure parts of the demo: the default world, accuracy tables, the printed summary.

The demo itself (which runs the Ray sweep) lives in ``cluster/demo.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from audit.data.table import ImageTable
from audit.paths import cache_dir, config_path
from audit.store import RunStore, content_hash

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
        pids = preds["example_id"].to_pylist()
        keep = np.asarray([e in pos for e in pids])  # predictions may cover other splits too
        idx = np.asarray([pos[e] for e, k in zip(pids, keep, strict=True) if k], dtype=np.int64)
        correct = preds["correct"].to_numpy(zero_copy_only=False)[keep]
        labels = preds["label"].to_numpy()[keep]
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


def format_summary(acc: pa.Table, zoo) -> str:
    """Per-model debug accuracy and the planted groups' accuracy against their class."""
    rows = acc.to_pylist()
    overall = {r["model"]: r["accuracy"] for r in rows if r["class"] == "*"}
    fam = {m.name: m.family for m in zoo}
    lines = ["Debug accuracy per model:"]
    for name, a in overall.items():
        lines.append(f"  {name:22s} {fam.get(name, ''):10s} {a:6.1%}")
    lines.append("\nPlanted failure modes (mean over models; 'shows' = models with group >= 15 points below class):")
    lines.append(f"  {'group':32s} {'group acc':>9s} {'class acc':>9s}  shows")
    for g in planted_summary(acc):
        lines.append(f"  {g['group']:32s} {g['group_acc']:9.1%} {g['class_acc']:9.1%}  {g['shows']}/{g['models']}")
    return "\n".join(lines)
