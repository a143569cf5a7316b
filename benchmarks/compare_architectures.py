"""Compare the architectures of an audited zoo, per family and per model, from a run directory.

Columns: accuracy (95% interval), worst hard-subpopulation accuracy (a hard caption's nearest
eval images), number and mean strength of significant failure modes, mean shared failure
(the run's similarity, e.g. Jaccard) within the family and with other families, error
consistency within and between families (95% bootstrap intervals over model pairs; a single
pair has its own bootstrap interval over examples), and the
mean mitigation gain when the run has ``mitigation.parquet``. Printed as Markdown, written as
CSV (``families.csv``, ``models.csv``) and as one figure (``architectures.png`` and ``.svg``).

    python benchmarks/compare_architectures.py runs/demo [--out DIR]   # default DIR: RUN/comparison

Works on any run: columns whose tables the run lacks are left empty.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from collections import defaultdict

import numpy as np

from audit.report.build import _bootstrap_mean
from audit.store import RunStore

NAN = math.nan


def _ci(values, own: tuple | None = None) -> tuple[float, float, float]:
    """Mean with a bootstrap interval over ``values``; a single value takes ``own`` (its own
    interval, e.g. one model pair's bootstrap over examples) when given."""
    if own is not None and len(values) == 1:
        return (float(values[0]), float(own[0]), float(own[1]))
    return _bootstrap_mean(values)


def _fmt(v, pct=False, signed=False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if pct:
        return f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def _with_ci(v, lo, hi, pct=False, signed=False) -> str:
    s = _fmt(v, pct, signed)
    if s and not (math.isnan(lo) or math.isnan(hi)):
        s += f" [{_fmt(lo, pct, signed)}, {_fmt(hi, pct, signed)}]"
    return s


def compare(run_dir: str) -> tuple[list[dict], list[dict], dict]:
    """``(family rows, model rows, info)`` for the run at ``run_dir``."""
    store = RunStore(run_dir)
    if not store.exists("manifest.json"):
        raise FileNotFoundError(f"{run_dir} is not a run directory (no manifest.json)")
    m = store.manifest()
    metric = ((m.get("config") or {}).get("stats") or {}).get("similarity", "jaccard")
    fam: dict[str, str] = dict((m.get("zoo") or {}).get("families") or {})
    if store.exists("clusters.parquet"):
        for r in store.read_table("clusters.parquet").to_pylist():
            fam.setdefault(r["model"], r["family"])
    acc = {}
    if store.exists("accuracy.parquet"):
        for r in store.read_table("accuracy.parquet").to_pylist():
            if r["class"] == "*":
                acc[r["model"]] = (r["accuracy"], r["ci_low"], r["ci_high"])
    models = [
        x for x in ((m.get("zoo") or {}).get("models") or sorted(fam)) if x in acc or x in fam
    ]
    modes = defaultdict(list)
    if store.exists("directions.parquet"):
        for r in store.read_table(
            "directions.parquet", columns=["scope", "status", "cv_score"]
        ).to_pylist():
            if r["status"] == "ok":
                modes[r["scope"]].append(r["cv_score"])
    worst = {}
    if store.exists("subpopulations.parquet"):
        for r in store.read_table("subpopulations.parquet").to_pylist():
            if r["polarity"] == "hard" and r["accuracy_on_nearest"] is not None:
                w = worst.get(r["scope"])
                if w is None or r["accuracy_on_nearest"] < w[0]:
                    worst[r["scope"]] = (
                        r["accuracy_on_nearest"],
                        r["ci_low"],
                        r["ci_high"],
                        r["class"],
                        r["caption"],
                    )
    sim, ec, ec_ci = defaultdict(dict), defaultdict(dict), {}
    if store.exists("overlap.parquet"):
        for r in store.read_table("overlap.parquet").to_pylist():
            sim[r["model_a"]][r["model_b"]] = r.get(metric, r["jaccard"])
            ec[r["model_a"]][r["model_b"]] = r["error_consistency"]
            ec_ci[(r["model_a"], r["model_b"])] = (r["ci_low"], r["ci_high"])
    gains = defaultdict(list)
    has_mit = store.exists("mitigation.parquet")
    if has_mit:
        rows = store.read_table("mitigation.parquet").to_pylist()
        methods = {r["method"] for r in rows}
        keep = "synthetic" if "synthetic" in methods else None
        for r in rows:
            if r.get("gain") is not None and (
                r["method"] == keep if keep else r["method"] != "control"
            ):
                gains[r["model"]].append(r["gain"])

    def pairs(a, same: bool, table) -> list[float]:
        return [
            v
            for b, v in table.get(a, {}).items()
            if (fam.get(b) == fam.get(a)) == same and v is not None and b != a
        ]

    model_rows = []
    for x in models:
        a = acc.get(x, (NAN, NAN, NAN))
        w = worst.get(x, (NAN, NAN, NAN, "", ""))
        ecw = _ci(
            pairs(x, True, ec),
            next(
                (ec_ci[(x, b)] for b in ec.get(x, {}) if b != x and fam.get(b) == fam.get(x)), None
            ),
        )
        ecb = _ci(pairs(x, False, ec))
        g = _ci(gains.get(x, []))
        model_rows.append(
            {
                "model": x,
                "family": fam.get(x, ""),
                "accuracy": a[0],
                "accuracy_ci_low": a[1],
                "accuracy_ci_high": a[2],
                "worst_hard_accuracy": w[0],
                "worst_hard_ci_low": w[1],
                "worst_hard_ci_high": w[2],
                "worst_hard_caption": f"{w[3]}: {w[4]}" if w[3] else "",
                "n_modes": len(modes.get(x, [])),
                "mean_strength": float(np.mean(modes[x])) if modes.get(x) else NAN,
                "shared_within": float(np.mean(pairs(x, True, sim)))
                if pairs(x, True, sim)
                else NAN,
                "shared_between": float(np.mean(pairs(x, False, sim)))
                if pairs(x, False, sim)
                else NAN,
                "ec_within": ecw[0],
                "ec_within_ci_low": ecw[1],
                "ec_within_ci_high": ecw[2],
                "ec_between": ecb[0],
                "ec_between_ci_low": ecb[1],
                "ec_between_ci_high": ecb[2],
                "mitigation_gain": g[0],
                "mitigation_gain_ci_low": g[1],
                "mitigation_gain_ci_high": g[2],
            }
        )

    fam_rows = []
    for f in sorted({r["family"] for r in model_rows}):
        mem = [r for r in model_rows if r["family"] == f]
        names = {r["model"] for r in mem}

        def fam_pairs(table, same, names=names):
            # unordered pairs within (each once) or ordered member -> non-member pairs
            return [
                v
                for a in names
                for b, v in table.get(a, {}).items()
                if v is not None and ((b in names and a < b) if same else b not in names)
            ]

        a = _ci([r["accuracy"] for r in mem])
        sw, sb = _ci(fam_pairs(sim, True)), _ci(fam_pairs(sim, False))
        within_keys = [(a, b) for a in names for b in ec.get(a, {}) if b in names and a < b]
        ew = _ci(fam_pairs(ec, True), ec_ci.get(within_keys[0]) if len(within_keys) == 1 else None)
        eb = _ci(fam_pairs(ec, False))
        g = _ci([v for x in names for v in gains.get(x, [])])
        worst_f = min(
            mem,
            key=lambda r: (
                r["worst_hard_accuracy"] if not math.isnan(r["worst_hard_accuracy"]) else 2
            ),
        )
        strengths = [v for x in names for v in modes.get(x, [])]
        fam_rows.append(
            {
                "family": f,
                "n_models": len(mem),
                "accuracy": a[0],
                "accuracy_ci_low": a[1],
                "accuracy_ci_high": a[2],
                "worst_hard_accuracy": worst_f["worst_hard_accuracy"],
                "worst_hard_model": worst_f["model"],
                "n_modes": len(strengths),
                "modes_per_model": len(strengths) / len(mem),
                "mean_strength": float(np.mean(strengths)) if strengths else NAN,
                "shared_within": sw[0],
                "shared_within_ci_low": sw[1],
                "shared_within_ci_high": sw[2],
                "shared_between": sb[0],
                "shared_between_ci_low": sb[1],
                "shared_between_ci_high": sb[2],
                "ec_within": ew[0],
                "ec_within_ci_low": ew[1],
                "ec_within_ci_high": ew[2],
                "ec_between": eb[0],
                "ec_between_ci_low": eb[1],
                "ec_between_ci_high": eb[2],
                "mitigation_gain": g[0],
                "mitigation_gain_ci_low": g[1],
                "mitigation_gain_ci_high": g[2],
            }
        )
    return fam_rows, model_rows, {"metric": metric, "mitigation": has_mit, "run": run_dir}


def markdown(fam_rows: list[dict], model_rows: list[dict], info: dict) -> str:
    mit = info["mitigation"]
    s = info["metric"]
    head = [
        "family",
        "models",
        "accuracy %",
        "worst hard subpop. %",
        "modes (per model)",
        "mean strength",
        f"{s} within",
        f"{s} between",
        "error consistency within",
        "error consistency between",
    ]
    if mit:
        head.append("mitigation gain (pts)")
    lines = [
        f"Architectures of {info['run']} (95% intervals; bootstrap over model pairs for shared failure and consistency)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in fam_rows:
        cells = [
            r["family"],
            str(r["n_models"]),
            _with_ci(r["accuracy"], r["accuracy_ci_low"], r["accuracy_ci_high"], pct=True),
            f"{_fmt(r['worst_hard_accuracy'], pct=True)} ({r['worst_hard_model']})"
            if not math.isnan(r["worst_hard_accuracy"])
            else "",
            f"{r['n_modes']} ({r['modes_per_model']:.1f})",
            _fmt(r["mean_strength"]),
            _with_ci(r["shared_within"], r["shared_within_ci_low"], r["shared_within_ci_high"]),
            _with_ci(r["shared_between"], r["shared_between_ci_low"], r["shared_between_ci_high"]),
            _with_ci(r["ec_within"], r["ec_within_ci_low"], r["ec_within_ci_high"]),
            _with_ci(r["ec_between"], r["ec_between_ci_low"], r["ec_between_ci_high"]),
        ]
        if mit:
            cells.append(
                _with_ci(
                    r["mitigation_gain"],
                    r["mitigation_gain_ci_low"],
                    r["mitigation_gain_ci_high"],
                    pct=True,
                    signed=True,
                )
            )
        lines.append("| " + " | ".join(cells) + " |")
    head = [
        "model",
        "family",
        "accuracy %",
        "worst hard subpop. %",
        "modes",
        "mean strength",
        f"{s} within",
        f"{s} between",
        "error consistency within",
        "error consistency between",
    ]
    if mit:
        head.append("mitigation gain (pts)")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in model_rows:
        cells = [
            r["model"],
            r["family"],
            _with_ci(r["accuracy"], r["accuracy_ci_low"], r["accuracy_ci_high"], pct=True),
            _with_ci(
                r["worst_hard_accuracy"], r["worst_hard_ci_low"], r["worst_hard_ci_high"], pct=True
            ),
            str(r["n_modes"]),
            _fmt(r["mean_strength"]),
            _fmt(r["shared_within"]),
            _fmt(r["shared_between"]),
            _with_ci(r["ec_within"], r["ec_within_ci_low"], r["ec_within_ci_high"]),
            _with_ci(r["ec_between"], r["ec_between_ci_low"], r["ec_between_ci_high"]),
        ]
        if mit:
            cells.append(
                _with_ci(
                    r["mitigation_gain"],
                    r["mitigation_gain_ci_low"],
                    r["mitigation_gain_ci_high"],
                    pct=True,
                    signed=True,
                )
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(fam_rows: list[dict], model_rows: list[dict], info: dict, out_base: str) -> list[str]:
    """One figure, three panels: accuracy per model by family; shared failure within vs between
    families; failure modes per model and their mean strength. Written as PNG and SVG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from audit.report.figures import family_colors

    colors = family_colors([r["family"] for r in fam_rows])
    fams = [r["family"] for r in fam_rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, max(3.5, 0.45 * len(fams) + 1.8)))
    ax = axes[0]
    for i, f in enumerate(fams):
        mem = [r for r in model_rows if r["family"] == f]
        for j, r in enumerate(mem):
            y = i + (j - (len(mem) - 1) / 2) * min(0.15, 0.6 / max(1, len(mem)))
            ax.errorbar(
                [100 * r["accuracy"]],
                [y],
                xerr=[
                    [100 * (r["accuracy"] - r["accuracy_ci_low"])],
                    [100 * (r["accuracy_ci_high"] - r["accuracy"])],
                ],
                fmt="o",
                color=colors[f],
                ms=5,
                capsize=2,
            )
    ax.set_yticks(range(len(fams)), fams)
    ax.invert_yaxis()
    ax.set_xlabel("accuracy % (each model, 95% interval)")
    ax.set_title("Accuracy")
    ax = axes[1]
    for i, r in enumerate(fam_rows):
        for dy, key, mk, col in (
            (-0.12, "shared_within", "o", colors[r["family"]]),
            (0.12, "shared_between", "s", "#888888"),
        ):
            v, lo, hi = r[key], r[f"{key}_ci_low"], r[f"{key}_ci_high"]
            if not math.isnan(v):
                err = [[v - lo], [hi - v]] if not math.isnan(lo) else None
                ax.errorbar(
                    [v], [i + dy], xerr=err, fmt=mk, color=col, mec="black", ms=7, capsize=3
                )
    ax.errorbar([], [], fmt="o", color="#444444", label="within the family")
    ax.errorbar([], [], fmt="s", color="#888888", label="with other families")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    ax.set_yticks(range(len(fams)), fams)
    ax.invert_yaxis()
    ax.set_xlabel(f"mean {info['metric']} of two models' errors (95% interval)")
    ax.set_title("Shared failures")
    ax = axes[2]
    x = np.arange(len(fams))
    ax.barh(x, [r["modes_per_model"] for r in fam_rows], color=[colors[f] for f in fams])
    for i, r in enumerate(fam_rows):
        if not math.isnan(r["mean_strength"]):
            ax.text(
                r["modes_per_model"],
                i,
                f"  strength {r['mean_strength']:.2f}",
                va="center",
                fontsize=8,
            )
    ax.set_yticks(x, fams)
    ax.invert_yaxis()
    ax.set_xlabel("significant failure modes per model")
    ax.set_title("Failure modes")
    ax.set_xlim(0, max([r["modes_per_model"] for r in fam_rows] + [1]) * 1.45)
    for a in axes:
        a.spines[["top", "right"]].set_visible(False)
        a.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Architectures compared: {os.path.basename(os.path.normpath(info['run']))}")
    fig.tight_layout()
    paths = []
    for ext in ("png", "svg"):
        fig.savefig(f"{out_base}.{ext}", dpi=110)
        paths.append(f"{out_base}.{ext}")
    plt.close(fig)
    return paths


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["family"])
        w.writeheader()
        w.writerows(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run directory")
    p.add_argument(
        "--out", default=None, help="where the CSVs and the figure go (default RUN/comparison)"
    )
    a = p.parse_args(argv)
    fam_rows, model_rows, info = compare(a.run)
    if not model_rows:
        raise SystemExit(
            f"{a.run}: no model has results yet (no accuracy.parquet or clusters.parquet)"
        )
    out = a.out or os.path.join(a.run, "comparison")
    os.makedirs(out, exist_ok=True)
    print(markdown(fam_rows, model_rows, info))
    write_csv(fam_rows, os.path.join(out, "families.csv"))
    write_csv(model_rows, os.path.join(out, "models.csv"))
    figs = figure(fam_rows, model_rows, info, os.path.join(out, "architectures"))
    print(
        f"\nwritten: {os.path.join(out, 'families.csv')}, {os.path.join(out, 'models.csv')}, {', '.join(figs)}"
    )


if __name__ == "__main__":
    main()
