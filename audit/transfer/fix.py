"""``zoo-audit fix RUN --zoo NEW``: a family's shared fix applied to members it never audited.

Each new member runs once over the run's data (the same splits, decoded once, through the
injected sweeper) and over the run's generated images; it is assigned to the audited
cluster whose failures it shares most (:mod:`audit.transfer.assign`); its linear head is
retrained with that cluster's shared set, the mix (lambda, images per caption) chosen on the
fit split as the mitigate stage chooses it, and the gain measured on the eval split against
the lambda = 0 control and the set of the cluster it shares least with. No direction is
fitted, nothing is generated: the cost is one sweep of the member plus head retraining.
The new members' outputs live under ``RUN/transfer/`` (a run store of their own, so the
audited run is never touched); ``transfer.parquet`` and ``transfer_assign.parquet`` go into
the run directory (:mod:`audit.transfer.tables`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import pyarrow as pa

from audit.pipeline.inputs import RunInputs, Services
from audit.store import RunStore
from audit.transfer.tables import ASSIGN, ASSIGN_SCHEMA, OUTPUTS, TRANSFER, TRANSFER_SCHEMA
from audit.view import RunView

log = logging.getLogger(__name__)

#: what a run must hold for its clusters' sets to be applied, and the stage that writes it
NEEDS = {
    "clusters.parquet": "stats",
    "directions.parquet": "directions",
    "modes.parquet": "name",
    "synthetic_sets.parquet": "generate",
    "synthetic_images.parquet": "classify",
}


@dataclass
class FixOutcome:
    table: pa.Table  # transfer.parquet
    assign: pa.Table  # transfer_assign.parquet
    lines: list[str] = field(default_factory=list)  # what the console shows, a line per step
    errors: dict[str, str] = field(default_factory=dict)  # member -> why it was not fixed
    seconds: float = 0.0


def check_run(view: RunView) -> None:
    """The run reached the stages whose outputs a fix reuses (one line naming the first missing)."""
    for rel, stage in NEEDS.items():
        if not view.has(rel):
            raise ValueError(
                f"run {view.store.uri} has no {rel}: its audit did not finish the {stage!r} stage "
                "(with [directions], [generate] and [mitigate] enabled); finish the audit "
                "(rerun its `zoo-audit run`) before fixing new members from it"
            )
    if view.data is None:
        raise FileNotFoundError(
            f"the data of run {view.store.uri} ({view.config.data.path or view.world_dir}) is not "
            "on this machine; new members must run over the same images"
        )


def member_inputs(view: RunView, manifest: str, models, services: Services) -> RunInputs:
    """The run's data and config with the new zoo; the data must be the audited data."""
    from audit.pipeline.checks import check_embedder_model, check_train_split
    from audit.pipeline.inputs import load_data, table_key
    from audit.zoo.spec import ZooSpec

    cfg = view.config
    cfg = cfg.model_copy(update={"zoo": cfg.zoo.model_copy(update={"manifest": manifest})})
    zoo = ZooSpec.from_toml(manifest).select(list(models) if models else None)
    data, world_dir = load_data(cfg)
    key = table_key(data)
    if key != (view.manifest.get("data") or {}).get("key"):
        raise ValueError(
            f"the data of run {view.store.uri} changed since it was audited (its content key "
            "differs); audit it again before fixing new members from it"
        )
    check_embedder_model(cfg, zoo)
    check_train_split(cfg, data, zoo)
    return RunInputs(cfg, data, key, world_dir, zoo, services)


def member_errors(view: RunView, inputs: RunInputs) -> dict[str, str]:
    """The members that cannot be fixed, known before any work: a name already audited, a
    head declared for another number of classes (``kwargs.num_classes``)."""
    n = len(inputs.data.classes)
    errors = {}
    for spec in inputs.zoo:
        declared = spec.kwargs.get("num_classes")
        if spec.name in view.zoo_models:
            errors[spec.name] = (
                f"already audited in {view.store.uri}: its own fix is in mitigation.parquet"
            )
        elif declared is not None and declared != n:
            errors[spec.name] = (
                f"its head has {declared} classes (kwargs.num_classes) and the run's data {n} "
                f"({', '.join(inputs.data.classes[:5])}{', ...' if n > 5 else ''}); a fix "
                "retrains the head of a member of the same classes"
            )
    return errors


def outputs_store(view: RunView) -> RunStore:
    store = view.store
    return RunStore(store.path(OUTPUTS) if store.local else f"{store.uri.rstrip('/')}/{OUTPUTS}")


class _Lines(list):
    """The console's lines of a fix, each with its step's time, shown as they come."""

    def __init__(self, console):
        super().__init__()
        self.console, self.t = console, time.perf_counter()

    def say(self, step: str, text: str) -> None:
        now = time.perf_counter()
        self.append(f"  {step:<9s} {text} ({now - self.t:.1f}s)")
        self.console(self[-1])
        self.t = now


def _prepare(view: RunView, out: RunStore, inputs: RunInputs, errors: dict, lines) -> list:
    """Train (when trained here), sweep and classify the new members; the names that have
    outputs on the real and the generated images."""
    from audit.pipeline.sweep import sweep_stage, swept_models
    from audit.pipeline.train import train_members
    from audit.transfer.members import classify_members

    cfg = inputs.config
    line, failed = train_members(out, inputs, cfg.zoo)
    lines.say("train", line)
    errors.update({m: f"train: {r.splitlines()[0]}" for m, r in failed.items()})
    if failed:  # the others go on
        rest = [m for m in inputs.zoo.names if m not in failed]
        if not rest:
            return []
        inputs = dataclasses.replace(inputs, zoo=inputs.zoo.select(rest))
    try:
        line, res = sweep_stage(out, inputs, cfg.ray)
        errors.update({m: f"sweep: {r.splitlines()[0]}" for m, r in res.failed.items()})
    except RuntimeError as e:  # every member failed: each one's reason is in errors
        line = str(e)
        errors.update(_sweep_errors(out, inputs.zoo.names))
    lines.say("sweep", line)
    swept = [m for m in swept_models(out, inputs.zoo) if m not in errors]
    if swept:
        line, failed = classify_members(view.store, out, inputs, swept)
        errors.update({m: f"on the generated images: {r}" for m, r in failed.items()})
        lines.say("classify", line)
    return [m for m in swept if m not in errors]


def _sweep_errors(out: RunStore, names: list[str]) -> dict[str, str]:
    t = out.read_table("errors.parquet") if out.exists("errors.parquet") else None
    rows = [] if t is None else t.to_pylist()
    got = {r["item"].removeprefix("model "): r["reason"] for r in rows if r["stage"] == "sweep"}
    return {m: f"sweep: {got.get(m, 'no outputs').splitlines()[0]}" for m in names}


def fix_zoo(
    view: RunView, inputs: RunInputs, reference: RunView | None = None, console=print
) -> FixOutcome:
    """Fix every member of ``inputs.zoo`` with its assigned cluster's shared set; writes
    ``transfer.parquet`` and ``transfer_assign.parquet`` into the run and returns them."""
    from audit.transfer.assign import assign_members
    from audit.transfer.members import error_rows, member_info, own_rows, transfer_rows

    t0 = time.perf_counter()
    check_run(view)
    out, lines = outputs_store(view), _Lines(console)
    errors, families = member_errors(view, inputs), inputs.families
    keep = [m for m in inputs.zoo.names if m not in errors]
    inputs = dataclasses.replace(inputs, zoo=inputs.zoo.select(keep)) if keep else inputs
    ready = _prepare(view, out, inputs, errors, lines) if keep else []
    assign = assign_members(view, out, ready, families) if ready else None
    info = member_info(view, assign) if assign is not None else {}
    rows = transfer_rows(view, out, inputs, assign, info, errors) if ready else []
    if ready:
        lines.say("heads", f"{len(info)} members assigned a cluster; heads retrained with its set")
    if reference is not None:
        rows += own_rows(reference, info)
    rows += error_rows(errors, families)
    table = pa.Table.from_pylist(rows, schema=TRANSFER_SCHEMA)
    assign = assign if assign is not None else pa.Table.from_pylist([], schema=ASSIGN_SCHEMA)
    view.store.write_table(TRANSFER, table)
    view.store.write_table(ASSIGN, assign)
    view.store.record_errors(
        {"stage": "fix", "item": f"model {m}", "reason": r} for m, r in errors.items()
    )
    seconds = time.perf_counter() - t0
    view.store.update_manifest(
        transfer={"zoo": inputs.zoo.path, "models": ready, "failed": sorted(errors)}
        | {"seconds": seconds, "reference": reference.store.uri if reference else None}
    )
    return FixOutcome(table, assign, list(lines), errors, seconds)
