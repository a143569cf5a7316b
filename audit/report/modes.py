"""The failure-mode cards of a model or cluster page: strength, captions, image grids,
generated images, confirmation and mitigation rows."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa

from audit.pipeline.config import ReportSection
from audit.report.common import DIRECTION_COLUMNS, _f, _pct
from audit.report.images import DatasetImages, NearestImages, Thumbs, _safe, embedding_matrix
from audit.report.pivot import _pivot
from audit.view import RunView


def _significant(dirs: pa.Table | None) -> dict[str, list[dict]]:
    """``{scope: significant modes, strongest first}``."""
    by_scope: dict[str, list[dict]] = defaultdict(list)
    if dirs is None:
        return by_scope
    d = dirs.to_pydict()
    q = d.get("q_value") or [None] * dirs.num_rows
    for i in range(dirs.num_rows):
        if d["status"][i] != "ok":
            continue
        by_scope[d["scope"][i]].append(
            {
                "row": i,
                "scope": d["scope"][i],
                "cls": d["class"][i],
                "class_index": d["class_index"][i],
            }
            | {"mode": int(d["mode"][i]), "cv": _f(d["cv_score"][i]), "lo": _f(d["ci_low"][i])}
            | {"hi": _f(d["ci_high"][i]), "p": _f(d["p_value"][i]), "q": _f(q[i])}
            | {"n_errors": int(d["n_errors"][i]), "n_correct": int(d["n_correct"][i])}
        )
    for modes in by_scope.values():
        modes.sort(key=lambda m: -m["cv"])
    return by_scope


def _ranked_captions(run: RunView) -> dict[tuple, list[str]]:
    """``{(scope, class, mode, polarity): captions, best first}``."""
    out: dict[tuple, list[str]] = defaultdict(list)
    caps = run.table("captions.parquet", ["scope", "class", "mode", "caption", "rank", "polarity"])
    if caps is not None:
        c = caps.to_pydict()
        for i in np.argsort(np.asarray(c["rank"]), kind="stable"):
            key = (c["scope"][i], c["class"][i], c["mode"][i], c["polarity"][i])
            out[key].append(c["caption"][i])
    return out


def _checks(run: RunView) -> dict[tuple, dict]:
    """``{(scope, class, caption): its nearest-image check and its confirmation}``."""
    checks: dict[tuple, dict] = {}
    subs = run.table("subpopulations.parquet")
    for r in subs.to_pylist() if subs is not None else []:
        checks[(r["scope"], r["class"], r["caption"])] = r
    conf = run.table("confirmations.parquet")
    for r in conf.to_pylist() if conf is not None else []:
        chk = checks.setdefault((r["scope"], r["class"], r.get("caption")), {})
        chk.setdefault("confirmations", []).append(r)  # one per generator
    return checks


def _names(run: RunView) -> dict[tuple, dict]:
    """``{(scope, class, mode): its modes.parquet row}`` (named or not, and its order)."""
    from audit.naming import by_mode

    return by_mode(run.table("modes.parquet"))


#: a table's name for an unnamed mode whose images are too few to tell whether it fails
UNDECIDED = "unnamed (too few images to tell)"


def name_label(row: dict | None) -> str:
    """A mode's name in a table: its caption, "unnamed" (:data:`UNDECIDED` when its images
    are too few to tell), or "" before the name stage ran."""
    if not row:
        return ""
    if row["named"]:
        return row["caption"]
    return UNDECIDED if row.get("undecided") else "unnamed"


def _confirm_text(confirmations: list[dict]) -> str:
    from audit.synthetic import is_oracle

    parts = []
    for c in confirmations:
        gen = c.get("generator") or "generation"
        verdict = "confirmed" if c["confirmed"] else "not confirmed"
        oracle = ", oracle" if is_oracle(gen) else ""
        detail = f"{_pct(c.get('hard_gen_accuracy'), 0)} vs {_pct(c.get('easy_gen_accuracy'), 0)}"
        parts.append(f"{verdict} by {gen}{oracle} (generated {detail})")
    return "; ".join(parts)


class _Modes:
    """Significant failure modes per scope, their captions, checks, images and mitigation."""

    def __init__(self, run: RunView, data, opts: ReportSection, thumbs: Thumbs):
        self.run, self.opts, self.thumbs = run, opts, thumbs
        self.dirs = run.table("directions.parquet", DIRECTION_COLUMNS + ["q_value"])
        self.n_directions = 0 if self.dirs is None else self.dirs.num_rows
        self.by_scope = _significant(self.dirs)
        self.captions = _ranked_captions(run)
        self.checks = _checks(run)
        self.names = _names(run)
        for scope, modes in self.by_scope.items():  # named first, by how much they fail
            modes.sort(
                key=lambda m: self.names.get((scope, m["cls"], m["mode"]), {}).get("order", 10**9)
            )
        self.mitigation = run.table("mitigation.parquet")
        self._mit_by: dict[str, list[dict]] = defaultdict(list)
        for r in self.mitigation.to_pylist() if self.mitigation is not None else []:
            r = {**r, "cls": r.get("class"), "lam": r.get("lambda")}
            self._mit_by[r.get("model")].append(r)  # a model's card: every row of that model
            if str(r.get("scope", "")).startswith("cluster:"):
                self._mit_by[r["scope"]].append(r)  # a cluster's card: its collective fix
        self.sets = self._sets()
        self._images = self._nearest(data)
        self._preds: dict[str, tuple] = {}
        self._set_cache: dict[str, pa.Table | None] = {}
        self._vectors = None
        self.classes = run.classes

    # -- inputs for images
    def _nearest(self, data):
        if data is None or self.dirs is None:
            return None
        self.source = DatasetImages(data)
        emb = None
        info = (self.run.manifest.get("embeddings") or {}).get(
            self.run.config.directions.embedder
        ) or {}
        rel = info.get("path") or next(
            (f"embeddings/{d}" for d in self.run.store.listdir("embeddings")), None
        )
        if rel and self.run.store.exists(rel):
            emb = self.run.store.read_table(rel, columns=["example_id", "vector"])
        if emb is None:
            return None
        eids, X = embedding_matrix(emb)
        epos = {e: i for i, e in enumerate(eids.tolist())}
        for split in (self.run.eval_split, self.run.fit_split):
            part = data.split(split)
            ids = part.example_ids.astype(str)
            idx = np.fromiter((epos.get(e, -1) for e in ids.tolist()), np.int64, len(ids))
            have = idx >= 0
            if have.any():
                self.image_split = split
                return NearestImages(ids[have], part.labels[have], X[idx[have]])
        return None

    def _vector_rows(self, rows: list[int]) -> dict[int, dict]:
        if self._vectors is None:
            self._vectors = self.run.store.read_table(
                "directions.parquet",
                columns=["class_index", "direction", "weight_norm", "intercept", "mean", "scale"],
            )
        t = self._vectors.take(pa.array(rows, pa.int64())).to_pylist()
        return dict(zip(rows, t, strict=True))

    def _predictions(self, model: str):
        if model not in self._preds:
            rel = f"predictions/model={model}"
            if not self.run.store.exists(rel):
                self._preds[model] = None
            else:
                t = self.run.store.read_table(rel, columns=["example_id", "pred", "correct"])
                ids = np.asarray(t["example_id"].to_pylist(), dtype=object).astype(str)
                o = np.argsort(ids)
                self._preds[model] = (
                    ids[o],
                    t["pred"].to_numpy(zero_copy_only=False)[o],
                    t["correct"].to_numpy(zero_copy_only=False)[o],
                )
        return self._preds[model]

    def _verdict(self, models: list[str], example_id: str) -> tuple[int, int, int | None]:
        """``(wrong, of, a wrong prediction)`` of ``models`` on one image."""
        wrong = of = 0
        pred = None
        for m in models:
            p = self._predictions(m)
            if p is None:
                continue
            j = int(np.searchsorted(p[0], example_id))
            if j < len(p[0]) and p[0][j] == example_id:
                of += 1
                if not bool(p[2][j]):
                    wrong += 1
                    pred = int(p[1][j])
        return wrong, of, pred

    def _real_thumbs(self, ids: list[str], models: list[str]) -> list[dict]:
        out = []
        for e in ids:
            src = self.source.source(e)
            rel = self.thumbs.add("x", e, src) if src is not None else None
            if rel is None:
                continue
            wrong, of, pred = self._verdict(models, e)
            if of == 0:
                cls, label = "", ""
            elif len(models) == 1:
                name = (
                    self.classes[pred]
                    if pred is not None and 0 <= pred < len(self.classes)
                    else str(pred)
                )
                cls, label = ("wrong", f"→ {name}") if wrong else ("right", "correct")
            else:
                cls, label = ("wrong" if 2 * wrong > of else "right"), f"{wrong}/{of} wrong"
            out.append(
                {
                    "src": rel,
                    "cls": cls,
                    "label": label,
                    "alt": f"image {e}",
                    "title": f"{e} {label}",
                }
            )
        return out

    # -- synthetic sets
    def _sets(self) -> list[dict]:
        t = self.run.table("synthetic_sets.parquet")
        return [] if t is None else t.to_pylist()

    def set_table(self, set_id: str) -> pa.Table | None:
        if set_id not in self._set_cache:
            rel = f"synthetic/{set_id}"
            self._set_cache[set_id] = (
                self.run.store.read_table(rel) if self.run.store.exists(rel) else None
            )
        return self._set_cache[set_id]

    def set_thumbs(self, rows: list[dict]) -> list[dict]:
        out = []
        for r in rows:
            rel = self.thumbs.add(
                "syn", str(r.get("image_id") or f"{r['prompt']}-{r['seed']}"), r["png"]
            )
            if rel is not None:
                out.append(
                    {
                        "src": rel,
                        "cls": "",
                        "label": str(r["seed"]),
                        "alt": r["prompt"],
                        "title": f"{r['prompt']} (seed {r['seed']})",
                    }
                )
        return out

    def _generated(self, scope: str, hard: list[str]) -> list[dict]:
        target = scope if scope.startswith("cluster:") else self.run.clusters.get(scope)
        for s in self.sets:
            if s["scope"] == target:
                t = self.set_table(s["set_id"])
                if t is None or "prompt" not in t.column_names:
                    return []
                prompts = t["prompt"].to_pylist()
                idx = [i for i, p in enumerate(prompts) if p in set(hard)]
                idx.sort(key=lambda i: hard.index(prompts[i]))
                return self.set_thumbs(
                    t.take(pa.array(idx[: self.opts.images], pa.int64())).to_pylist()
                )
        return []

    # -- one card's modes
    def _caption_rows(self, scope: str, cls: str, mode: int, polarity: str) -> list[dict]:
        rows = []
        for c in self.captions.get((scope, cls, mode, polarity), []):
            chk = self.checks.get((scope, cls, c), {})
            confs = chk.get("confirmations", [])
            confirm = _confirm_text(confs)
            rows.append(
                {
                    "caption": c,
                    "acc": chk.get("accuracy_on_nearest"),
                    "lo": chk.get("ci_low"),
                    "hi": chk.get("ci_high"),
                    "class_acc": chk.get("class_accuracy"),
                    "confirm": confirm,
                    "confirmed": any(x["confirmed"] for x in confs) if confs else None,
                }
            )
        return rows

    def _name(self, scope: str, m: dict) -> dict | None:
        """The mode's name: the most general caption that fails as much, or unnamed."""
        r = self.names.get((scope, m["cls"], m["mode"]))
        if r is None:
            return None
        return {
            **r,
            "generalised": bool(r["named"] and r["caption"] != r["specific_caption"]),
            "confirm": _confirm_text(
                self.checks.get((scope, m["cls"], r["caption"]), {}).get("confirmations", [])
            ),
        }

    def _named_confirmed(self, scope: str, cls: str, caption: str) -> bool | None:
        confs = self.checks.get((scope, cls, caption), {}).get("confirmations", [])
        return any(c["confirmed"] for c in confs) if confs else None

    def mitigation_rows(self, scope: str) -> list[dict]:
        """Rows of ``mitigation.parquet`` for a model's card (its rows) or a cluster's (scope = the cluster)."""
        return self._mit_by.get(scope, [])

    def _mode_card(self, scope: str, m: dict, members: list[str], vectors: dict) -> dict:
        """One mode shown in full: name, captions and their checks, images."""
        hard = self._caption_rows(scope, m["cls"], m["mode"], "hard")
        conf = [c["confirmed"] for c in hard if c["confirmed"] is not None]
        md = {**m, "anchor": f"{_safe(m['cls'])}-mode-{m['mode']}", "hard": hard}
        md |= {"easy": self._caption_rows(scope, m["cls"], m["mode"], "easy")}
        md |= {"confirmed": any(conf) if conf else None, "hard_imgs": [], "easy_imgs": []}
        if m["row"] in vectors:
            hard_ids, easy_ids = self._images.extremes(vectors[m["row"]], self.opts.images)
            md["hard_imgs"] = self._real_thumbs(hard_ids, members)
            md["easy_imgs"] = self._real_thumbs(easy_ids, members)
        name = md["name"] = self._name(scope, m)
        if name and name["named"]:
            md["confirmed"] = self._named_confirmed(scope, m["cls"], name["caption"])
        md["shown"] = [name["caption"]] if name and name["named"] else []
        md["gen_imgs"] = self._generated(scope, md["shown"] + [c["caption"] for c in hard])
        return md

    def card_modes(
        self, scope: str, members: list[str], page: str
    ) -> tuple[list[dict], list[dict], list[dict]]:
        """``(modes with images, other modes, mitigation rows not attached to a mode)``."""
        modes = self.by_scope.get(scope, [])
        n = self.opts.max_modes
        full, rest = modes[:n], modes[n : n + self.opts.max_rows]
        vectors = (
            self._vector_rows([m["row"] for m in full]) if full and self._images is not None else {}
        )
        mitig = self.mitigation_rows(scope)
        used: set[int] = set()
        out = []
        for m in full:
            md = self._mode_card(scope, m, members, vectors)
            # a caption's rows go to the mode it names; the class's other rows (its planted
            # group) to the class's first mode shown
            caps = {c["caption"] for c in md["hard"]} | set(md["shown"])
            mine = [
                i
                for i, r in enumerate(mitig)
                if r["cls"] == m["cls"]
                and i not in used
                and (r.get("eval") != "nearest_caption" or r.get("target") in caps)
            ]
            md["mitigation"] = _pivot([mitig[i] for i in mine])
            used |= set(mine)
            out.append(md)
        top = self.captions
        others = []
        for m in rest:
            hard = next(iter(top.get((scope, m["cls"], m["mode"], "hard"), [])), "")
            name = name_label(self.names.get((scope, m["cls"], m["mode"])))
            others.append({**m, "top_hard": hard, "name": name})
        return out, others, [r for i, r in enumerate(mitig) if i not in used]
