"""A second planted dataset, audited as a user's own data (issue 9), at full size.

Builds ``configs/world/second.toml`` (ten classes, other colours and textures than the
default world, seven planted rare values, the coat with two), exports it as a plain Parquet
manifest (integer labels, an ``item`` column naming the classes, ``color`` and
``background`` columns; no spec, no captions, no ground truth) and runs

    zoo-audit run CONFIG --out OUT/run        # CONFIG sets only [data] path and class_column

then checks the run against the ground truth kept aside:

- per (model, class, planted mode) whose planted group fails ``[stats] min_gap`` (15 points
  by default; ``--min-gap`` overrides it) or more below its class on the run's fit split
  (``[data] split``), read through RunView: does the top-1 hard caption of some mode of that
  (model, class) name the planted value (target >= 90%);
- the two-mode class: the scopes (models or clusters) with two significant modes named by
  the two planted values;
- the generate stage's sets and their generator (target: ``retrieval``);
- the exit status (target 0), the C grid's edges in directions.parquet.

    python benchmarks/bench_second_world.py --out /tmp/second [--fast] [--zoo demo]

``--fast`` adds ``[mitigate] enabled = false`` and ``[report] enabled = false`` (the stages
after generation). Use your own ``ZOO_AUDIT_CACHE`` to keep its models apart. Figures go to
``OUT/second_world.json``. The figures checked against the planted truth are oracle figures
(only a planted dataset has them): the JSON says which under ``oracle``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
from _common import machine_record

ORACLE = (
    "failing_triples, named_fraction, per_mode, two_mode_scopes and the 'not named' lines are "
    "measured against the planted ground truth (truth.parquet), which a user's data does not have"
)


def _top_hard(view) -> list[dict]:
    """The rank-1 hard captions of the run."""
    caps = view.table("captions.parquet").to_pylist()
    return [r for r in caps if r["polarity"] == "hard" and r["rank"] == 1]


def planted_naming(view, truth, spec, min_gap: float | None = None) -> list[dict]:
    """One row per (model, class, planted rare mode) on the run's fit split, ``fails`` when
    its group is ``min_gap`` (default: the run's ``[stats] min_gap``) or more below its class."""
    min_gap = view.min_gap if min_gap is None else min_gap
    caps = _top_hard(view)
    gt = {r["example_id"]: r for r in truth.to_pylist()}
    rare = [m for m in spec.planted if m.kind == "rare"]  # associations are the cue, not the target
    out = []
    for model in view.zoo_models:
        pred = view.table(f"predictions/model={model}")
        if pred is None:
            continue
        p = [r for r in pred.to_pylist() if gt[r["example_id"]]["split"] == view.fit_split]
        for m in rare:
            in_c = [r for r in p if gt[r["example_id"]]["item"] == m.cls]
            grp = [r for r in in_c if gt[r["example_id"]][m.attribute] == m.value]
            if not grp:
                continue
            acc_c = float(np.mean([r["correct"] for r in in_c]))
            acc_g = float(np.mean([r["correct"] for r in grp]))
            tops = [r["caption"] for r in caps if r["scope"] == model and r["class"] == m.cls]
            out.append(
                {
                    "model": model,
                    "class": m.cls,
                    "mode": f"{m.attribute}={m.value}",
                    "class_acc": acc_c,
                    "group_acc": acc_g,
                    "fails": acc_c - acc_g >= min_gap,
                    "named": any(re.search(rf"\b{re.escape(m.value)}\b", c) for c in tops),
                    "top_hard": tops,
                }
            )
    return out


def two_mode_scopes(view, cls: str, values: list[str]) -> list[str]:
    """The scopes with two or more significant modes of ``cls`` whose top hard captions name
    every one of ``values``."""
    dirs = view.table("directions.parquet").to_pylist()
    caps = _top_hard(view)
    out = []
    for scope in sorted({r["scope"] for r in dirs}):
        ok = {
            r["mode"]
            for r in dirs
            if r["scope"] == scope and r["class"] == cls and r["status"] == "ok"
        }
        tops = [
            r["caption"]
            for r in caps
            if r["scope"] == scope and r["class"] == cls and r["mode"] in ok
        ]
        if len(ok) >= 2 and all(any(re.search(rf"\b{v}\b", c) for c in tops) for v in values):
            out.append(scope)
    return out


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True)
    p.add_argument(
        "--spec",
        default=os.path.join(os.path.dirname(__file__), "..", "configs", "world", "second.toml"),
    )
    p.add_argument("--zoo", default="demo")
    p.add_argument("--fast", action="store_true", help="no mitigation, no report")
    p.add_argument(
        "--fmnist",
        default=None,
        help="Fashion-MNIST IDX directory (default: found as the demo finds it)",
    )
    p.add_argument(
        "--min-gap",
        type=float,
        default=None,
        help="a planted group 'fails' this far below its class (default: the run's [stats] min_gap)",
    )
    return p.parse_args(argv)


def build(a) -> tuple[str, object, float]:
    """Build the world, export it as a plain manifest and keep its truth aside; returns
    ``(the audit config's path, the truth table, seconds)``."""
    from audit.data.world import build_world, export_manifest

    os.makedirs(a.out, exist_ok=True)
    t0 = time.perf_counter()
    world = build_world(a.spec, os.path.join(a.out, "world"), fmnist_dir=a.fmnist)
    manifest = export_manifest(world, os.path.join(a.out, "data", "examples.parquet"))
    truth = world.table.select(["example_id", "split", "item", "color", "background"])
    pq.write_table(truth, os.path.join(a.out, "truth.parquet"))
    t_build = time.perf_counter() - t0
    cfg = os.path.join(a.out, "audit.toml")
    extra = "\n[mitigate]\nenabled = false\n[report]\nenabled = false\n" if a.fast else ""
    zoo = "" if a.zoo == "demo" else f'\n[zoo]\nmanifest = "{a.zoo}"\n'
    with open(cfg, "w") as f:
        f.write(f'[data]\npath = "{manifest}"\nclass_column = "item"\n{zoo}{extra}')
    return cfg, truth, t_build


def _c_grid(view) -> dict | None:
    dirs = view.table("directions.parquet", ["mode", "C", "C_on_edge", "status"])
    if dirs is None:
        return None
    d = [r for r in dirs.to_pylist() if r["mode"] == 0 and r["C"] == r["C"]]
    return {
        "pairs": len(d),
        "on_edge": sum(r["C_on_edge"] for r in d),
        "chosen_C": {str(c): sum(r["C"] == c for r in d) for c in sorted({r["C"] for r in d})},
    }


def _by_mode(rows: list[dict]) -> dict:
    by_mode = {}
    for r in rows:
        s = by_mode.setdefault(
            f"{r['class']}:{r['mode']}", {"models_failing": 0, "named_when_failing": 0, "models": 0}
        )
        s["models"] += 1
        s["models_failing"] += r["fails"]
        s["named_when_failing"] += r["fails"] and r["named"]
    return by_mode


def _two_mode(view, spec) -> tuple[str, list[str]]:
    """The class with two planted rare modes, and the scopes that find and name both."""
    rare = [m for m in spec.planted if m.kind == "rare"]
    two = [m for m in rare if sum(x.cls == m.cls for x in rare) == 2]
    if not two or not view.has("directions.parquet"):
        return (two[0].cls if two else ""), []
    return two[0].cls, two_mode_scopes(view, two[0].cls, [m.value for m in two])


def check(view, truth, spec, min_gap: float | None) -> tuple[dict, list[dict]]:
    """The run against the truth kept aside: ``(figures, one row per planted triple)``."""
    rows = planted_naming(view, truth, spec, min_gap) if view.has("captions.parquet") else []
    failing = [r for r in rows if r["fails"]]
    named = float(np.mean([r["named"] for r in failing])) if failing else float("nan")
    two_cls, both = _two_mode(view, spec)
    sets = view.table("synthetic_sets.parquet")
    sets = [] if sets is None else sets.to_pylist()
    result = {
        "failing_triples": len(failing),
        "named_fraction": named,
        "per_mode": _by_mode(rows),
        "two_mode_class": two_cls,
        "two_mode_scopes": both,
        "oracle": ORACLE,
        "sets": len(sets),
        "set_images": sum(s["n_images"] for s in sets),
        "generators": sorted({s["generator"] for s in sets}),
        "C_grid": _c_grid(view),
        "captions": view.manifest.get("captions"),
    }
    return result, rows


def main(argv=None) -> None:
    a = _args(argv)
    from audit.data.world import WorldSpec
    from audit.view import RunView

    cfg, truth, t_build = build(a)
    run_dir = os.path.join(a.out, "run")
    t1 = time.perf_counter()
    cmd = [sys.executable, "-m", "cluster.cli", "run", cfg, "--out", run_dir]
    proc = subprocess.run(cmd, text=True)
    t_run = time.perf_counter() - t1
    try:
        view = RunView.open(run_dir)
    except FileNotFoundError as e:
        sys.exit(f"{e} (the run exited {proc.returncode})")
    figures, rows = check(view, truth, WorldSpec.from_toml(a.spec), a.min_gap)
    result = {"exit_code": proc.returncode, "build_s": round(t_build, 1), "run_s": round(t_run, 1)}
    result |= figures
    result["machine"] = {"python": platform.python_version(), **machine_record()}
    with open(os.path.join(a.out, "second_world.json"), "w") as f:
        json.dump({**result, "triples": rows}, f, indent=1)
    print(json.dumps(result, indent=1))
    failing = [r for r in rows if r["fails"]]
    for r in failing:
        if not r["named"]:
            gap = r["class_acc"] - r["group_acc"]
            print(
                f"not named (oracle: planted truth): {r['model']} {r['class']} {r['mode']} (gap {gap:.2f}): {r['top_hard']}"
            )
    ok = (
        proc.returncode == 0
        and failing
        and figures["named_fraction"] >= 0.9
        and figures["two_mode_scopes"]
        and figures["generators"] == ["retrieval"]
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
