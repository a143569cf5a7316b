"""Named failures across the zoo: each failure that some scope's mode names, checked on
every model of the zoo.

A failure mode is found per scope (a model, a cluster, a family) by an SVM on the fit split,
and a model's own modes miss a failure it shares when a larger one of its class takes its
direction, or when its errors there are too few for a direction of their own. Here every
distinct name of a class's modes (found in any scope) is checked on every model's eval
images of the class: the same images the name stage checks (its attribute group where the
data has the columns, else its nearest images), that model's accuracy on them against the
class with a Wilson interval. The names a model's own modes do not hold are tested together
per (model, class), so their intervals are Bonferroni's at ``1 - alpha / tests``; a model
fails a name when its interval lies below its class accuracy. Writes
``shared_names.parquet``: the zoo's answer to "which models fail on cyan stars?".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pyarrow as pa
from scipy.stats import norm

from audit.predictions import wilson_interval

SHARED_NAMES_SCHEMA = pa.schema(
    [
        *[("class", pa.string()), ("caption", pa.string()), ("found_in", pa.string())],
        *[("model", pa.string()), ("own", pa.bool_()), ("fails", pa.bool_())],
        *[("accuracy", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64())],
        *[("class_accuracy", pa.float64()), ("n", pa.int64()), ("tests", pa.int64())],
        ("checked_on", pa.string()),
    ]
)

#: ``covered([(class, caption)]) -> {(class, caption): (the eval rows the caption names, how
#: they were chosen)}``
Covered = Callable[[list[tuple[str, str]]], Mapping[tuple[str, str], tuple[np.ndarray, str]]]


def names_by_class(modes: pa.Table) -> dict[str, dict[str, list[str]]]:
    """``{class: {name: [scopes whose modes hold it]}}`` of the named modes, in the order of
    ``modes.parquet`` (worst first within a scope)."""
    out: dict[str, dict[str, list[str]]] = {}
    for r in modes.to_pylist():
        if r["named"]:
            scopes = out.setdefault(r["class"], {}).setdefault(r["caption"], [])
            if r["scope"] not in scopes:
                scopes.append(r["scope"])
    return out


def shared_names(
    modes: pa.Table,
    correct: Mapping[str, np.ndarray],
    labels: np.ndarray,
    classes: list[str],
    covered: Covered,
    alpha: float = 0.05,
) -> pa.Table:
    """One row per (class, name of some mode of the class, model of ``correct``): the model's
    accuracy on the eval images the name covers (``labels``/``correct``: the eval split's)
    against its class accuracy. ``own``: the model's modes hold the name (the name stage's
    95% interval); the others are tested per (model, class) at ``1 - alpha / tests``."""
    rows = []
    by_class = names_by_class(modes)
    where = covered([(cls, name) for cls, names in by_class.items() for name in names])
    for cls, names in sorted(by_class.items()):
        in_class = np.flatnonzero(labels == classes.index(cls))
        for model, corr in correct.items():
            own = {name for name, scopes in names.items() if model in scopes}
            tests = len(names) - len(own)
            z = norm.ppf(1 - alpha / (2 * max(tests, 1)))
            class_acc = float(corr[in_class].mean()) if len(in_class) else float("nan")
            for name, scopes in names.items():
                ids, how = where[(cls, name)]
                hits, n = int(corr[ids].sum()), len(ids)
                if not n:
                    continue  # no eval image of the class shows it
                # its own mode's: the name stage's interval, exactly
                zs = {} if name in own else {"z": z}
                lo, hi = wilson_interval(np.asarray([hits]), np.asarray([n]), **zs)
                rows.append(
                    {"class": cls, "caption": name, "found_in": ", ".join(scopes)}
                    | {"model": model, "own": name in own}
                    | {"fails": bool(hi[0] < class_acc), "accuracy": hits / n}
                    | {"ci_low": float(lo[0]), "ci_high": float(hi[0])}
                    | {"class_accuracy": class_acc, "n": n, "tests": tests, "checked_on": how}
                )
    return pa.Table.from_pylist(rows, schema=SHARED_NAMES_SCHEMA)


def shared_counts(table: pa.Table | None) -> list[dict]:
    """Per (class, name): the models that fail it (``fails``: names, worst first, with
    accuracy and class accuracy), those whose own modes hold it, and the models checked;
    the names failed by the most models first."""
    out: dict[tuple[str, str], dict] = {}
    for r in [] if table is None else table.to_pylist():
        d = out.setdefault(
            (r["class"], r["caption"]),
            {"class": r["class"], "caption": r["caption"], "found_in": r["found_in"]}
            | {"fails": [], "own": [], "models": 0, "checked_on": r["checked_on"], "n": r["n"]},
        )
        d["models"] += 1
        if r["own"]:
            d["own"].append(r["model"])
        if r["fails"]:
            d["fails"].append(r)
    for d in out.values():
        d["fails"].sort(key=lambda r: r["accuracy"] - r["class_accuracy"])
    return sorted(out.values(), key=lambda d: (-len(d["fails"]), d["class"], d["caption"]))


def format_shared_names(table: pa.Table | None, top: int = 5) -> str:
    """The console's lines: how many names fail in models beyond those whose modes hold them,
    and the ``top`` names failed by the most models."""
    counts = [d for d in shared_counts(table) if d["fails"]]
    if not counts:
        return ""
    beyond = [d for d in counts if {r["model"] for r in d["fails"]} - set(d["own"])]
    lines = [
        "Named failures across the zoo (each mode's name checked on every model's eval images; "
        f"{len(beyond)} of {len(counts)} failing names fail in a model whose own modes miss it):"
    ]
    for d in counts[:top]:
        w = d["fails"][0]
        lines.append(
            f"  {d['class']}: {d['caption']!r} fails in {len(d['fails'])} of {d['models']} models "
            f"({len(d['own'])} by their own modes); worst {w['model']} {w['accuracy']:.0%} "
            f"vs class {w['class_accuracy']:.0%} on {w['n']} images"
        )
    return "\n".join(lines)
