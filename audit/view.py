"""One reader of a run directory: :class:`RunView`.

The report, the summary, the retrieval generator and the benchmarks read a finished (or
partial) run through it, so a default or a threshold lives in one place, the typed config
(:class:`audit.pipeline.config.AuditConfig`), never in a reader's own copy.
"""

from __future__ import annotations

import logging
import os
from functools import cached_property
from typing import Any

import pyarrow as pa

from audit.pipeline.config import SECTIONS, AuditConfig
from audit.store import RunStore

log = logging.getLogger(__name__)


def config_from_manifest(manifest: dict) -> AuditConfig:
    """The typed config a run was made with. Keys that this version no longer knows (a run
    of an older version) are dropped with a warning; missing ones take today's defaults."""
    raw = dict(manifest.get("config") or {})
    if not raw:
        raise ValueError("the run's manifest.json holds no config: not a run of `zoo-audit run`")
    clean: dict[str, Any] = {}
    for name, values in raw.items():
        if name not in SECTIONS:
            if name == "source":
                clean[name] = values
            continue
        known = SECTIONS[name].model_fields
        dropped = sorted(set(values) - set(known))
        if dropped:
            log.warning("run config: [%s] %s not known to this version; ignored", name, dropped)
        clean[name] = {k: v for k, v in values.items() if k in known}
    return AuditConfig.model_validate(clean)


class RunView:
    """A run directory, read: the typed config, the manifest, the data (lazily) and the tables.

    ``RunView.open(path_or_uri_or_store)``; inside a running audit the runner hands over the
    config and data it already holds (``RunView(store, config, data=...)``).
    """

    def __init__(self, store: RunStore, config: AuditConfig | None = None, data=None):
        self.store = store
        self.manifest: dict = store.manifest()
        self.config: AuditConfig = config or config_from_manifest(self.manifest)
        self._tables: dict[tuple, pa.Table | None] = {}
        if data is not None:
            self.__dict__["data"] = data

    @classmethod
    def open(cls, run: str | os.PathLike | RunStore) -> RunView:
        where = str(run) if not isinstance(run, RunStore) else run.uri
        if not isinstance(run, RunStore) and "://" not in where and not os.path.isdir(where):
            raise FileNotFoundError(
                f"{where} is not a run directory (it does not exist); give the --out of a "
                "`zoo-audit run` or `zoo-audit demo`"
            )
        store = run if isinstance(run, RunStore) else RunStore(where)
        if not store.exists("manifest.json"):
            raise FileNotFoundError(
                f"{store.uri} is not a run directory (no manifest.json); give the --out of a "
                "`zoo-audit run` or `zoo-audit demo`"
            )
        return cls(store)

    # -- the config's answers --------------------------------------------------------------
    @property
    def fit_split(self) -> str:
        return self.config.data.split

    @property
    def eval_split(self) -> str:
        return self.config.data.eval_split

    @property
    def min_gap(self) -> float:
        return self.config.stats.min_gap

    @property
    def world_dir(self) -> str | None:
        return (self.manifest.get("data") or {}).get("world_dir")

    # -- the zoo ----------------------------------------------------------------------------
    @cached_property
    def clusters(self) -> dict[str, str]:
        """``{model: "cluster:N"}`` (empty before the stats stage)."""
        t = self.table("clusters.parquet")
        return {} if t is None else {r["model"]: f"cluster:{r['cluster']}" for r in t.to_pylist()}

    @cached_property
    def families(self) -> dict[str, str]:
        fam = dict((self.manifest.get("zoo") or {}).get("families") or {})
        t = self.table("clusters.parquet")
        for r in [] if t is None else t.to_pylist():
            fam.setdefault(r["model"], r["family"])
        return fam

    @cached_property
    def zoo_models(self) -> list[str]:
        return list((self.manifest.get("zoo") or {}).get("models") or [])

    @cached_property
    def models(self) -> list[str]:
        """The models with results (clustered, or with accuracy rows), in zoo order first."""
        acc = self.table("accuracy.parquet", ["model"])
        have = set(self.clusters) | (set(acc["model"].to_pylist()) if acc is not None else set())
        return [m for m in self.zoo_models if m in have] + sorted(have - set(self.zoo_models))

    @cached_property
    def classes(self) -> list[str]:
        listed = (self.manifest.get("data") or {}).get("classes")
        if listed:
            return list(listed)
        return list(self.data.classes) if self.data is not None else []

    # -- the data ---------------------------------------------------------------------------
    @cached_property
    def data(self):
        """The run's dataset (an ImageTable with its class names), or None when it is not on
        this machine (the report then shows no real images)."""
        from audit.data.readers import read_dataset

        for p in (self.world_dir, self.config.data.path):
            if p and "://" not in p and os.path.exists(p):
                try:
                    from audit.data.attributes import name_classes

                    d = self.config.data
                    return name_classes(read_dataset(p), d.class_column, d.classes)
                except Exception as e:  # noqa: BLE001 - readers go on without real images
                    log.warning("cannot open the run's dataset %s (%s); no real images", p, e)
        return None

    # -- tables -----------------------------------------------------------------------------
    def has(self, rel: str) -> bool:
        return self.store.exists(rel)

    def table(self, rel: str, columns: list[str] | None = None) -> pa.Table | None:
        """A table of the run (read once), or None when the run does not have it; ``columns``
        that the table lacks are left out."""
        key = (rel, tuple(columns) if columns is not None else None)
        if key not in self._tables:
            self._tables[key] = self._read(rel, columns)
        return self._tables[key]

    def _read(self, rel: str, columns: list[str] | None) -> pa.Table | None:
        if not self.store.exists(rel):
            return None
        if columns is not None and rel.endswith(".parquet"):
            import pyarrow.parquet as pq

            with self.store.fs.open_input_file(self.store.path(rel)) as f:
                have = set(pq.read_schema(f).names)
            columns = [c for c in columns if c in have]
        return self.store.read_table(rel, columns=columns)

    def stage(self, name: str) -> dict:
        """The manifest's record of a stage (status, line, seconds, ...), or {}."""
        return dict((self.manifest.get("stages") or {}).get(name) or {})
