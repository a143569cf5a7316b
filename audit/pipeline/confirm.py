"""The confirm stage: generated images as a test that a named failure is real (Wiles et
al.), and the captions it needs.

For every hard caption of a scope (a model or a cluster): the model classifies images
generated for it and for the class's easy caption; the mode is *confirmed* when the hard
images are classified at least ``min_gap`` worse with a bootstrap interval of the
difference that excludes 0. A *counterfactual* caption swaps the hard caption's rarest
attribute word for the class's most common value of that slot ("a yellow dress" -> "a
red dress"): the accuracy change says whether that word is what the model fails on.
Slots and their values come from the data's own attribute columns, so this works on any
dataset whose attributes the generator can render.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from audit.bootstrap import bootstrap_means
from audit.data.table import ImageTable
from audit.store import RunStore

CONFIRM_SCHEMA = pa.schema(
    [
        ("scope", pa.string()),
        ("class", pa.string()),
        ("caption", pa.string()),
        ("easy_caption", pa.string()),
        ("counterfactual_caption", pa.string()),
        ("n_images", pa.int32()),
        ("hard_gen_accuracy", pa.float64()),
        ("easy_gen_accuracy", pa.float64()),
        ("gap_ci_low", pa.float64()),
        ("gap_ci_high", pa.float64()),
        ("counterfactual_accuracy", pa.float64()),
        ("counterfactual_delta", pa.float64()),
        ("confirmed", pa.bool_()),
    ]
)

SKIP = {"example_id", "split", "label", "image", "path", "caption", "group", "item"}


def slot_values(data: ImageTable, max_values: int = 50) -> dict[str, list[str]]:
    """``{attribute: its values}`` for the data's low-cardinality string attribute columns."""
    out = {}
    for a in data.attributes:
        if a in SKIP:
            continue
        col = data.table[a]
        if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
            continue
        vals = sorted({v for v in col.to_pylist() if v})
        if 2 <= len(vals) <= max_values:
            out[a] = vals
    return out


def _has_word(caption: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word.lower())}(?![\w-])", caption.lower()) is not None


def counterfactual(
    caption: str, cls: str, data: ImageTable, slots: Mapping[str, list[str]] | None = None
) -> str | None:
    """The caption with its rarest-for-``cls`` attribute word replaced by the class's most
    common value of that attribute in the train split; None when it names no attribute."""
    slots = slot_values(data) if slots is None else slots
    train = data.split("train")
    in_c = (
        train.labels == data.classes.index(cls)
        if cls in data.classes
        else np.zeros(len(train), bool)
    )
    best = None
    for attr, values in slots.items():
        present = [v for v in values if _has_word(caption, v)]
        if len(present) != 1:
            continue
        col = train.column(attr)[in_c].astype(str)
        counts = {v: int((col == v).sum()) for v in values}
        v = present[0]
        common = max((u for u in values if u != v), key=lambda u: (counts[u], u == values[0]))
        if best is None or counts[v] < best[0]:
            best = (counts[v], v, common)
    if best is None:
        return None
    _, v, common = best
    out = re.sub(rf"(?<![\w-]){re.escape(v)}(?![\w-])", common, caption, count=1, flags=re.I)
    return _articles(out)


def _articles(text: str) -> str:
    """ "a"/"an" agreeing with the word after it ("an blue bag" -> "a blue bag")."""
    return re.sub(
        r"\b([Aa]n?) (\w)",
        lambda m: f"{m.group(1)[0]}{'n' if m.group(2).lower() in 'aeiou' else ''} {m.group(2)}",
        text,
    )


def probe_captions(
    pairs: Mapping[tuple[str, str, int], tuple[str, str | None]], data: ImageTable
) -> dict[str, str]:
    """``{hard caption: counterfactual}`` plus the easy captions (mapped to themselves): what
    the probe set must hold besides the hard sets."""
    slots = slot_values(data)
    out = {}
    for (_, cls, _), (hard, easy) in pairs.items():
        cf = counterfactual(hard, cls, data, slots)
        if cf and cf != hard:
            out[hard] = cf
        if easy:
            out.setdefault(easy, easy)
    return out


def confirmations(
    pairs: Mapping[tuple[str, str, int], tuple[str, str | None]],
    correct_on: Mapping[str, Mapping[str, np.ndarray]],
    cf_of: Mapping[str, str],
    *,
    min_gap: float,
    n_boot: int,
    ci: float,
) -> pa.Table:
    """One row per (scope, class, hard caption). ``correct_on[scope][caption]`` is the scope's
    per-image correctness (a cluster: its members' mean) on the generated images of a caption;
    ``min_gap``, ``n_boot`` and ``ci`` are the run's ``[stats]``."""
    rows = []
    a = (1 - ci) / 2
    for (scope, cls, _), (hard, easy) in pairs.items():
        got = correct_on.get(scope, {})
        h, e = got.get(hard), got.get(easy) if easy else None
        cf = cf_of.get(hard)
        c = got.get(cf) if cf else None
        if h is None or not len(h):
            continue
        row = {
            "scope": scope,
            "class": cls,
            "caption": hard,
            "easy_caption": easy,
            "counterfactual_caption": cf,
            "n_images": len(h),
            "hard_gen_accuracy": float(h.mean()),
            "easy_gen_accuracy": float("nan"),
            "gap_ci_low": float("nan"),
            "gap_ci_high": float("nan"),
            "counterfactual_accuracy": float("nan"),
            "counterfactual_delta": float("nan"),
            "confirmed": False,
        }
        if e is not None and len(e):
            gap = bootstrap_means(e, n_boot, 1) - bootstrap_means(h, n_boot, 2)
            lo, hi = float(np.quantile(gap, a)), float(np.quantile(gap, 1 - a))
            row.update(
                easy_gen_accuracy=float(e.mean()),
                gap_ci_low=lo,
                gap_ci_high=hi,
                confirmed=bool(e.mean() - h.mean() >= min_gap and lo > 0),
            )
        if c is not None and len(c):
            row.update(
                counterfactual_accuracy=float(c.mean()),
                counterfactual_delta=float(c.mean() - h.mean()),
            )
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=CONFIRM_SCHEMA)


def correct_on(
    pairs, probe: Mapping[str, str], index, set_of: dict, correct: dict, members: dict
) -> dict:
    """``{scope: {caption: per-image correctness}}`` on the generated images of each caption
    (a cluster: its members' mean), from ``correct[model]`` over the index's rows;
    ``set_of``: scope -> set id (the probe set under ``"probe"``)."""
    probe_rows = index.of(set_of.get("probe", ""))
    out: dict[str, dict[str, np.ndarray]] = {}
    for (scope, _, _), (hard, easy) in pairs.items():
        who = members.get(scope, []) if scope.startswith("cluster:") else [scope]
        who = [m for m in who if m in correct]
        if not who:
            continue
        src = {cap: probe_rows for cap in (hard, easy, probe.get(hard)) if cap}
        if not len(probe_rows[index.prompts[probe_rows] == hard]):  # no probe images: its own set
            src[hard] = index.of(set_of.get(scope, ""))
        for cap, rows in src.items():
            idx = rows[index.prompts[rows] == cap]
            if len(idx):
                out.setdefault(scope, {})[cap] = np.mean([correct[m][idx] for m in who], axis=0)
    return out


def _generators(view) -> dict[str, dict[str, str]]:
    """``{generator: {scope: set id}}`` of the run's sets."""
    out: dict[str, dict[str, str]] = {}
    for r in view.table("synthetic_sets.parquet").to_pylist():
        out.setdefault(r["generator"], {})[r["scope"]] = r["set_id"]
    return out


def confirm_stage(store: RunStore, inputs, cfg) -> str:
    """Stage: confirm each named mode's caption by generation, once per generator
    (``[stats]``: ``min_gap``, ``n_boot``, ``ci``). Writes ``confirmations.parquet``."""
    from audit.mitigate.synthetic import load_index, syn_correct
    from audit.pipeline.name import load_named, pairs_of
    from audit.pipeline.sweep import swept_models
    from audit.view import RunView

    view = RunView(store, inputs.config, data=inputs.data)
    pairs = pairs_of(load_named(store))
    index = load_index(store)
    correct = {}
    for m in swept_models(store, inputs.zoo):
        if (c := syn_correct(store, m, index)) is not None:
            correct[m] = c
    members: dict[str, list[str]] = {}
    for m, cl in view.clusters.items():
        members.setdefault(cl, []).append(m)
    probe = probe_captions(pairs, inputs.data)
    tables = []
    for gen, set_of in _generators(view).items():
        got = correct_on(pairs, probe, index, set_of, correct, members)
        t = confirmations(pairs, got, probe, min_gap=cfg.min_gap, n_boot=cfg.n_boot, ci=cfg.ci)
        tables.append(t.append_column("generator", pa.array([gen] * t.num_rows, pa.string())))
    conf = (
        pa.concat_tables(tables)
        if tables
        else CONFIRM_SCHEMA.append(pa.field("generator", pa.string())).empty_table()
    )
    store.write_table("confirmations.parquet", conf)
    per = []
    for gen in dict.fromkeys(conf["generator"].to_pylist()):
        ok = [r["confirmed"] for r in conf.to_pylist() if r["generator"] == gen]
        per.append(f"{sum(ok)}/{len(ok)} ({gen})")
    return "named captions confirmed by generation: " + (", ".join(per) or "none")
