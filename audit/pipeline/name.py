"""The name stage: every significant failure mode gets the most general caption that fails as
much, or is reported unnamed (:mod:`audit.naming`). Writes ``modes.parquet``; generation,
head retraining, confirmation, the summary and the report read the modes' names there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from audit.naming import BEYOND_EARLIER
from audit.store import RunStore


@dataclass(frozen=True)
class NamedMode:
    """A named failure mode, as generation and mitigation use it."""

    scope: str
    cls: str
    mode: int
    caption: str  # the most general caption that fails as much (what is generated)
    easy: str | None  # its comparison caption for confirmation (modes.parquet's easy_caption)


def named_modes(modes: pa.Table) -> list[NamedMode]:
    """Per (scope, class), its named modes of distinct names in ``modes.parquet``'s order (the
    one whose named subpopulation fails most first), each with its comparison caption (its
    first easy caption that shows no named failure of the class: ``easy_caption``)."""
    out: dict[tuple[str, str, str], NamedMode] = {}
    for r in modes.to_pylist():
        key = (r["scope"], r["class"], r["caption"])
        if r["named"] and key not in out:
            e = r.get("easy_caption")
            out[key] = NamedMode(r["scope"], r["class"], int(r["mode"]), r["caption"], e)
    return sorted(out.values(), key=lambda m: (m.scope, m.cls, m.mode))


def _hard_and_strength(caps: pa.Table, dirs: pa.Table) -> tuple[dict, dict]:
    """``({(scope, class, mode): its hard captions, best first (empty: no caption, an
    image-only space)}, {...: strength})`` of every significant mode."""
    ok = {
        (r["scope"], r["class"], r["mode"]): r["cv_score"]
        for r in dirs.to_pylist()
        if r["status"] == "ok"
    }
    ranked: dict = {key: [] for key in ok}
    for r in caps.to_pylist():
        key = (r["scope"], r["class"], r["mode"])
        if key in ok and r["polarity"] == "hard":
            ranked[key].append((r["rank"], r["caption"]))
    hard = {key: [c for _, c in sorted(v)] for key, v in ranked.items()}
    return dict(sorted(hard.items())), ok


class _EvalCheck:
    """Captions checked on the eval split (cached per scope, class, caption): on the images
    whose attribute columns show every slot of the caption when the split has them, else on
    the caption's nearest images."""

    def __init__(self, store: RunStore, inputs, cfg, grammar):
        from audit.embed import embed_table
        from audit.evaluate import load_predictions
        from audit.index import ClassIndex
        from audit.pipeline.directions import _Split, embedder_for
        from audit.pipeline.sweep import swept_models
        from audit.view import RunView

        self.emb, _ = embedder_for(inputs, train=False)
        E = embed_table(store, self.emb, inputs.data.split(inputs.embed_splits()), progress=False)
        preds = load_predictions(store, swept_models(store, inputs.zoo))
        self.ev = _Split(inputs.data.split(inputs.eval_split), E, preds)
        self.index = ClassIndex(self.ev.X, self.ev.labels)
        view = RunView(store, inputs.config, data=inputs.data)
        self.scopes = {}
        for m, cl in view.clusters.items():
            self.scopes.setdefault(cl, []).append(m)
        self.classes, self.k, self.grammar = inputs.data.classes, cfg.k, grammar
        self.cache: dict[tuple, dict] = {}

    def _rows_vs_class(
        self, scope: str, c: int, rows: np.ndarray, how: str, outside: np.ndarray | None = None
    ) -> dict:
        """Accuracy on ``rows`` (pooled over the scope's models) with its Wilson interval, and
        the class's accuracy (on its rows not in ``outside``, when given); ``how`` says which
        images were checked."""
        from audit.index import _members, _nearest_vs_class
        from audit.predictions import wilson_interval

        ms = _members(scope, self.scopes, self.ev.correct)
        in_class = self.ev.labels == c
        if outside is not None:
            in_class[outside] = False
        hits, n, acc, cls_acc = _nearest_vs_class(self.ev.correct, ms, rows, in_class)
        lo, hi = wilson_interval(np.asarray([hits]), np.asarray([n]))
        out = {"accuracy_on_nearest": acc, "ci_low": float(lo[0]), "ci_high": float(hi[0])}
        return out | {"class_accuracy": cls_acc, "checked_on": how, "n": int(len(rows))}

    def direction(self, row: dict) -> dict:
        """How much the ``k`` eval images of the class its direction finds hardest fail (pooled
        over the scope's models), against the class: a mode without a caption."""
        c = self.classes.index(row["class"])
        return self._rows_vs_class(row["scope"], c, self.hardest(row), "direction")

    def hardest(self, row: dict) -> np.ndarray:
        """The ``k`` eval rows of the class its direction finds hardest."""
        from audit.directions import decision_from_row

        in_c = np.flatnonzero(self.ev.labels == self.classes.index(row["class"]))
        return in_c[np.argsort(decision_from_row(row, self.ev.X[in_c]), kind="stable")[: self.k]]

    def covered(self, cls: str, caption: str) -> np.ndarray:
        """The eval rows a caption names: its attribute group where the columns say, else its
        ``k`` nearest images of the class."""
        return self.where_all([(cls, caption)])[(cls, caption)][0]

    def where_all(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], tuple]:
        """``{(class, caption): (the eval rows it names, how they were chosen)}`` (see
        :meth:`covered`), the captions without an attribute group embedded at once."""
        from audit.index import _caption_vectors, _neighbours

        table, out, near = self.ev.table, {}, []
        for cls, caption in pairs:
            c, slots = self.classes.index(cls), self.grammar.parse(caption)
            if slots and all(a in table.columns for a in slots):
                rows = np.flatnonzero((self.ev.labels == c) & self.grammar.matches(table, slots))
                out[(cls, caption)] = (rows, "attribute group")
            else:
                near.append({"class": cls, "caption": caption})
        if near:
            vecs = _caption_vectors([r["caption"] for r in near], self.emb)
            found = _neighbours(near, vecs, self.index, self.classes, self.k)
            for r in near:
                ids = found[(self.classes.index(r["class"]), r["caption"])]
                out[(r["class"], r["caption"])] = (np.asarray(ids, int), "nearest images")
        return out

    def beyond(self, row: dict, names: list[str]) -> dict | None:
        """How much the mode's hardest eval images fail once those the earlier ``names`` of its
        class cover are set aside, against the class's images they do not cover (the earlier
        failure is no part of the comparison: a class at 58% whose orange coats are at 6% is
        at 69% without them), with ``share_covered`` (None: nothing is left)."""
        near = self.hardest(row)
        cov = np.concatenate([self.covered(row["class"], n) for n in names] or [np.zeros(0, int)])
        rest = near[~np.isin(near, cov)]
        if not len(rest):
            return None
        c = self.classes.index(row["class"])
        out = self._rows_vs_class(row["scope"], c, rest, BEYOND_EARLIER, outside=cov)
        return out | {"share_covered": 1 - len(rest) / max(len(near), 1)}

    def attribute_group(self, scope: str, cls: str, caption: str) -> dict | None:
        """The caption checked on the eval images of its class whose attribute columns show
        every slot it names (exact, where the nearest images would mix in others), or None
        when the eval split lacks those columns or the caption names no slot."""
        slots = self.grammar.parse(caption)
        table = self.ev.table
        if not slots or any(a not in table.columns for a in slots):
            return None
        c = self.classes.index(cls)
        rows = np.flatnonzero((self.ev.labels == c) & self.grammar.matches(table, slots))
        return self._rows_vs_class(scope, c, rows, "attribute group") if len(rows) else None

    def __call__(self, scope: str, cls: str, captions: list[str]) -> dict[str, dict]:
        from audit.index import subpopulations_table

        todo = [c for c in dict.fromkeys(captions) if (scope, cls, c) not in self.cache]
        for c in list(todo):  # where the data says which images show the caption: those
            if (chk := self.attribute_group(scope, cls, c)) is not None:
                self.cache[(scope, cls, c)] = chk
                todo.remove(c)
        if todo:
            rows = [{"scope": scope, "class": cls, "caption": c, "polarity": "hard"} for c in todo]
            t = subpopulations_table(
                rows,
                self.ev.correct,
                self.emb,
                self.index,
                self.classes,
                k=self.k,
                scopes=self.scopes,
            )
            for r in t.to_pylist():
                self.cache[(scope, cls, r["caption"])] = {
                    **r,
                    "checked_on": "nearest images",
                    "n": int(r["k"]),
                }
        return {c: self.cache[(scope, cls, c)] for c in captions}


def name_stage(store: RunStore, inputs, cfg) -> str:
    """Stage: ``modes.parquet`` (``[directions]`` section: ``k`` nearest eval images)."""
    from audit.naming import name_modes, with_comparisons
    from audit.shared_names import shared_names
    from audit.slots import SlotGrammar

    caps, dirs = store.read_table("captions.parquet"), store.read_table("directions.parquet")
    hard, cv = _hard_and_strength(caps, dirs)
    grammar = SlotGrammar.of(inputs.data, inputs.config.data.attribute_templates)
    check = _EvalCheck(store, inputs, cfg, grammar)
    rows = {(r["scope"], r["class"], r["mode"]): r for r in dirs.to_pylist() if r["status"] == "ok"}
    modes = name_modes(
        hard,
        cv,
        grammar,
        check,
        lambda key: check.direction(rows[key]),
        lambda key, names: check.beyond(rows[key], names),
        min_gap=inputs.config.stats.min_gap,
    )
    modes = with_comparisons(modes, caps, grammar)
    store.write_table("modes.parquet", modes)
    ev = check.ev
    shared = shared_names(modes, ev.correct, ev.labels, check.classes, check.where_all)
    store.write_table("shared_names.parquet", shared)
    if "group" in inputs.data.columns and store.exists("accuracy.parquet"):
        from audit.planted import named_evaluation

        acc, min_gap = store.read_table("accuracy.parquet"), inputs.config.stats.min_gap
        store.write_table("planted_names.parquet", named_evaluation(acc, modes, min_gap, shared))
    rows = modes.to_pylist()
    n_named = sum(r["named"] for r in rows)
    n_general = sum(r["named"] and r["caption"] != r["specific_caption"] for r in rows)
    n_undecided = sum(r["undecided"] for r in rows)
    beyond = sum(r["fails"] and not r["own"] for r in shared.to_pylist())
    return (
        f"{len(rows)} significant modes: {n_named} named ({n_general} by a more general caption "
        f"than the top one), {len(rows) - n_named} unnamed"
        + (f" ({n_undecided} of them: too few eval images to tell)" if n_undecided else "")
        + f"; {beyond} (model, name) failures that the model's own modes miss"
    )


def load_named(store: RunStore) -> list[NamedMode]:
    """The run's named modes (empty before the name stage)."""
    if not store.exists("modes.parquet"):
        return []
    return named_modes(store.read_table("modes.parquet"))


def pairs_of(named: list[NamedMode]) -> dict[tuple[str, str, int], tuple[str, str | None]]:
    """``{(scope, class, mode): (named caption, easy caption)}``."""
    return {(m.scope, m.cls, m.mode): (m.caption, m.easy) for m in named}
