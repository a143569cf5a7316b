"""The audit's stages as a table: what each one runs, reads and writes.

A :class:`Stage` declares its inputs in ``reads``, as Dagster declares an asset's
dependencies; the runner derives the stage's key from them (and its code ``version``), so no
stage hand-writes what it depends on:

- ``"[section]"``: a config section's result-changing fields (:meth:`Section.key_fields`);
  ``"[section].key"``: one key of it;
- a named input of :data:`INPUTS` (``data``: the dataset's content key, ``zoo``: the zoo's
  member specs, ...);
- another stage's name: that stage's output key (its data version), so a stage reruns when
  what it reads was produced anew.

``writes`` are the run-directory paths that must exist for the stage to be skipped. ``fn``,
``current`` and ``result`` are ``"module:function"`` strings resolved when the stage runs,
so importing this table (the CLI's ``--force`` help, the report's stage order) is instant.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stage:
    name: str
    fn: str | Callable[..., str]  # (store, inputs, section) -> the stage's console line
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    version: int = 1
    section: str | None = None  # the config section handed to ``fn``
    needs: tuple[str, ...] = ()  # config sections whose ``enabled`` must be true for it to run
    current: str | None = None  # (store, inputs) -> bool: outputs kept outside the run are there
    result: str | None = None  # (store, inputs) -> JSON-able: what it produced (its data version)

    def resolve(self, attr: str) -> Callable[..., Any] | None:
        """The callable named by ``fn``, ``current`` or ``result`` (None when unset)."""
        ref = getattr(self, attr)
        if ref is None or callable(ref):
            return ref
        module, _, name = ref.partition(":")
        return getattr(importlib.import_module(module), name)

    def enabled(self, cfg) -> bool:
        return all(cfg.section(s).enabled for s in self.needs)


def _train_data(inputs) -> str:
    return inputs.train_key


#: named inputs a stage may read, each ``inputs -> JSON-able`` (what the key hashes)
INPUTS: dict[str, Callable[[Any], Any]] = {
    "data": lambda i: i.data_key,
    "train_data": _train_data,
    "zoo": lambda i: [m.to_dict() for m in i.zoo],
    "world": lambda i: i.world_dir is not None,
    "sweep_splits": lambda i: i.sweep_splits(),
    "embed_splits": lambda i: i.embed_splits(),
}

_D = "audit.pipeline.directions"
_M = "audit.pipeline.mitigate"

#: the audit, in order
STAGES: tuple[Stage, ...] = (
    Stage(
        "train",
        "audit.pipeline.train:train_pending",
        reads=("[zoo]", "zoo", "train_data"),
        section="zoo",
        current="audit.pipeline.train:checkpoints_current",
    ),
    Stage(
        "sweep",
        "audit.pipeline.sweep:run_sweep_stage",
        reads=("[ray]", "[data].limit", "data", "zoo", "sweep_splits", "train"),
        section="ray",
        current="audit.pipeline.sweep:sweep_current",
        result="audit.pipeline.sweep:sweep_result",
    ),
    Stage(
        "accuracy",
        "audit.pipeline.stats:accuracy_stage",
        reads=("[data].split", "data", "sweep"),
        writes=("accuracy.parquet",),
    ),
    Stage(
        "stats",
        "audit.pipeline.stats:stats_stage",
        reads=("[stats]", "[data].split", "[data].limit", "zoo", "sweep"),
        writes=("overlap.parquet", "clusters.parquet", "family_similarity.parquet"),
        section="stats",
    ),
    Stage(
        "embed",
        f"{_D}:embed_stage",
        reads=("[directions].embedder", "[data]", "data", "zoo", "embed_splits", "train"),
        needs=("directions",),
        current="audit.pipeline.directions:embed_current",
        result="audit.pipeline.directions:embed_result",
    ),
    Stage(
        "directions",
        f"{_D}:directions_stage",
        reads=("[directions]", "[data]", "[stats].min_gap", "data", "world", "sweep", "stats")
        + ("embed", "accuracy"),
        writes=(
            "directions.parquet",
            "captions.parquet",
            "subpopulations.parquet",
            "direction_similarity.parquet",
        ),
        section="directions",
        needs=("directions",),
        # v2: p-values near alpha resolved with more permutations; v3: only where the
        # bootstrap interval of the score lies above chance, twice as many at a time;
        # v5: a cluster's intervals count its images, not its (model, image) pairs
        version=5,
    ),
    Stage(
        "name",
        "audit.pipeline.name:name_stage",
        reads=("[directions]", "[data]", "[stats].min_gap", "data", "sweep", "stats", "embed")
        + ("directions",),
        writes=("modes.parquet", "shared_names.parquet"),
        section="directions",
        needs=("directions",),
        # v2: a class's later modes named by a subpopulation the earlier ones have not;
        # v3/v4: a later mode with only an earlier name is unnamed when it fails beyond that name
        # v5: ... than the class's images outside that name; v6: a cluster's intervals count
        # its images; an unnamed mode too small to tell is "undecided"; v7: with the images
        # that would decide it; v8: every name checked on every model (shared_names.parquet);
        # v9: each mode's comparison caption shows no named failure of its class; v10: or is
        # the class's reference caption
        version=10,
    ),
    Stage(
        "generate",
        "audit.pipeline.generate:generate_stage",
        reads=("[generate]", "[data]", "[mitigate].enabled", "data", "directions", "name"),
        writes=("synthetic_sets.parquet",),
        section="generate",
        needs=("directions", "generate"),
        version=2,  # v2: every named mode of a class with a name of its own, not only the first
    ),
    Stage(
        "classify",
        "audit.pipeline.classify:classify_stage",
        reads=("zoo", "train", "name", "generate"),
        writes=("synthetic_images.parquet",),
        needs=("directions", "generate"),
        version=2,  # v2: a named mode's comparison caption is labelled with its class
    ),
    Stage(
        "mitigate",
        f"{_M}:mitigate_stage",
        reads=("[mitigate]", "[data]", "[stats].min_gap", "[generate].k", "data")
        + ("sweep", "accuracy", "stats", "embed", "directions", "name", "generate", "classify"),
        writes=("mitigation.parquet",),
        section="mitigate",
        needs=("directions", "generate", "mitigate"),
        # v2: heads solved in torch (L-BFGS, strong Wolfe); at more classes than [mitigate]
        # head_classes a fit moves only the hard classes and their main confusions;
        # v3: gentler mixes tried before a generator's images are given up on
        version=3,
    ),
    Stage(
        "confirm",
        "audit.pipeline.confirm:confirm_stage",
        reads=("[stats]", "[data]", "data", "stats", "directions", "name", "generate", "classify"),
        writes=("confirmations.parquet",),
        section="stats",
        needs=("directions", "generate"),
    ),
    Stage(
        "report",
        "audit.report:report_stage",
        reads=("[report]", "[stats]", "accuracy", "stats", "directions", "name", "generate")
        + ("mitigate", "confirm"),
        writes=("report/index.html",),
        section="report",
        needs=("report",),
    ),
)

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def read_value(name: str, inputs, out_keys: dict[str, str | None]) -> Any:
    """What a stage's key hashes for one of its ``reads``."""
    if name.startswith("["):
        section, _, key = name[1:].partition("]")
        fields = inputs.config.section(section).key_fields()
        return fields.get(key.lstrip(".")) if key else fields
    if name in INPUTS:
        return INPUTS[name](inputs)
    if name in out_keys or name in STAGE_NAMES:
        return out_keys.get(name)
    raise ValueError(
        f"unknown stage input {name!r}: a '[section]', one of {sorted(INPUTS)}, or a stage"
    )


def check_table(stages: tuple[Stage, ...] | list[Stage]) -> None:
    """Every ``reads`` entry names a section, an input or an *earlier* stage (our own invariant)."""
    from audit.pipeline.config import SECTIONS

    seen: set[str] = set()
    for st in stages:
        for r in st.reads:
            section = r[1:].partition("]")[0] if r.startswith("[") else None
            ok = section in SECTIONS if section else (r in INPUTS or r in seen)
            assert ok, f"stage {st.name!r} reads {r!r}: not a section, an input or an earlier stage"
        assert (
            st.section is None
            or f"[{st.section}]" in st.reads
            or any(r.startswith(f"[{st.section}].") for r in st.reads)
        ), f"stage {st.name!r} is handed [{st.section}] but does not read it"
        seen.add(st.name)
