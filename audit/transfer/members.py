"""The new members' part of a fix: their outputs on the run's generated images, one head
retraining task per member (through the injected executor), and the rows of
``transfer.parquet``."""

from __future__ import annotations

import dataclasses
import math

import pyarrow as pa

from audit.mitigate.task import Fit, MethodContext, ModelTask
from audit.store import RunStore


def classify_members(run: RunStore, out: RunStore, inputs, members: list[str]) -> tuple:
    """``(console line, {member: why it failed})``: the members without stored outputs on the
    run's generated images run over them (the rows of ``synthetic_images.parquet``)."""
    from audit.mitigate.synthetic import decode_pngs, load_index, syn_feature_path
    from audit.pipeline.classify import labelled_images, sweep_images

    todo = [m for m in members if not out.exists(syn_feature_path(m))]
    n = len(load_index(run).prompts)
    failed: dict[str, str] = {}
    if todo:
        index, pngs = labelled_images(run, inputs)
        if len(pngs) != n:
            raise ValueError(
                f"run {run.uri}: its generated images changed since its classify stage "
                f"({len(pngs)} now, {n} then); rerun its audit before fixing new members"
            )
        specs = [inputs.zoo.get(m) for m in todo]
        images = decode_pngs(pngs)
        failed = sweep_images(out, inputs, specs, images, index.example_ids, index.labels).failed
    line = f"{len(members)} new members x {n:,} generated images: {len(todo) - len(failed)} run, "
    return line + f"{len(members) - len(todo)} current, {len(failed)} failed", failed


def fix_member(item: tuple[ModelTask, ModelTask | None], **shared) -> dict:
    """One member: the control, its assigned cluster's set and another cluster's set (each
    generator's, the mix chosen on the fit split for that set's own failure modes), all
    evaluated on the member's planted groups and the assigned cluster's modes."""
    from audit.mitigate.methods import search_set
    from audit.mitigate.task import evaluation_rows, model_context

    task, other = item
    hard = sorted({hc.cls for t in (task, other) if t is not None for hc in t.hard})
    ctx = model_context(task, hard=hard, **shared)
    if isinstance(ctx, str):
        return {"rows": [], "error": ctx}
    fits = [("control", Fit(ctx.data.fit(), 0.0, 0, ""))]
    for method, t in (("family_set", task), ("other_set", other)):
        if t is None:
            continue
        c = MethodContext(t, ctx.data, ctx.syn, ctx.syn_X)
        for g, sets in t.cluster_sets.items():
            if sets:
                fits.append((method, dataclasses.replace(search_set(c, g, sets), scope=t.cluster)))
    rows = evaluation_rows(task, ctx.data, fits, shared["classes"], shared["cfg"].n_boot)
    return {"rows": rows, "error": None}


def _tasks(view, space, inputs, assign: pa.Table, planted: dict) -> list[tuple]:
    """Per assigned member: ``(its task with the assigned cluster's modes and set, the task of
    the cluster it shares least with that has a set, or None)``."""
    from audit.pipeline.mitigate import failing_modes, hard_class, ok_directions, sets_by_scope
    from audit.slots import SlotGrammar

    rows_by, sets_of = ok_directions(view), sets_by_scope(view)
    failing = failing_modes(view, clusters=True)
    grammar = SlotGrammar.of(inputs.data, inputs.config.data.attribute_templates)
    k = int(inputs.config.mitigate.k_nearest)

    def task(m: str, scope: str, groups: list) -> ModelTask:
        hard = [
            hard_class(space, inputs, rows_by[(scope, c, mode)], cap, k, grammar)
            for c, mode, cap in failing.get(scope, [])
        ]
        return ModelTask(m, scope, hard, groups, {}, sets_of.get(scope, {}))

    out = []
    rows = assign.to_pylist()
    for a in (r for r in rows if r["assigned"]):
        m = a["model"]
        others = [r for r in rows if r["model"] == m and not r["assigned"]]
        others = [r for r in others if sets_of.get(r["cluster"])]
        far = min(others, key=lambda r: r["similarity"])["cluster"] if others else None
        out.append((task(m, a["cluster"], planted.get(m, [])), far and task(m, far, [])))
    return out


def transfer_rows(
    view, out: RunStore, inputs, assign: pa.Table, info: dict, errors: dict
) -> list[dict]:
    """Every assigned member's rows of ``transfer.parquet`` (a member whose task fails gets
    its reason in ``errors`` instead)."""
    from audit.pipeline.mitigate import SplitSpace, planted_groups, task_inputs
    from audit.pipeline.stats import accuracy_tables

    members = [r["model"] for r in assign.to_pylist() if r["assigned"]]
    space = SplitSpace(view.store, inputs, list(view.clusters))
    acc = accuracy_tables(out, inputs.data.split(inputs.fit_split), members)
    ev = space.part.get(inputs.eval_split)
    planted = planted_groups(acc, ev, view.min_gap, inputs.data.classes)
    cfg = inputs.config.mitigate
    shared = task_inputs(view.store, inputs, space, cfg) | {"outputs_uri": out.uri}
    tasks = _tasks(view, space, inputs, assign, planted)
    done = inputs.services.executor.map(fix_member, tasks, shared=shared)
    rows = []
    for (task, _), res in zip(tasks, done, strict=True):
        if res["error"]:
            errors[task.model] = res["error"]
        rows += [_row(r, info[task.model]) for r in res["rows"]]
    return rows


def member_info(view, assign: pa.Table) -> dict[str, dict]:
    """Per member: its family, assigned cluster, that cluster's families and similarity."""
    fam_of = view.families
    info = {}
    for a in (r for r in assign.to_pylist() if r["assigned"]):
        members = [m for m, c in view.clusters.items() if c == a["cluster"]]
        info[a["model"]] = {
            "family": a["family"],
            "cluster": a["cluster"],
            "cluster_families": a["cluster_families"],
            "family_in_cluster": a["family"] in {fam_of.get(m) for m in members},
            "similarity": a["similarity"],
        }
    return info


def _row(r: dict, info: dict) -> dict:
    from audit.synthetic import is_oracle

    scope = "" if r["method"] == "control" else r["scope"]
    keep = ("lambda", "n_added", "choice", "eval", "class", "target", "n_hard", "hard_before")
    keep += ("hard_after", "gain", "gain_ci_low", "gain_ci_high", "overall_before")
    return (
        {"model": r["model"], "method": r["method"], "set_scope": scope}
        | {"generator": r["generator"], "oracle": is_oracle(r["generator"]), "error": ""}
        | {k: r[k] for k in keep}
        | {"overall_after": r["overall_after"]}
        | info
    )


def own_rows(reference, info: dict[str, dict]) -> list[dict]:
    """The members' own per-model fix (method ``synthetic``) from a full audit of them
    (``reference``: its :class:`audit.view.RunView`); ``info``: :func:`member_info`."""
    t = reference.table("mitigation.parquet")
    rows = [] if t is None else t.to_pylist()
    return [
        _row(r | {"method": "own"}, info[r["model"]])
        for r in rows
        if r["method"] == "synthetic" and r["model"] in info
    ]


def error_rows(errors: dict[str, str], families: dict[str, str]) -> list[dict]:
    """One row per member that could not be fixed, naming why."""
    nan = math.nan
    rows = []
    for m, why in sorted(errors.items()):
        rows.append(
            {"model": m, "family": families.get(m, ""), "cluster": "", "cluster_families": ""}
            | {"family_in_cluster": False, "similarity": nan, "method": "", "set_scope": ""}
            | {"generator": "", "oracle": False, "lambda": nan, "n_added": 0, "choice": ""}
            | {"eval": "", "class": "", "target": "", "n_hard": 0, "hard_before": nan}
            | {"hard_after": nan, "gain": nan, "gain_ci_low": nan, "gain_ci_high": nan}
            | {"overall_before": nan, "overall_after": nan, "error": why}
        )
    return rows
