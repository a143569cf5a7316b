"""Compare the architectures of an audited zoo, per family and per model, from a run directory.

Columns: accuracy (interval), worst hard-subpopulation accuracy (a hard caption's nearest
eval images), number and mean strength of significant failure modes, mean shared failure
(the run's similarity, e.g. Jaccard) within the family and with other families, error
consistency within and between families (bootstrap intervals over model pairs; a single pair
has its own bootstrap interval over examples), and the mean mitigation gain when the run has
``mitigation.parquet`` (labelled oracle when made with the world renderer's sets: the data's
own generator). Printed as Markdown, written as CSV (``families.csv``, ``models.csv``) and as
one figure (``architectures.png`` and ``.svg``). The run is read through RunView: the
similarity and the intervals (level, draws, seed) are its own ``[stats]``.

    python benchmarks/compare_architectures.py runs/demo [--out DIR]   # default DIR: RUN/comparison

Works on any run: columns whose tables the run lacks are left empty.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from audit.bootstrap import bootstrap_mean_ci
from audit.view import RunView

NAN = math.nan
ORACLE = "oracle: the world renderer, the data's own generator"


@dataclass
class Tables:
    """What the comparison reads of a run, keyed by model (or scope)."""

    fam: dict[str, str]
    models: list[str]
    metric: str
    boot: dict  # bootstrap_mean_ci's n_boot, ci, seed: the run's [stats]
    acc: dict = field(default_factory=dict)  # model -> (accuracy, low, high)
    modes: dict = field(default_factory=lambda: defaultdict(list))  # scope -> [cv_score]
    worst: dict = field(default_factory=dict)  # scope -> (acc, low, high, class, caption)
    sim: dict = field(default_factory=lambda: defaultdict(dict))  # a -> b -> similarity
    ec: dict = field(default_factory=lambda: defaultdict(dict))  # a -> b -> consistency
    ec_ci: dict = field(default_factory=dict)  # (a, b) -> (low, high)
    gains: dict = field(default_factory=lambda: defaultdict(list))  # model -> [gain]
    has_mit: bool = False
    mit_oracle: bool = False  # the gains used the world renderer's sets

    def ci(self, values, own: tuple | None = None) -> tuple[float, float, float]:
        """Mean with a bootstrap interval over ``values``; a single value takes ``own`` (its
        own interval, e.g. one model pair's bootstrap over examples) when given."""
        if own is not None and len(values) == 1:
            return (float(values[0]), float(own[0]), float(own[1]))
        return bootstrap_mean_ci(values, **self.boot)

    def pairs(self, a: str, same: bool, table: dict) -> list[float]:
        """``a``'s values with the other models of its family (``same``) or of the others."""
        fam = self.fam
        return [
            v
            for b, v in table.get(a, {}).items()
            if (fam.get(b) == fam.get(a)) == same and v is not None and b != a
        ]


def _rows(view: RunView, rel: str, columns: list[str] | None = None) -> list[dict]:
    t = view.table(rel, columns)
    return [] if t is None else t.to_pylist()


def _read_failures(t: Tables, view: RunView) -> None:
    for r in _rows(view, "accuracy.parquet"):
        if r["class"] == "*":
            t.acc[r["model"]] = (r["accuracy"], r["ci_low"], r["ci_high"])
    for r in _rows(view, "directions.parquet", ["scope", "status", "cv_score"]):
        if r["status"] == "ok":
            t.modes[r["scope"]].append(r["cv_score"])
    for r in _rows(view, "subpopulations.parquet"):
        w = tuple(r[k] for k in ("accuracy_on_nearest", "ci_low", "ci_high", "class", "caption"))
        if r["polarity"] == "hard" and w[0] is not None:
            if r["scope"] not in t.worst or w[0] < t.worst[r["scope"]][0]:
                t.worst[r["scope"]] = w
    for r in _rows(view, "overlap.parquet"):
        t.sim[r["model_a"]][r["model_b"]] = r.get(t.metric, r["jaccard"])
        t.ec[r["model_a"]][r["model_b"]] = r["error_consistency"]
        t.ec_ci[(r["model_a"], r["model_b"])] = (r["ci_low"], r["ci_high"])


def _read_mitigation(t: Tables, view: RunView) -> None:
    rows = _rows(view, "mitigation.parquet")
    t.has_mit = view.has("mitigation.parquet")
    keep = "synthetic" if "synthetic" in {r["method"] for r in rows} else None
    used = set()
    for r in rows:
        if r.get("gain") is not None and (
            r["method"] == keep if keep else r["method"] != "control"
        ):
            t.gains[r["model"]].append(r["gain"])
            used.add(r["method"])
    generators = {r["generator"] for r in _rows(view, "synthetic_sets.parquet", ["generator"])}
    t.mit_oracle = "world" in generators and any(m.startswith("synthetic") for m in used)


def read_tables(view: RunView) -> Tables:
    s = view.config.stats
    boot = {"n_boot": s.n_boot, "ci": s.ci, "seed": s.seed}
    t = Tables(dict(view.families), view.models, s.similarity, boot)
    _read_failures(t, view)
    _read_mitigation(t, view)
    return t


def _with(prefix: str, ci: tuple[float, float, float]) -> dict:
    return {prefix: ci[0], f"{prefix}_ci_low": ci[1], f"{prefix}_ci_high": ci[2]}


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else NAN


def model_row(t: Tables, x: str) -> dict:
    a = t.acc.get(x, (NAN, NAN, NAN))
    w = t.worst.get(x, (NAN, NAN, NAN, "", ""))
    own = next(
        (t.ec_ci[(x, b)] for b in t.ec.get(x, {}) if b != x and t.fam.get(b) == t.fam.get(x)),
        None,
    )
    return {
        "model": x,
        "family": t.fam.get(x, ""),
        **_with("accuracy", a),
        "worst_hard_accuracy": w[0],
        "worst_hard_ci_low": w[1],
        "worst_hard_ci_high": w[2],
        "worst_hard_caption": f"{w[3]}: {w[4]}" if w[3] else "",
        "n_modes": len(t.modes.get(x, [])),
        "mean_strength": _mean(t.modes.get(x, [])),
        "shared_within": _mean(t.pairs(x, True, t.sim)),
        "shared_between": _mean(t.pairs(x, False, t.sim)),
        **_with("ec_within", t.ci(t.pairs(x, True, t.ec), own)),
        **_with("ec_between", t.ci(t.pairs(x, False, t.ec))),
        **_with("mitigation_gain", t.ci(t.gains.get(x, []))),
    }


def _fam_pairs(table: dict, names: list[str], same: bool) -> list[float]:
    # unordered pairs within (each once) or ordered member -> non-member pairs
    inside = set(names)
    return [
        v
        for a in names
        for b, v in table.get(a, {}).items()
        if v is not None and ((b in inside and a < b) if same else b not in inside)
    ]


def family_row(t: Tables, f: str, mem: list[dict]) -> dict:
    names = sorted(r["model"] for r in mem)  # sorted: the bootstrap's draws follow the order
    within = [(a, b) for a in names for b in t.ec.get(a, {}) if b in names and a < b]
    own = t.ec_ci.get(within[0]) if len(within) == 1 else None
    worst = min(mem, key=lambda r: np.nan_to_num(r["worst_hard_accuracy"], nan=2.0))
    strengths = [v for x in names for v in t.modes.get(x, [])]
    return {
        "family": f,
        "n_models": len(mem),
        **_with("accuracy", t.ci([r["accuracy"] for r in mem])),
        "worst_hard_accuracy": worst["worst_hard_accuracy"],
        "worst_hard_model": worst["model"],
        "n_modes": len(strengths),
        "modes_per_model": len(strengths) / len(mem),
        "mean_strength": _mean(strengths),
        **_with("shared_within", t.ci(_fam_pairs(t.sim, names, True))),
        **_with("shared_between", t.ci(_fam_pairs(t.sim, names, False))),
        **_with("ec_within", t.ci(_fam_pairs(t.ec, names, True), own)),
        **_with("ec_between", t.ci(_fam_pairs(t.ec, names, False))),
        **_with("mitigation_gain", t.ci([v for x in names for v in t.gains.get(x, [])])),
    }


def compare(run: str | RunView) -> tuple[list[dict], list[dict], dict]:
    """``(family rows, model rows, info)`` for the run at ``run`` (a path or a RunView)."""
    view = run if isinstance(run, RunView) else RunView.open(run)
    t = read_tables(view)
    model_rows = [model_row(t, x) for x in t.models]
    fam_rows = []
    for f in sorted({r["family"] for r in model_rows}):
        fam_rows.append(family_row(t, f, [r for r in model_rows if r["family"] == f]))
    info = {
        "metric": t.metric,
        "mitigation": t.has_mit,
        "mitigation_oracle": t.mit_oracle,
        "ci": t.boot["ci"],
        "run": view.store.uri if isinstance(run, RunView) else run,
    }
    return fam_rows, model_rows, info


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


def _cell(r: dict, key: str, pct=False, signed=False) -> str:
    """``r[key]`` with its interval (``KEY_ci_low``, ``KEY_ci_high``)."""
    return _with_ci(r[key], r[f"{key}_ci_low"], r[f"{key}_ci_high"], pct, signed)


def _head(first: list[str], info: dict) -> list[str]:
    s = info["metric"]
    head = first + ["accuracy %", "worst hard subpop. %"]
    head += ["modes (per model)" if first[0] == "family" else "modes", "mean strength"]
    head += [f"{s} within", f"{s} between"]
    head += ["error consistency within", "error consistency between"]
    if info["mitigation"]:
        head.append(f"mitigation gain (pts{'; ' + ORACLE if info['mitigation_oracle'] else ''})")
    return head


def _family_cells(r: dict) -> list[str]:
    worst = r["worst_hard_accuracy"]
    return [
        r["family"],
        str(r["n_models"]),
        _cell(r, "accuracy", pct=True),
        "" if math.isnan(worst) else f"{_fmt(worst, pct=True)} ({r['worst_hard_model']})",
        f"{r['n_modes']} ({r['modes_per_model']:.1f})",
        _fmt(r["mean_strength"]),
        _cell(r, "shared_within"),
        _cell(r, "shared_between"),
    ]


def _model_cells(r: dict) -> list[str]:
    worst = (r["worst_hard_accuracy"], r["worst_hard_ci_low"], r["worst_hard_ci_high"])
    return [
        r["model"],
        r["family"],
        _cell(r, "accuracy", pct=True),
        _with_ci(*worst, pct=True),
        str(r["n_modes"]),
        _fmt(r["mean_strength"]),
        _fmt(r["shared_within"]),
        _fmt(r["shared_between"]),
    ]


def _table(head: list[str], rows: list[dict], cells, info: dict) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c = cells(r) + [_cell(r, "ec_within"), _cell(r, "ec_between")]
        if info["mitigation"]:
            c.append(_cell(r, "mitigation_gain", pct=True, signed=True))
        lines.append("| " + " | ".join(c) + " |")
    return lines


def markdown(fam_rows: list[dict], model_rows: list[dict], info: dict) -> str:
    title = (
        f"Architectures of {info['run']} ({info['ci']:.0%} intervals; bootstrap over model pairs "
        "for shared failure and consistency)"
    )
    lines = [title, ""] + _table(_head(["family", "models"], info), fam_rows, _family_cells, info)
    lines += [""] + _table(_head(["model", "family"], info), model_rows, _model_cells, info)
    return "\n".join(lines)


def _accuracy_panel(ax, fam_rows: list[dict], model_rows: list[dict], colors, ci: str) -> None:
    fams = [r["family"] for r in fam_rows]
    for i, f in enumerate(fams):
        mem = [r for r in model_rows if r["family"] == f]
        for j, r in enumerate(mem):
            y = i + (j - (len(mem) - 1) / 2) * min(0.15, 0.6 / max(1, len(mem)))
            err = [[100 * (r["accuracy"] - r["accuracy_ci_low"])]]
            err.append([100 * (r["accuracy_ci_high"] - r["accuracy"])])
            ax.errorbar(
                [100 * r["accuracy"]], [y], xerr=err, fmt="o", color=colors[f], ms=5, capsize=2
            )
    ax.set_yticks(range(len(fams)), fams)
    ax.invert_yaxis()
    ax.set_xlabel(f"accuracy % (each model, {ci} interval)")
    ax.set_title("Accuracy")


def _shared_panel(ax, fam_rows: list[dict], colors, metric: str, ci: str) -> None:
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
    ax.set_yticks(range(len(fam_rows)), [r["family"] for r in fam_rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"mean {metric} of two models' errors ({ci} interval)")
    ax.set_title("Shared failures")


def _modes_panel(ax, fam_rows: list[dict], colors) -> None:
    fams = [r["family"] for r in fam_rows]
    x = np.arange(len(fams))
    ax.barh(x, [r["modes_per_model"] for r in fam_rows], color=[colors[f] for f in fams])
    for i, r in enumerate(fam_rows):
        if not math.isnan(r["mean_strength"]):
            label = f"  strength {r['mean_strength']:.2f}"
            ax.text(r["modes_per_model"], i, label, va="center", fontsize=8)
    ax.set_yticks(x, fams)
    ax.invert_yaxis()
    ax.set_xlabel("significant failure modes per model")
    ax.set_title("Failure modes")
    ax.set_xlim(0, max([r["modes_per_model"] for r in fam_rows] + [1]) * 1.45)


def figure(fam_rows: list[dict], model_rows: list[dict], info: dict, out_base: str) -> list[str]:
    """One figure, three panels: accuracy per model by family; shared failure within vs between
    families; failure modes per model and their mean strength. Written as PNG and SVG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from audit.report.figures import family_colors

    colors = family_colors([r["family"] for r in fam_rows])
    ci = f"{info['ci']:.0%}"
    fig, axes = plt.subplots(1, 3, figsize=(15, max(3.5, 0.45 * len(fam_rows) + 1.8)))
    _accuracy_panel(axes[0], fam_rows, model_rows, colors, ci)
    _shared_panel(axes[1], fam_rows, colors, info["metric"], ci)
    _modes_panel(axes[2], fam_rows, colors)
    for a in axes:
        a.spines[["top", "right"]].set_visible(False)
        a.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Architectures compared: {os.path.basename(os.path.normpath(info['run']))}")
    fig.tight_layout()
    paths = [f"{out_base}.{ext}" for ext in ("png", "svg")]
    for path in paths:
        fig.savefig(path, dpi=110)
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
    csvs = [os.path.join(out, f"{name}.csv") for name in ("families", "models")]
    write_csv(fam_rows, csvs[0])
    write_csv(model_rows, csvs[1])
    figs = figure(fam_rows, model_rows, info, os.path.join(out, "architectures"))
    print(f"\nwritten: {', '.join(csvs + figs)}")


if __name__ == "__main__":
    main()
