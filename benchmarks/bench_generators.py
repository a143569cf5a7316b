"""The fix off the world: what each generator gives on planted data handed over as a plain
manifest, with and without attribute columns in the pool.

For a dataset (``second``: ``configs/world/second.toml`` exported as a manifest; ``shapes``:
``benchmarks/make_shapes.py``, and ``digits``: ``benchmarks/make_digits.py``, this project's
own designs) it runs ``zoo-audit run`` on variants of the same manifest:

- ``attributes``: the pool carries the attribute columns (retrieval matches on them:
  ``retrieval+attributes``);
- ``raw-pool``: the pool's attribute columns are empty (a raw image pool: only train, debug
  and test are labelled; retrieval reranks by probes trained on the train split);
- ``no-<attr>``: one planted attribute column removed from the manifest, so no caption can
  name its modes: they should be reported unnamed;
- ``world`` (``second`` only): the world itself, whose renderer is the data's own generator:
  the oracle figure, with retrieval compared beside it.

and reads each run (through RunView) against the planted truth (the manifest's ``group``
column, which the audit only evaluates on): per failing (model, planted mode) pair, whether
the mode's name names the planted value (or, in a ``no-<attr>`` variant, whether it is
reported unnamed), the gain of each method and generator on the planted group (eval split,
mean over pairs, with the mean overall accuracy change), and confirmation by generation.
These are oracle *measurements* (only planted data has the truth); the generators measured
are not oracles. One table, then ``OUT/generators.json``.

    python benchmarks/bench_generators.py --dataset shapes --out runs/bench-generators
        [--variants attributes,raw-pool,no-background] [--models resnet10-w16,...] [--scale 1]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time

import numpy as np
from _common import machine_record
from _planted_names import mean_of, names_of, naming

DEFAULT_MODELS = "resnet10-w16,mobilenetv3-s050,densenet-g8,convnext-atto-s"
TARGETS = {"attributes": 0.30, "raw-pool": 0.25}
#: the planted datasets of this project's own design: their building modules
DESIGNED = {"shapes": "make_shapes", "digits": "make_digits"}


def _args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dataset", choices=("second", *DESIGNED), default="shapes")
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", default="attributes,raw-pool,no-background")
    ap.add_argument(
        "--models", default=DEFAULT_MODELS, help="demo zoo members (trained on the data)"
    )
    ap.add_argument(
        "--scale", type=float, default=1.0, help="shapes, digits: fraction of each split"
    )
    ap.add_argument("--compare", default="", help="generators besides retrieval, e.g. learned")
    return ap.parse_args(argv)


def base_manifest(a) -> tuple[str, str]:
    """``(manifest path, class column)`` of the dataset, with its ``group`` truth column."""
    import pyarrow.parquet as pq

    out = os.path.join(a.out, a.dataset)
    path = os.path.join(out, "examples.parquet")
    if a.dataset in DESIGNED:
        module = importlib.import_module(DESIGNED[a.dataset])
        built = path if os.path.exists(path) else module.build(out, a.scale)
        return built, module.DESIGN.class_column
    if os.path.exists(path):
        return path, "item"
    from audit.data.world import build_world

    spec = os.path.join(os.path.dirname(__file__), "..", "configs", "world", "second.toml")
    world = build_world(spec, os.path.join(out, "world"))
    t = world.table.select(
        ["example_id", "split", "label", "image", "item", "color", "background", "group"]
    )
    os.makedirs(out, exist_ok=True)
    pq.write_table(t.replace_schema_metadata(None), path)
    return path, "item"


def variant_manifest(path: str, variant: str) -> str:
    """The manifest of a variant (written next to the base one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if variant == "attributes":
        return path
    if variant == "world":  # the world itself: its renderer is the data's own generator (an oracle)
        world = os.path.join(os.path.dirname(path), "world")
        if not os.path.exists(os.path.join(world, "spec.toml")):
            raise ValueError("the world variant needs --dataset second (a world)")
        return world
    t = pq.read_table(path)
    attrs = [c for c in ("color", "background") if c in t.column_names]
    if variant == "raw-pool":
        pool = np.asarray(t["split"].to_pylist()) == "pool"
        for c in attrs:
            vals = [None if p else v for v, p in zip(t[c].to_pylist(), pool, strict=True)]
            t = t.set_column(t.schema.get_field_index(c), c, pa.array(vals, pa.string()))
    elif variant.startswith("no-"):
        t = t.drop_columns([variant[3:]])
    out = path.replace(".parquet", f".{variant}.parquet")
    pq.write_table(t, out)
    return out


def run(a, manifest: str, class_column: str, variant: str) -> tuple[str, float, int]:
    """``(run directory, seconds, exit status)`` of ``zoo-audit run`` on the variant."""
    out = os.path.join(a.out, f"{a.dataset}-{variant}")
    cfg = os.path.join(a.out, f"{a.dataset}-{variant}.toml")
    models = json.dumps(a.models.split(","))
    compare = [c for c in a.compare.split(",") if c] + (["retrieval"] if variant == "world" else [])
    compare = json.dumps(compare)
    with open(cfg, "w") as f:
        f.write(
            f'[data]\npath = "{manifest}"\nclass_column = "{class_column}"\n'
            f"[zoo]\nmodels = {models}\n[generate]\ncompare = {compare}\n[report]\nenabled = false\n"
        )
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "cluster.cli", "run", cfg, "--out", out, "--resume"]
    rc = subprocess.call(cmd, stdout=open(out + ".log", "w"), stderr=subprocess.STDOUT)
    return out, time.perf_counter() - t0, rc


def named_gains(view) -> dict[str, dict[str, float]]:
    """Per synthetic method and generator: the mean gain over the failing pairs whose planted
    attribute the manifest carries (what a caption can name: the issue's target), and over
    those whose name names the planted value (what generation is for)."""
    from audit.planted import parse_group

    t = view.table("mitigation.parquet")
    if t is None:
        return {}
    have = set(view.data.columns)
    rows = names_of(view)
    nameable = {(r["model"], r["group"]) for r in rows if parse_group(r["group"])[1] in have}
    right = {(r["model"], r["group"]) for r in rows if r["caption_names_group"]}
    by: dict[str, dict[str, list]] = {}
    for r in t.to_pylist():
        key = (r["model"], r["target"])
        if r["eval"] == "planted" and r.get("generator") and key in nameable:
            d = by.setdefault(
                f"{r['method']} ({r['generator']})", {"nameable": [], "named right": []}
            )
            d["nameable"].append(r["gain"])
            if key in right:
                d["named right"].append(r["gain"])
    return {k: {w: mean_of(v) for w, v in d.items()} for k, d in by.items()}


def gains(view) -> dict[str, dict]:
    """Per method (and generator): mean gain on the planted groups, mean overall change."""
    t = view.table("mitigation.parquet")
    by: dict[str, list[dict]] = {}
    for r in [] if t is None else t.to_pylist():
        if r["eval"] == "planted":
            key = r["method"] + (f" ({r['generator']})" if r.get("generator") else "")
            by.setdefault(key, []).append(r)
    return {
        k: {
            "pairs": len(rs),
            "gain": mean_of([r["gain"] for r in rs]),
            "overall_change": mean_of([r["overall_after"] - r["overall_before"] for r in rs]),
        }
        for k, rs in by.items()
    }


def confirmed(view) -> dict[str, float]:
    """Per generator: the share of named planted modes that generation confirms."""
    conf = view.table("confirmations.parquet")
    if conf is None:
        return {}
    named = {(r["model"], r["caption"]) for r in names_of(view) if r["caption_names_group"]}
    out = {}
    for gen in dict.fromkeys(conf["generator"].to_pylist()):
        ok = {
            (r["scope"], r["caption"]): r["confirmed"]
            for r in conf.to_pylist()
            if r["generator"] == gen
        }
        out[gen] = mean_of([ok[k] for k in named if k in ok])
    return out


def precision(view) -> dict[str, float]:
    """Per generator: the mean share of a set's images that show every slot of their caption."""
    t = view.table("synthetic_sets.parquet")
    out: dict[str, list] = {}
    for r in [] if t is None else t.to_pylist():
        if r.get("slot_precision"):
            out.setdefault(r["generator"], []).append(json.loads(r["slot_precision"]).get("all"))
    return {g: mean_of(v) for g, v in out.items()}


def quality(view) -> dict[str, dict]:
    """Per generator: how its images look to the audit: the zoo's class accuracy on the
    images of each named mode's *easy* caption (typical images of the class: are they of
    the class?), and the share of all its images whose slots, as attribute probes on the
    run's embedder read them, are the caption's. ``real`` is the same probes on the eval
    split's real images (the probes' own accuracy)."""
    from audit.pipeline.directions import run_embedder
    from audit.slots import SlotGrammar
    from audit.synthetic.slotfit import AttributeProbes

    data, sets = view.data, view.table("synthetic_sets.parquet")
    conf = view.table("confirmations.parquet")
    if data is None or sets is None or not sets.num_rows:
        return {}
    grammar = SlotGrammar.of(data, view.config.data.attribute_templates)
    emb, _ = run_embedder(view.config, data)
    train, ev = data.split("train"), data.split(view.eval_split)
    X_train = emb.encode_images(train.decode()[0])
    attrs = [a for a in grammar.values if a in train.columns]
    probes_of = {a: np.asarray(train.table[a].to_pylist(), dtype=object).astype(str) for a in attrs}
    ev_imgs, ok, _ = ev.decode()
    out = {
        "real": {
            "probe_accuracy": _probe_accuracy(
                AttributeProbes(emb.encode_images(ev_imgs), X_train, probes_of), ev.take(ok), attrs
            )
        }
    }
    for gen in dict.fromkeys(sets["generator"].to_pylist()):
        rows = [r for r in sets.to_pylist() if r["generator"] == gen]
        pngs, prompts = [], []
        for r in rows:
            t = view.store.read_table(f"synthetic/{r['set_id']}", columns=["png", "prompt"])
            pngs += t["png"].to_pylist()
            prompts += t["prompt"].to_pylist()
        from audit.mitigate.synthetic import decode_pngs

        probes = AttributeProbes(emb.encode_images(decode_pngs(pngs)), X_train, probes_of)
        fit = [
            np.prod(probes.fit(np.asarray([i]), grammar.parse(p))[1])
            for i, p in enumerate(prompts)
            if grammar.parse(p)
        ]
        easy = (
            [r["easy_gen_accuracy"] for r in conf.to_pylist() if r["generator"] == gen]
            if conf is not None
            else []
        )
        out[gen] = {"slots_fit": mean_of(fit), "zoo_class_accuracy_on_typical": mean_of(easy)}
    return out


def _probe_accuracy(probes, table, attrs) -> float:
    """The probes' accuracy on real images (their values known)."""
    hits = []
    for a in attrs:
        truth = np.asarray(table.table[a].to_pylist(), dtype=object).astype(str)
        vals = probes.proba.get(a, {})
        if vals:
            names = list(vals)
            pred = np.asarray(names)[np.argmax(np.stack([vals[v] for v in names], 1), 1)]
            hits.append(float(np.mean(pred == truth)))
    return mean_of(hits)


def measure(run_dir: str, variant: str, seconds: float, rc: int) -> dict:
    from audit.view import RunView

    view = RunView.open(run_dir)
    return {
        "variant": variant,
        "exit": rc,
        "seconds": round(seconds, 1),
        "generate_seconds": view.stage("generate").get("seconds"),
        "naming": naming(view),
        "gains": gains(view),
        "named_gains": named_gains(view),
        "confirmed": confirmed(view),
        "slot_precision": precision(view),
        "quality": quality(view),
    }


def _table(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        n = r["naming"]
        lost = (
            f", {n['lost_unnamed']:.0%} of {n['lost_pairs'] - n.get('lost_other_group', 0)} modes "
            f"of an attribute it lacks unnamed ({n.get('lost_other_group', 0)} more whose class's "
            "mode names another planted group)"
            if "lost_pairs" in n
            else ""
        )
        lines.append(
            f"{r['variant']}: exit {r['exit']}, {r['seconds']:.0f} s; {n['pairs']} failing pairs, "
            f"named right {n['named_right']:.0%} of {n['nameable_pairs']} nameable "
            f"({n['named_right_failing_on_eval']:.0%} of the {n['failing_on_eval']} failing on "
            f"the eval split too; {n.get('undecided', 0)} unnamed as too few eval images to "
            f"tell){lost}; {n['named_right_zoo']:.0%} by its own modes or the zoo's names it fails "
            f"({n['named_right_zoo_failing_on_eval']:.0%} of those failing on the eval split)"
        )
        base = r["gains"].get("control", {}).get("gain", float("nan"))
        for k, g in sorted(r["gains"].items(), key=lambda kv: -kv[1]["gain"]):
            # the gain beyond the lambda = 0 control's (a ratio is meaningless near a zero control)
            lines.append(
                f"  {k:40s} {100 * g['gain']:+6.1f} points ({100 * (g['gain'] - base):+.1f} over "
                f"the control) overall {100 * g['overall_change']:+.2f}"
            )
        for k, g in r["named_gains"].items():
            lines.append(
                f"  {k:40s} {100 * g['nameable']:+6.1f} points over the pairs a caption can name, "
                f"{100 * g['named right']:+6.1f} over those named right"
            )
        for gen, q in r["quality"].items():
            lines.append(f"  images of {gen}: " + ", ".join(f"{m} {v:.2f}" for m, v in q.items()))
        for gen, c in r["confirmed"].items():
            p = r["slot_precision"].get(gen)
            lines.append(
                f"  confirmed with {gen}: {c:.0%}"
                + (f"; images fit their caption: {p:.0%}" if p == p and p is not None else "")
            )
    return lines


def main(argv=None) -> None:
    a = _args(argv)
    os.makedirs(a.out, exist_ok=True)
    path, class_column = base_manifest(a)
    results = []
    for variant in a.variants.split(","):
        run_dir, seconds, rc = run(a, variant_manifest(path, variant), class_column, variant)
        results.append(measure(run_dir, variant, seconds, rc))
        print("\n".join(_table(results[-1:])), flush=True)
    record = {
        "machine": machine_record(),
        "dataset": a.dataset,
        "models": a.models.split(","),
        "results": results,
    }
    with open(os.path.join(a.out, "generators.json"), "w") as f:
        json.dump(record, f, indent=1, default=str)
    print(
        f"targets (non-oracle synthetic gain on planted groups): {TARGETS}; figures: {a.out}/generators.json"
    )


if __name__ == "__main__":
    main()
