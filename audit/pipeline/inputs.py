"""What every stage reads besides the run directory: the dataset, the zoo, the world (if
the data is one) and the injected services. Built once per run, never mutated."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from audit.data.table import ImageTable
from audit.pipeline.config import AuditConfig
from audit.pipeline.executor import Executor, SerialExecutor
from audit.zoo.spec import ZooSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Services:
    """Parallel work and services a stage may use, injected by the composition root
    (``cluster.runner``: Ray; tests: threads and in-process fakes)."""

    executor: Executor = field(default_factory=SerialExecutor)
    sweeper: Any = None  # audit.pipeline.sweep.Sweeper
    generator: Any = None  # audit.pipeline.generate.SetGenerator (the run's backend)
    # backend name -> SetGenerator, for the backend and the generators it is compared with
    generator_for: Any = None
    progress: bool = False  # progress bars (only on a terminal)


@dataclass(frozen=True)
class RunInputs:
    config: AuditConfig
    data: ImageTable
    data_key: str  # content hash of the dataset (ids, labels, image bytes, attributes)
    world_dir: str | None  # the world directory (with spec.toml) when the data is a world
    zoo: ZooSpec
    services: Services = field(default_factory=Services)

    @property
    def families(self) -> dict[str, str]:
        return {m.name: m.family for m in self.zoo}

    @property
    def fit_split(self) -> str:
        return self.config.data.split

    @property
    def eval_split(self) -> str:
        return self.config.data.eval_split

    @cached_property
    def train_key(self) -> str:
        """Content hash of the train split (what the zoo's own members train on), once per run."""
        from audit.zoo.train import data_hash

        return data_hash(self.data.split("train"))

    @cached_property
    def weights(self) -> dict[str, str]:
        """``{model: checkpoint path}`` of the members trained here whose checkpoint exists
        (read when first asked: after the train stage)."""
        from audit.zoo.train import trained_weights

        return trained_weights(self.zoo, self.train_key, self.config.zoo.cache or None)

    def mitigating(self) -> bool:
        c = self.config
        return c.mitigate.enabled and c.generate.enabled and c.directions.enabled

    def sweep_splits(self) -> list[str]:
        """The splits every model runs on: the fit split; the eval split when directions are
        checked on it; train and pool too when heads are retrained (their features)."""
        splits = [self.fit_split]
        if self.config.directions.enabled:
            splits.append(self.eval_split)
        if self.mitigating():
            splits += ["train", "pool"]
        return [s for s in dict.fromkeys(splits) if len(self.data.split(s))]

    def embed_splits(self) -> list[str]:
        """The splits the joint embedder embeds: train (its statistics), fit, eval; pool with mitigation."""
        splits = ["train", self.fit_split, self.eval_split] + (
            ["pool"] if self.mitigating() else []
        )
        return [s for s in dict.fromkeys(splits) if len(self.data.split(s))]

    def fit_ids(self) -> list[str]:
        ids = self.data.split(self.fit_split).example_ids.astype(str)
        limit = self.config.data.limit
        return list(ids[:limit] if limit else ids)


def load_data(cfg: AuditConfig) -> tuple[ImageTable, str | None]:
    """The dataset of ``[data]`` and its world directory (None when it is not a world).

    ``path`` must exist when given: a typo is an error, never a silently built new world.
    """
    from audit.data.attributes import name_classes
    from audit.data.default_world import default_world_dir
    from audit.data.readers import read_dataset
    from audit.data.world import build_world

    d = cfg.data
    if d.path:
        if not os.path.exists(d.path):
            raise FileNotFoundError(
                f"[data] path {d.path!r} does not exist; give an existing world directory, "
                "Parquet manifest or ImageFolder (or leave it empty to build [data] world_spec)"
            )
        world = d.path if os.path.isfile(os.path.join(d.path, "spec.toml")) else None
        return name_classes(read_dataset(d.path), d.class_column, d.classes), world
    if not os.path.isfile(d.world_spec):
        raise FileNotFoundError(f"[data] world_spec {d.world_spec!r} does not exist")
    out = default_world_dir(d.world_spec)
    return name_classes(build_world(d.world_spec, out), d.class_column, d.classes), out


def caption_attributes(cfg: AuditConfig, data: ImageTable) -> dict[str, str]:
    """``{attribute: template}``: the caption slots of ``[data]`` (``attributes``, else detected)."""
    from audit.data.attributes import attribute_slots, resolve_attributes

    attrs = resolve_attributes(data, cfg.data.attributes, cfg.data.class_column)
    return attribute_slots(data, attrs, cfg.data.attribute_templates)


def table_key(table: ImageTable) -> str:
    """Content hash of a dataset: its train split's and the other splits' :func:`data_hash`
    (so every image is read once, and the train split's hash is the zoo's) and its attributes."""
    from audit.cache import content_hash
    from audit.zoo.train import data_hash

    others = [s for s in dict.fromkeys(table.column("split").astype(str)) if s != "train"]
    parts = [data_hash(table.split("train")), data_hash(table.split(others)) if others else ""]
    attrs = [table.column(c).astype(str).tobytes() for c in sorted(table.attributes)]
    return content_hash(*parts, *attrs)


def load_inputs(cfg: AuditConfig, services: Services | None = None) -> RunInputs:
    from audit.pipeline.checks import check_inputs
    from audit.zoo.spec import ZooSpec

    data, world_dir = load_data(cfg)
    for split in {cfg.data.split, cfg.data.eval_split}:
        if cfg.data.split == split and not len(data.split(split)):
            raise ValueError(
                f"[data] split {split!r} of the dataset is empty; choose a split it has "
                f"({sorted(set(data.column('split').tolist()))})"
            )
    zoo = ZooSpec.from_toml(cfg.zoo.manifest).select(cfg.zoo.models or None)
    check_inputs(cfg, data, zoo)  # keys that need the data or the zoo, before any work
    return RunInputs(cfg, data, table_key(data), world_dir, zoo, services or Services())
