"""The mitigate stage: fix the failures the audit found and prove each fix on held-out data.

Per model (one executor task each, :func:`audit.mitigate.task.run_model`), its linear head
is retrained on the stored features of the train split plus what each method of
:mod:`audit.mitigate.methods` adds (the generated images of its hard captions, its
cluster's shared set, pool images, upweighted fit images); choices use the fit split only.
Gains are measured on the eval split with paired bootstrap intervals: on the planted groups
(``eval = planted``, data with a ``group`` column) and on the nearest eval images of each
hard caption (``eval = nearest_caption``, any data). Writes ``mitigation.parquet``.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from audit.mitigate.task import MITIGATION_SCHEMA, HardClass, ModelTask, Setting
from audit.pipeline.config import MitigateSection
from audit.slots import SlotGrammar
from audit.store import RunStore

log = logging.getLogger(__name__)


class SplitSpace:
    """The joint embedding of the rows every model predicted, per split, with class indexes."""

    def __init__(self, store: RunStore, inputs, models: list[str]):
        from audit.embed import embed_table
        from audit.index import ClassIndex
        from audit.pipeline.directions import embedder_for

        data = inputs.data
        fit, ev = inputs.fit_split, inputs.eval_split
        splits = [s for s in dict.fromkeys(["train", fit, ev, "pool"]) if len(data.split(s))]
        self.emb, _ = embedder_for(inputs, train=False)
        E = embed_table(store, self.emb, data.split(splits), progress=False)
        have = set(E.example_ids.astype(str).tolist())
        for m in models:  # rows every model predicted (undecodable images have none)
            t = store.read_table(f"predictions/model={m}", columns=["example_id"])
            have &= set(t["example_id"].to_pylist())
        self.part = {}
        for s in splits:
            t = data.split(s)
            self.part[s] = t.take(np.flatnonzero(np.isin(t.example_ids.astype(str), list(have))))
        self.ids = {s: t.example_ids.astype(str) for s, t in self.part.items()}
        self.X = {s: E.align(self.ids[s]) for s in splits}
        self.index = {s: ClassIndex(self.X[s], self.part[s].labels) for s in (fit, ev)}

    def nearest(self, split: str, caption: str, cls: int, k: int) -> np.ndarray:
        _, idx = self.index[split].search(self.emb.encode_text([caption]), k, cls)
        return idx[0][idx[0] >= 0]

    def hardest_first(self, split: str, row: dict, cls: int) -> np.ndarray:
        """The split's rows of class ``cls``, hardest first by the direction of ``row``."""
        from audit.directions import decision_from_row

        in_c = np.flatnonzero(self.part[split].labels == cls)
        if not len(in_c):  # a class the split has no image of (a small pool at 1,000 classes)
            return in_c
        return in_c[np.argsort(decision_from_row(row, self.X[split][in_c]), kind="stable")]


def planted_groups(acc: pa.Table | None, ev_table, min_gap: float, classes) -> dict[str, list]:
    """Per model, the planted groups that fail on the fit split (``accuracy.parquet``: at
    least ``min_gap`` below their class), with their eval rows."""
    if acc is None or ev_table is None or "group" not in ev_table.columns:
        return {}
    groups = ev_table.column("group").astype(str)
    out: dict[str, list] = {}
    for r in acc.to_pylist():
        if r["attribute"] != "group" or r["class"] not in classes:
            continue
        if r["class_accuracy"] - r["accuracy"] >= min_gap:
            idx = np.flatnonzero(groups == r["value"])
            if len(idx):
                out.setdefault(r["model"], []).append((classes.index(r["class"]), r["value"], idx))
    return out


def _attribute_group(space: SplitSpace, inputs, grammar, caption: str, c: int) -> tuple:
    """``(eval rows of class c whose attributes show every slot of the caption, the slots)``,
    or ``(None, "")`` when the eval split lacks the caption's attribute columns."""
    slots = grammar.parse(caption)
    ev = space.part[inputs.eval_split]
    if not slots or any(a not in ev.columns for a in slots):
        return None, ""
    rows = np.flatnonzero((ev.labels == c) & grammar.matches(ev, slots))
    return rows, ", ".join(f"{a}={v}" for a, v in slots.items())


def hard_class(
    space: SplitSpace, inputs, row: dict, caption: str | None, k: int, grammar
) -> HardClass:
    """A failing class of a model: its named caption's nearest images (fit and eval), or, for
    an unnamed mode, the ``k`` images its direction finds hardest; pool and fit rows of the
    class, hardest first."""
    fit, ev = inputs.fit_split, inputs.eval_split
    c = inputs.data.classes.index(row["class"])
    pool = space.hardest_first("pool", row, c) if "pool" in space.X else np.zeros(0, int)
    fit_order = space.hardest_first(fit, row, c)
    if caption is None:
        near_fit, near_ev = fit_order[:k], space.hardest_first(ev, row, c)[:k]
        return HardClass(c, caption, near_fit, near_ev, pool, fit_order)
    near_fit, near_ev = (space.nearest(s, caption, c, k) for s in (fit, ev))
    group, slots = _attribute_group(space, inputs, grammar, caption, c)
    return HardClass(c, caption, near_fit, near_ev, pool, fit_order, group, slots)


def failing_modes(view, clusters: bool = False) -> dict[str, list[tuple[str, int, str | None]]]:
    """Per model (per cluster with ``clusters``): ``(class, mode, named caption or None)`` of
    each failing class, its most failing named mode, else its strongest unnamed one."""
    out: dict[tuple[str, str], tuple[int, str | None]] = {}
    for r in view.table("modes.parquet").to_pylist():
        key = (r["scope"], r["class"])
        if r["scope"].startswith("cluster:") != clusters or (
            key in out and out[key][1] is not None
        ):
            continue
        if key not in out or r["named"]:
            out[key] = (int(r["mode"]), r["caption"] if r["named"] else None)
    by_scope: dict[str, list] = {}
    for (m, cls), (mode, caption) in sorted(out.items()):
        by_scope.setdefault(m, []).append((cls, mode, caption))
    return by_scope


def ok_directions(view) -> dict[tuple[str, str, int], dict]:
    """``{(scope, class, mode): row}`` of the directions the run fitted (status ok)."""
    return {
        (r["scope"], r["class"], r["mode"]): r
        for r in view.table("directions.parquet").to_pylist()
        if r["status"] == "ok"
    }


def sets_by_scope(view) -> dict[str, dict[str, list[str]]]:
    """``{scope: {generator: [set ids]}}`` of the run's synthetic sets."""
    out: dict[str, dict[str, list[str]]] = {}
    for r in view.table("synthetic_sets.parquet").to_pylist():
        out.setdefault(r["scope"], {}).setdefault(r["generator"], []).append(r["set_id"])
    return out


def _tasks(
    store: RunStore, inputs, cfg: MitigateSection, models: list[str], space: SplitSpace
) -> list:
    from audit.view import RunView

    view = RunView(store, inputs.config, data=inputs.data)
    rows_by, sets_of = ok_directions(view), sets_by_scope(view)
    ev = space.part.get(inputs.eval_split)
    planted = planted_groups(view.table("accuracy.parquet"), ev, view.min_gap, inputs.data.classes)
    failing = failing_modes(view)
    grammar = SlotGrammar.of(inputs.data, inputs.config.data.attribute_templates)
    tasks = []
    for m in models:
        cl = view.clusters.get(m)
        k = int(cfg.k_nearest)
        hard = [
            hard_class(space, inputs, rows_by[(m, c, mode)], cap, k, grammar)
            for c, mode, cap in failing.get(m, [])
        ]
        tasks.append(
            ModelTask(m, cl, hard, planted.get(m, []), sets_of.get(m, {}), sets_of.get(cl, {}))
        )
    return tasks


def _line(table: pa.Table, n_models: int, errors: list[str]) -> str:
    kind = "planted" if pc.any(pc.equal(table["eval"], "planted")).as_py() else "nearest_caption"
    t = table.filter(pc.equal(table["eval"], kind)) if table.num_rows else table
    gains: dict[str, list] = {}
    for r in t.to_pylist():
        gains.setdefault(r["method"], []).append(r["gain"])
    show = ", ".join(
        f"{m} {np.nanmean(gains[m]) * 100:+.1f}" for m in ("synthetic", "control") if m in gains
    )
    line = f"{n_models} models' heads retrained; mean {kind} gain (points): {show or 'none'}"
    return line + (f"; {len(errors)} models skipped (errors.parquet)" if errors else "")


def task_inputs(store: RunStore, inputs, space: SplitSpace, cfg: MitigateSection) -> dict:
    """What every model's task shares (the keyword arguments of
    :func:`audit.mitigate.task.model_context`)."""
    return {
        "run_uri": store.uri,
        "split_ids": space.ids,
        "split_labels": {s: t.labels for s, t in space.part.items()},
        "spec_of": {s.name: s for s in inputs.zoo},
        "weights": inputs.weights,
        "classes": inputs.data.classes,
        "cfg": cfg,
        "setting": Setting(inputs.fit_split, inputs.eval_split, inputs.config.generate.k),
    }


def mitigate_stage(store: RunStore, inputs, cfg: MitigateSection) -> str:
    """Stage: retrain heads per model and method, evaluate on the eval split."""
    from audit.mitigate.synthetic import syn_feature_path
    from audit.mitigate.task import run_model
    from audit.pipeline.sweep import swept_models

    # a model the generated images could not run through is left out; without any generated
    # image (no named mode), every model still gets the methods that need none
    syn = [m for m in swept_models(store, inputs.zoo) if store.exists(syn_feature_path(m))]
    models = syn or swept_models(store, inputs.zoo)
    space = SplitSpace(store, inputs, models)
    shared = task_inputs(store, inputs, space, cfg)
    out = inputs.services.executor.map(
        run_model, _tasks(store, inputs, cfg, models, space), shared=shared
    )
    errors = [o["error"] for o in out if o["error"]]
    store.record_errors({"stage": "mitigate", "item": e.split(":")[0], "reason": e} for e in errors)
    table = pa.Table.from_pylist([r for o in out for r in o["rows"]], schema=MITIGATION_SCHEMA)
    store.write_table("mitigation.parquet", table)
    return _line(table, len(models), errors)
