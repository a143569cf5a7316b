"""Build the static HTML report of a run directory: Jinja2 templates, matplotlib figures,
thumbnails as small files, one page per model and per cluster. It reads only the run
directory (and the dataset the manifest names, for real images) and writes only the report
folder, so ``zoo-audit report RUN`` works on any finished or partial run."""

from __future__ import annotations

import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from audit.report.images import DatasetImages, NearestImages, Thumbs, _safe, embedding_matrix
from audit.store import RunStore

log = logging.getLogger(__name__)

NAV = [("index.html", "Overview", "index"), ("shared.html", "Shared failures", "shared"),
       ("cards.html", "Models & clusters", "cards"), ("sets.html", "Synthetic sets", "sets")]  # fmt: skip
METRIC_LABELS = {"jaccard": "Jaccard overlap", "shared_fraction": "shared fraction of errors",
                 "error_consistency": "error consistency"}  # fmt: skip
DIRECTION_COLUMNS = ["scope", "class", "class_index", "mode", "status", "cv_score", "ci_low", "ci_high", "p_value",
                     "n_errors", "n_correct"]  # fmt: skip
MARKER = "<!-- zoo-audit report -->"
#: the pipeline's stage order (audit.pipeline.runner.default_stages); others follow by time
STAGE_ORDER = ("train", "sweep", "accuracy", "stats", "embed", "directions", "generate", "mitigate", "report")


@dataclass(frozen=True)
class ReportOptions:
    """The ``[report]`` knobs (``audit.pipeline.config.ReportSection`` carries the same fields)."""

    max_modes: int = 12  # failure modes per card shown with image grids (strongest first)
    images: int = 8  # real images per grid (hardest and easiest), generated images per mode
    max_rows: int = 200  # rows per table on a card (worst first)
    max_set_images: int = 240  # thumbnails per synthetic set on the sets page
    max_index_rows: int = 5000  # failure modes listed on the cards page (strongest first)
    thumb_size: int = 64  # pixels; larger images are scaled down to JPEG

    @classmethod
    def of(cls, cfg) -> ReportOptions:
        if cfg is None:
            return cls()
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__ if hasattr(cfg, k)})


@dataclass(frozen=True)
class ReportResult:
    index: str  # path of index.html
    n_models: int
    n_clusters: int
    n_bytes: int
    seconds: float

    def line(self) -> str:
        return (f"report/index.html: {self.n_models} model pages, {self.n_clusters} cluster pages, "
                f"{self.n_bytes / 1e6:.1f} MB")  # fmt: skip


# -- small helpers ---------------------------------------------------------------------------
def _f(x) -> float:
    return float("nan") if x is None else float(x)


def _pct(x, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"


def _env():
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("audit.report", "templates"), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)  # fmt: skip
    nan = lambda x: x is None or (isinstance(x, float) and math.isnan(x))  # noqa: E731
    env.filters.update(
        pct=_pct,
        signed_pct=lambda x: "n/a" if nan(x) else f"{100 * x:+.1f} pts",
        signed=lambda x: "n/a" if nan(x) else f"{x:+.2f}",
        fmt2=lambda x: "n/a" if nan(x) else f"{x:.2f}",
        fmt3=lambda x: "n/a" if nan(x) else (f"{x:.3f}" if x >= 0.001 else f"{x:.1e}"),
        num=lambda x: f"{x:,}" if isinstance(x, int) else x,
        when=lambda t: str(t or "").replace("T", " ").replace("+00:00", " UTC"),
        secs=lambda s: "" if s is None else (f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"),
    )
    return env


def _bootstrap_mean(values, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)`` with a percentile bootstrap over the values (NaN interval below 2 values)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if not v.size:
        return math.nan, math.nan, math.nan
    if v.size < 2:
        return float(v.mean()), math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (n_boot, v.size))].mean(axis=1)
    a = (1 - ci) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def open_dataset(manifest: Mapping):
    """The run's dataset (for real images), or None when it is not on this machine."""
    from audit.data.readers import read_dataset

    data = manifest.get("data", {}) or {}
    cfg = (manifest.get("config", {}) or {}).get("data", {}) or {}
    for p in (data.get("world_dir"), cfg.get("path")):
        if p and "://" not in p and os.path.exists(p):
            try:
                return read_dataset(p)
            except Exception as e:  # noqa: BLE001 - the report goes on without real images
                log.warning("report: cannot open the dataset %s (%s); no real images", p, e)
    return None


class _Run:
    """The run directory's tables, read once (optional ones are None)."""

    def __init__(self, store: RunStore):
        self.store = store
        self.manifest = store.manifest()
        cfg = self.manifest.get("config", {}) or {}
        self.fit_split = (cfg.get("data") or {}).get("split", "debug")
        self.eval_split = (cfg.get("data") or {}).get("eval_split", "test")
        self.metric = (cfg.get("stats") or {}).get("similarity", "jaccard")
        self.method = (cfg.get("stats") or {}).get("method", "average")
        self.k = (cfg.get("directions") or {}).get("k", 50)
        self.embedder = (cfg.get("directions") or {}).get("embedder", "world")
        zoo = self.manifest.get("zoo", {}) or {}
        self.families: dict[str, str] = dict(zoo.get("families") or {})
        self.clusters: dict[str, str] = {}
        t = self.opt("clusters.parquet")
        if t is not None:
            for r in t.to_pylist():
                self.clusters[r["model"]] = f"cluster:{r['cluster']}"
                self.families.setdefault(r["model"], r["family"])
        self.acc = self.opt("accuracy.parquet")
        self.models = [m for m in (zoo.get("models") or []) if m in self.clusters or self._has_acc(m)]
        for m in sorted(set(self.clusters) | self._acc_models()):
            if m not in self.models:
                self.models.append(m)
        self.zoo_models = list(zoo.get("models") or [])

    def opt(self, rel: str, columns=None) -> pa.Table | None:
        if not self.store.exists(rel):
            return None
        if columns is not None:
            have = set(self._schema(rel).names)
            columns = [c for c in columns if c in have]
        return self.store.read_table(rel, columns=columns)

    def _schema(self, rel: str) -> pa.Schema:
        import pyarrow.parquet as pq

        with self.store.fs.open_input_file(self.store.path(rel)) as f:
            return pq.read_schema(f)

    def _acc_models(self) -> set[str]:
        return set(self.acc["model"].to_pylist()) if self.acc is not None else set()

    def _has_acc(self, m: str) -> bool:
        return m in self._acc_models()


def _cluster_title(scope: str, members: list[str], families: Mapping[str, str]) -> str:
    fams = sorted({families.get(m, "?") for m in members})
    return f"Cluster {scope.split(':', 1)[1]} ({', '.join(fams)})"


def _page(scope: str) -> str:
    return f"clusters/{_safe(scope.replace(':', '-'))}.html" if scope.startswith("cluster:") else f"models/{_safe(scope)}.html"


# -- accuracy ----------------------------------------------------------------------------------
def _accuracy(acc: pa.Table | None) -> tuple[dict, dict, dict]:
    """``(overall, classes, groups)``: per model its overall row, class rows, attribute-group rows."""
    overall, classes, groups = {}, defaultdict(list), defaultdict(list)
    if acc is None:
        return overall, classes, groups
    d = acc.to_pydict()
    for i in range(acc.num_rows):
        r = {"cls": d["class"][i], "attribute": d["attribute"][i], "value": d["value"][i], "n": int(d["n"][i]),
             "acc": _f(d["accuracy"][i]), "lo": _f(d["ci_low"][i]), "hi": _f(d["ci_high"][i]),
             "class_acc": _f(d["class_accuracy"][i])}  # fmt: skip
        m = d["model"][i]
        if r["cls"] == "*":
            overall[m] = r
        elif r["attribute"] == "*":
            classes[m].append(r)
        else:
            r["gap"] = r["acc"] - r["class_acc"]
            groups[m].append(r)
    return overall, classes, groups


# -- shared failures -----------------------------------------------------------------------------
def _ec_mean(ec: np.ndarray, lo: np.ndarray, hi: np.ndarray, mask: np.ndarray) -> tuple[float, float, float]:
    """Mean error consistency over the pairs in ``mask`` with a bootstrap interval over pairs;
    a single pair keeps its own interval (its bootstrap over examples)."""
    v = ec[mask]
    ok = np.isfinite(v)
    if ok.sum() == 1:
        return float(v[ok][0]), float(lo[mask][ok][0]), float(hi[mask][ok][0])
    return _bootstrap_mean(v)


def _shared(run: _Run, out: RunStore) -> dict:
    from audit.report import figures

    ov = run.opt("overlap.parquet")
    ctx: dict = {"heatmap": None, "families": []}
    if ov is None or not ov.num_rows:
        return ctx
    d = ov.to_pydict()
    names = [m for m in run.models if m in set(d["model_a"]) | set(d["model_b"])]
    pos = {m: i for i, m in enumerate(names)}
    n = len(names)
    metric = run.metric if run.metric in d else "jaccard"
    s = np.full((n, n), np.nan)
    ec, lo, hi = (np.full((n, n), np.nan) for _ in range(3))
    for i in range(ov.num_rows):
        a, b = pos.get(d["model_a"][i]), pos.get(d["model_b"][i])
        if a is None or b is None:
            continue
        s[a, b] = _f(d[metric][i])
        ec[a, b], lo[a, b], hi[a, b] = _f(d["error_consistency"][i]), _f(d["ci_low"][i]), _f(d["ci_high"][i])
    sim = np.nan_to_num((s + s.T) / 2 if metric == "shared_fraction" else np.where(np.isnan(s), s.T, s), nan=0.0)
    np.fill_diagonal(sim, 1.0)
    label = METRIC_LABELS.get(metric, metric)
    z, order = figures.linkage_order(sim, run.method)
    fams = [run.families.get(m, "") for m in names]
    out.write_bytes("figures/heatmap.png", figures.heatmap_png(sim, names, order, run.families, run.clusters, label))
    out.write_bytes("figures/dendrogram.png", figures.dendrogram_png(z, names, run.families, label))
    iu = np.triu_indices(n, 1)
    same = np.asarray([fams[i] == fams[j] for i, j in zip(*iu, strict=True)], bool)
    ok = np.isfinite(ec[iu])
    out.write_bytes("figures/consistency.png", figures.consistency_png(ec[iu][ok], lo[iu][ok], hi[iu][ok], same[ok]))
    rows, fig_rows = [], []
    F = np.asarray(fams, dtype=object)
    off = ~np.eye(n, dtype=bool)
    ec_sym, lo_sym, hi_sym = (np.where(np.isnan(x), x.T, x) for x in (ec, lo, hi))
    for f in sorted(set(fams)):
        inside = F == f
        within = np.triu(inside[:, None] & inside[None, :], 1)
        between = inside[:, None] & ~inside[None, :] & off
        w, b = _bootstrap_mean(sim[within]), _bootstrap_mean(sim[between])
        fig_rows.append({"family": f, "within": sim[within].tolist(), "between": sim[between].tolist(),
                         "within_mean": w[0], "within_lo": w[1], "within_hi": w[2],
                         "between_mean": b[0], "between_lo": b[1], "between_hi": b[2]})  # fmt: skip
        rows.append({"family": f, "n_models": int(inside.sum()), "within": w[0], "within_lo": w[1], "within_hi": w[2],
                     "between": b[0], "between_lo": b[1], "between_hi": b[2], "gap": w[0] - b[0],
                     "ec_within": _ec_mean(ec_sym, lo_sym, hi_sym, within), "ec_between": _ec_mean(ec_sym, lo_sym, hi_sym, between)})  # fmt: skip
    out.write_bytes("figures/families.png", figures.family_png(fig_rows, label))
    ctx.update(heatmap="figures/heatmap.png", dendrogram="figures/dendrogram.png", families_fig="figures/families.png",
               consistency_fig="figures/consistency.png", families=rows, metric_label=label)  # fmt: skip
    return ctx


# -- failure modes ---------------------------------------------------------------------------------
class _Modes:
    """Significant failure modes per scope, their captions, checks, images and mitigation."""

    def __init__(self, run: _Run, data, opts: ReportOptions, thumbs: Thumbs):
        self.run, self.opts, self.thumbs = run, opts, thumbs
        self.dirs = run.opt("directions.parquet", DIRECTION_COLUMNS + ["q_value"])
        self.by_scope: dict[str, list[dict]] = defaultdict(list)
        self.n_directions = 0 if self.dirs is None else self.dirs.num_rows
        if self.dirs is not None:
            d = self.dirs.to_pydict()
            q = d.get("q_value") or [None] * self.dirs.num_rows
            for i in range(self.dirs.num_rows):
                if d["status"][i] == "ok":
                    self.by_scope[d["scope"][i]].append({
                        "row": i, "scope": d["scope"][i], "cls": d["class"][i], "class_index": d["class_index"][i],
                        "mode": int(d["mode"][i]), "cv": _f(d["cv_score"][i]), "lo": _f(d["ci_low"][i]),
                        "hi": _f(d["ci_high"][i]), "p": _f(d["p_value"][i]), "q": _f(q[i]),
                        "n_errors": int(d["n_errors"][i]), "n_correct": int(d["n_correct"][i])})  # fmt: skip
            for modes in self.by_scope.values():
                modes.sort(key=lambda m: -m["cv"])
        self.captions: dict[tuple, list[str]] = defaultdict(list)
        caps = run.opt("captions.parquet", ["scope", "class", "mode", "caption", "rank", "polarity"])
        if caps is not None:
            c = caps.to_pydict()
            for i in np.argsort(np.asarray(c["rank"]), kind="stable"):
                self.captions[(c["scope"][i], c["class"][i], c["mode"][i], c["polarity"][i])].append(c["caption"][i])
        self.checks: dict[tuple, dict] = {}
        subs = run.opt("subpopulations.parquet")
        if subs is not None:
            s = subs.to_pydict()
            for i in range(subs.num_rows):
                self.checks[(s["scope"][i], s["class"][i], s["caption"][i])] = {k: s[k][i] for k in s}
        conf = run.opt("confirmations.parquet")
        if conf is not None:
            s = conf.to_pydict()
            for i in range(conf.num_rows):
                key = (s["scope"][i], s["class"][i], s.get("caption", [None] * conf.num_rows)[i])
                self.checks.setdefault(key, {}).update({k: s[k][i] for k in s})
        self.mitigation = run.opt("mitigation.parquet")
        self._mit_by: dict[str, list[dict]] = defaultdict(list)
        for r in self.mitigation.to_pylist() if self.mitigation is not None else []:
            r = {**r, "cls": r.get("class"), "lam": r.get("lambda")}
            self._mit_by[r.get("model")].append(r)  # a model's card: every row of that model
            if str(r.get("scope", "")).startswith("cluster:"):
                self._mit_by[r["scope"]].append(r)  # a cluster's card: the rows of its collective fix
        self.sets = self._sets()
        self._images = self._nearest(data)
        self._preds: dict[str, tuple] = {}
        self._set_cache: dict[str, pa.Table | None] = {}
        self._vectors = None
        self.classes = list((run.manifest.get("data") or {}).get("classes") or (data.classes if data is not None else []))

    # -- inputs for images
    def _nearest(self, data):
        if data is None or self.dirs is None:
            return None
        self.source = DatasetImages(data)
        emb = None
        info = (self.run.manifest.get("embeddings") or {}).get(self.run.embedder) or {}
        rel = info.get("path") or next((f"embeddings/{d}" for d in self.run.store.listdir("embeddings")), None)
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
            self._vectors = self.run.store.read_table("directions.parquet",
                                                      columns=["class_index", "direction", "weight_norm", "intercept", "mean", "scale"])  # fmt: skip
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
                self._preds[model] = (ids[o], t["pred"].to_numpy(zero_copy_only=False)[o],
                                      t["correct"].to_numpy(zero_copy_only=False)[o])  # fmt: skip
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
                name = self.classes[pred] if pred is not None and 0 <= pred < len(self.classes) else str(pred)
                cls, label = ("wrong", f"→ {name}") if wrong else ("right", "correct")
            else:
                cls, label = ("wrong" if 2 * wrong > of else "right"), f"{wrong}/{of} wrong"
            out.append({"src": rel, "cls": cls, "label": label, "alt": f"image {e}", "title": f"{e} {label}"})
        return out

    # -- synthetic sets
    def _sets(self) -> list[dict]:
        t = self.run.opt("synthetic_sets.parquet")
        return [] if t is None else t.to_pylist()

    def set_table(self, set_id: str) -> pa.Table | None:
        if set_id not in self._set_cache:
            rel = f"synthetic/{set_id}"
            self._set_cache[set_id] = self.run.store.read_table(rel) if self.run.store.exists(rel) else None
        return self._set_cache[set_id]

    def set_thumbs(self, rows: list[dict]) -> list[dict]:
        out = []
        for r in rows:
            rel = self.thumbs.add("syn", str(r.get("image_id") or f"{r['prompt']}-{r['seed']}"), r["png"])
            if rel is not None:
                out.append({"src": rel, "cls": "", "label": str(r["seed"]), "alt": r["prompt"],
                            "title": f"{r['prompt']} (seed {r['seed']})"})  # fmt: skip
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
                return self.set_thumbs(t.take(pa.array(idx[: self.opts.images], pa.int64())).to_pylist())
        return []

    # -- one card's modes
    def _caption_rows(self, scope: str, cls: str, mode: int, polarity: str) -> list[dict]:
        rows = []
        for c in self.captions.get((scope, cls, mode, polarity), []):
            chk = self.checks.get((scope, cls, c), {})
            confirm = ""
            if chk.get("confirmed") is not None:
                confirm = ("confirmed by generation" if chk["confirmed"] else "not confirmed by generation")
                if chk.get("hard_gen_accuracy") is not None:
                    confirm += f" (generated {_pct(chk['hard_gen_accuracy'], 0)} vs {_pct(chk.get('easy_gen_accuracy'), 0)})"
            rows.append({"caption": c, "acc": chk.get("accuracy_on_nearest"), "lo": chk.get("ci_low"), "hi": chk.get("ci_high"),
                         "class_acc": chk.get("class_accuracy"), "confirm": confirm,
                         "confirmed": chk.get("confirmed")})  # fmt: skip
        return rows

    def mitigation_rows(self, scope: str) -> list[dict]:
        """Rows of ``mitigation.parquet`` for a model's card (its rows) or a cluster's (scope = the cluster)."""
        return self._mit_by.get(scope, [])

    def card_modes(self, scope: str, members: list[str], page: str) -> tuple[list[dict], list[dict], list[dict]]:
        """``(modes with images, other modes, mitigation rows not attached to a mode)``."""
        modes = self.by_scope.get(scope, [])
        full, rest = modes[: self.opts.max_modes], modes[self.opts.max_modes : self.opts.max_modes + self.opts.max_rows]
        vectors = self._vector_rows([m["row"] for m in full]) if full and self._images is not None else {}
        mitig = self.mitigation_rows(scope)
        used = set()
        out = []
        for m in full:
            hard = self._caption_rows(scope, m["cls"], m["mode"], "hard")
            easy = self._caption_rows(scope, m["cls"], m["mode"], "easy")
            conf = [c["confirmed"] for c in hard if c["confirmed"] is not None]
            md = {**m, "anchor": f"{_safe(m['cls'])}-mode-{m['mode']}", "hard": hard, "easy": easy,
                  "confirmed": any(conf) if conf else None, "hard_imgs": [], "easy_imgs": [], "gen_imgs": []}  # fmt: skip
            if m["row"] in vectors:
                hard_ids, easy_ids = self._images.extremes(vectors[m["row"]], self.opts.images)
                md["hard_imgs"] = self._real_thumbs(hard_ids, members)
                md["easy_imgs"] = self._real_thumbs(easy_ids, members)
            md["gen_imgs"] = self._generated(scope, [c["caption"] for c in hard])
            # a hard caption's rows go to the mode it names; the class's other rows (its planted
            # group) to the class's strongest mode shown
            hard_caps = {c["caption"] for c in hard}
            mine = [i for i, r in enumerate(mitig) if r["cls"] == m["cls"] and i not in used
                    and (r.get("eval") != "nearest_caption" or r.get("target") in hard_caps)]  # fmt: skip
            md["mitigation"] = _pivot([mitig[i] for i in mine])
            used |= set(mine)
            out.append(md)
        others = [{**m, "top_hard": next(iter(self.captions.get((scope, m["cls"], m["mode"], "hard"), [])), "")} for m in rest]
        return out, others, [r for i, r in enumerate(mitig) if i not in used]


def _pivot(rows: list[dict]) -> dict | None:
    """Mitigation rows of one class as a table: one row per (model, method), one column per
    evaluation target (the planted group, the nearest images of a hard caption)."""
    if not rows:
        return None
    targets = list(dict.fromkeys((r.get("eval") or "", r.get("target") or "") for r in rows))
    table: dict[tuple, dict] = {}
    for r in rows:
        key = (r.get("model"), r.get("method"))
        t = table.setdefault(key, {"model": r.get("model"), "method": r.get("method"), "lam": r.get("lam"),
                                   "n_added": r.get("n_added"), "overall_before": r.get("overall_before"),
                                   "overall_after": r.get("overall_after"), "cells": [None] * len(targets)})  # fmt: skip
        t["cells"][targets.index((r.get("eval") or "", r.get("target") or ""))] = r
    heads = []
    for e, t in targets:
        heads.append(f"planted group {t}" if e == "planted" else (f"nearest images of '{t}'" if e == "nearest_caption" else f"{e} {t}".strip()))
    return {"targets": heads, "rows": list(table.values()), "models": len({k[0] for k in table}) > 1}


# -- the report ------------------------------------------------------------------------------------
def write_report(store: RunStore, out_dir: str | None = None, *, data=None, cfg=None) -> ReportResult:
    """Write the report of the run in ``store`` to ``out_dir`` (default ``RUN/report``).

    ``data`` is the run's dataset (an ``ImageTable``; default: opened from the manifest) for
    the real images of each failure mode; without it the cards show no real images.
    """
    t0 = time.perf_counter()
    opts = ReportOptions.of(cfg)
    if out_dir is None:
        out_dir = store.path("report") if store.local else f"{store.uri.rstrip('/')}/report"
    out = RunStore(out_dir)
    if out.exists("index.html") and MARKER.encode() in out.read_bytes("index.html"):
        for sub in ("img", "models", "clusters", "figures"):  # a previous build's pages and thumbnails
            out.delete(sub)
    run = _Run(store)
    if data is None:
        data = open_dataset(run.manifest)
    status = run.manifest.get("status", "unknown")
    if status == "running" and all(v.get("status") == "done" for k, v in (run.manifest.get("stages") or {}).items() if k != "report"):
        status = "done"  # written by the run's last stage: every stage before it is done
    env = _env()
    thumbs = Thumbs(out, opts.thumb_size)
    n_bytes = 0

    def render(rel: str, template: str, page: str, **ctx) -> None:
        nonlocal n_bytes
        root = "../" * rel.count("/")
        m = run.manifest
        html = env.get_template(template).render(
            root=root, nav=NAV, page=page, fit_split=run.fit_split, eval_split=run.eval_split, k=run.k,
            run={"name": os.path.basename(store.uri.rstrip("/")), "path": store.uri, "updated": m.get("updated", ""),
                 "status": status,
                 "seconds": sum(float(v.get("seconds") or 0) for v in (m.get("stages") or {}).values())}, **ctx)  # fmt: skip
        b = (html + "\n" + MARKER + "\n").encode()
        out.write_bytes(rel, b)
        n_bytes += len(b)

    for name in ("report.css", "report.js"):
        from importlib.resources import files

        b = files("audit.report").joinpath("static", name).read_bytes()
        out.write_bytes(f"static/{name}", b)
        n_bytes += len(b)

    overall, class_acc, group_acc = _accuracy(run.acc)
    modes = _Modes(run, data, opts, thumbs)
    shared = _shared(run, out)
    members: dict[str, list[str]] = defaultdict(list)
    for m in run.models:
        if m in run.clusters:
            members[run.clusters[m]].append(m)
    scopes = sorted(members, key=lambda s: int(s.split(":")[1]) if s.split(":")[1].isdigit() else s)
    titles = {s: _cluster_title(s, members[s], run.families) for s in scopes}
    sets_by_scope = {s["scope"]: s for s in modes.sets}

    def gain_of(model):
        """Mean gain of the model's targeted fix ("synthetic" when the run has it, else every non-control method)."""
        rows = modes.mitigation_rows(model)
        pick = "synthetic" if any(r.get("method") == "synthetic" for r in rows) else None
        g = [r["gain"] for r in rows if r.get("gain") is not None and (r.get("method") == pick if pick else r.get("method") != "control")]
        return float(np.nanmean(g)) if g else math.nan

    def mode_summary(scope):
        ms = modes.by_scope.get(scope, [])
        top = ms[0] if ms else None
        return len(ms), (f"{top['cls']} (strength {top['cv']:.2f})" if top else ""), (top["cv"] if top else math.nan)

    # model and cluster pages
    cards, n_model_pages = [], 0
    for scope in [*run.models, *scopes]:
        is_cluster = scope.startswith("cluster:")
        mem = members[scope] if is_cluster else [scope]
        page = _page(scope)
        full, others, mit_other = modes.card_modes(scope, mem, page)
        if is_cluster:
            rows = [overall[m] for m in mem if m in overall]
            acc = {"acc": float(np.mean([r["acc"] for r in rows])), "lo": min(r["acc"] for r in rows),
                   "hi": max(r["acc"] for r in rows)} if rows else {"acc": None, "lo": None, "hi": None}  # fmt: skip
            per = defaultdict(list)
            for m in mem:
                for r in class_acc.get(m, []):
                    per[r["cls"]].append(r)
            crow = [{"cls": c, "n": rs[0]["n"], "acc": float(np.mean([r["acc"] for r in rs])),
                     "lo": min(r["acc"] for r in rs), "hi": max(r["acc"] for r in rs)} for c, rs in per.items()]  # fmt: skip
            grows = []
        else:
            o = overall.get(scope)
            acc = {"acc": o["acc"], "lo": o["lo"], "hi": o["hi"]} if o else {"acc": None, "lo": None, "hi": None}
            crow = list(class_acc.get(scope, []))
            grows = sorted(group_acc.get(scope, []), key=lambda r: r["gap"])
        crow.sort(key=lambda r: r["acc"])
        cl = run.clusters.get(scope)
        set_row = sets_by_scope.get(scope if is_cluster else cl)
        card = {"kind": "cluster" if is_cluster else "model", "name": scope,
                "title": titles[scope] if is_cluster else scope, "family": run.families.get(scope, ""),
                "cluster_href": f"../{_page(cl)}" if cl else None, "cluster_title": titles.get(cl, cl),
                "peers": ", ".join(m for m in members.get(cl, []) if m != scope) or "no other model",
                "members": [{"name": m, "href": f"../{_page(m)}", "family": run.families.get(m, "")} for m in mem],
                "n_modes": len(modes.by_scope.get(scope, [])), **acc,
                "worst_class": crow[0] if crow else None, "worst_group": grows[0] if grows else None,
                "set_href": f"../sets.html#{_safe(set_row['set_id'])}" if set_row else None,
                "set_images": set_row["n_images"] if set_row else 0,
                "set_scope": titles.get(set_row["scope"], "") if set_row else ""}  # fmt: skip
        n_all = len(modes.by_scope.get(scope, []))
        render(page, "card.html", "cards", title=card["title"], card=card, modes=full, other_modes=others,
               more_modes=max(0, n_all - len(full) - len(others)), mitigation_other=mit_other,
               class_rows=crow[: opts.max_rows], more_classes=max(0, len(crow) - opts.max_rows),
               group_rows=grows[: opts.max_rows], more_groups=max(0, len(grows) - opts.max_rows),
               has_directions=modes.dirs is not None)  # fmt: skip
        n, _, top_cv = mode_summary(scope)
        cards.append({"href": page, "title": card["title"], "kind": card["kind"],
                      "family": ", ".join(sorted({run.families.get(m, "") for m in mem})), **acc, "n_modes": n,
                      "top_cv": top_cv, "classes": ", ".join(sorted({m["cls"] for m in modes.by_scope.get(scope, [])}))[:200]})  # fmt: skip
        n_model_pages += not is_cluster

    # cards page: every card, and every significant mode (strongest first)
    all_modes = sorted((m for s in [*run.models, *scopes] for m in modes.by_scope.get(s, [])), key=lambda m: -m["cv"])
    shown = {(m["scope"], m["row"]) for s in [*run.models, *scopes] for m in modes.by_scope.get(s, [])[: opts.max_modes]}
    index_rows = []
    for m in all_modes[: opts.max_index_rows]:
        fam = run.families.get(m["scope"]) or ", ".join(sorted({run.families.get(x, "") for x in members.get(m["scope"], [])}))
        anchor = f"#{_safe(m['cls'])}-mode-{m['mode']}" if (m["scope"], m["row"]) in shown else ""
        index_rows.append({**m, "family": fam, "href": _page(m["scope"]) + anchor, "title": titles.get(m["scope"], m["scope"]),
                           "top_hard": next(iter(modes.captions.get((m["scope"], m["cls"], m["mode"], "hard"), [])), "")})  # fmt: skip
    render("cards.html", "cards.html", "cards", title="Models and clusters", cards=cards, modes=index_rows,
           more_rows=max(0, len(all_modes) - len(index_rows)))  # fmt: skip

    # shared failures
    clusters_ctx = [{"href": _page(s), "title": titles[s], "n_modes": len(modes.by_scope.get(s, [])),
                     "members": [{"name": m, "href": _page(m)} for m in members[s]],
                     "families": ", ".join(sorted({run.families.get(m, "") for m in members[s]}))} for s in scopes]  # fmt: skip
    render("shared.html", "shared.html", "shared", title="Shared failures", clusters=clusters_ctx,
           **{**shared, "metric_label": shared.get("metric_label", METRIC_LABELS.get(run.metric, run.metric))})  # fmt: skip

    # synthetic sets
    sets_ctx, n_syn = [], 0
    for s in modes.sets:
        t = modes.set_table(s["set_id"])
        n_syn += int(s.get("n_images") or 0)
        entry = {**s, "anchor": _safe(s["set_id"]), "scope_href": _page(s["scope"]) if s["scope"] in titles else None,
                 "scope_title": titles.get(s["scope"], s["scope"]), "prompts": [], "shown": 0, "missing": "",
                 "params": ""}  # fmt: skip
        if t is None:
            entry["missing"] = f"synthetic/{s['set_id']} not found"
        else:
            rows = t.slice(0, opts.max_set_images).to_pylist()
            entry["shown"] = len(rows)
            entry["params"] = rows[0].get("params", "") if rows else ""
            by_prompt: dict[str, list] = {}
            for r in rows:
                by_prompt.setdefault(r["prompt"], []).append(r)
            entry["prompts"] = [{"prompt": p, "images": modes.set_thumbs(rs)} for p, rs in by_prompt.items()]
        sets_ctx.append(entry)
    render("sets.html", "sets.html", "sets", title="Synthetic sets", sets=sets_ctx, n_images=n_syn)

    # overview
    m = run.manifest
    order = {name: i for i, name in enumerate(STAGE_ORDER)}
    stages = sorted((m.get("stages") or {}).items(), key=lambda kv: (order.get(kv[0], len(order)), kv[1].get("time", "")))
    stage_rows = []
    for name, st in stages:
        status = st.get("status", "")
        line = st.get("line", "")
        if name == "report" and status == "running":
            status, line = "done", "this report"
        stage_rows.append({"name": name, "status": status, "line": line, "seconds": st.get("seconds"),
                           "time": st.get("time", ""), "reason": st.get("reason", "")})  # fmt: skip
    err = store.errors()
    err_rows = []
    for r in err.slice(0, 200).to_pylist():
        reason = (r.get("reason") or "").strip()
        first = reason.splitlines()[0] if reason else ""
        err_rows.append({**r, "first": first, "reason": reason, "more": reason != first})
    dm = m.get("data") or {}
    classes = list(dm.get("classes") or (data.classes if data is not None else []))
    splits = []
    if data is not None:
        vals, counts = np.unique(data.column("split").astype(str), return_counts=True)
        splits = [(v, int(c)) for v, c in zip(vals, counts, strict=True)]
    zoo_rows = []
    for name in run.models:
        o = overall.get(name) or {}
        n, top, top_cv = mode_summary(name)
        cl = run.clusters.get(name)
        zoo_rows.append({"name": name, "href": _page(name), "family": run.families.get(name, ""),
                         "cluster": titles.get(cl, "") if cl else "", "cluster_href": _page(cl) if cl else None,
                         "acc": o.get("acc"), "lo": o.get("lo"), "hi": o.get("hi"), "n_modes": n, "top": top,
                         "top_cv": top_cv, "gain": gain_of(name)})  # fmt: skip
    render("index.html", "index.html", "index", title="Overview",
           data={"n": int(dm.get("n") or (len(data) if data is not None else 0)), "n_classes": len(classes),
                 "classes": classes[:60], "more_classes": max(0, len(classes) - 60), "splits": splits,
                 "source": dm.get("source", ""), "world": bool(dm.get("world_dir")),
                 "fit_split": run.fit_split, "eval_split": run.eval_split},
           zoo={"name": (m.get("zoo") or {}).get("name", ""), "models": zoo_rows,
                "n_families": len({run.families.get(x, "") for x in run.models}), "n_clusters": len(scopes),
                "missing": [x for x in run.zoo_models if x not in run.models]},
           stages=stage_rows, errors={"n": err.num_rows, "rows": err_rows},
           n_modes=sum(len(v) for v in modes.by_scope.values()), n_directions=modes.n_directions,
           n_synthetic=n_syn, n_sets=len(modes.sets), has_mitigation=modes.mitigation is not None)  # fmt: skip

    n_bytes += thumbs.n_bytes + sum(len(out.read_bytes(f"figures/{f}")) for f in out.listdir("figures"))
    return ReportResult(out.path("index.html"), n_model_pages, len(scopes), n_bytes, time.perf_counter() - t0)


def build_report(run_dir: str, out_dir: str | None = None, *, data=None, cfg=None) -> str:
    """Write the static HTML report of the run at ``run_dir`` (default into ``RUN/report``);
    returns the path of its ``index.html``. ``cfg``: a ``[report]`` section (or None)."""
    return write_report(RunStore(run_dir), out_dir, data=data, cfg=cfg).index


def report_stage(store: RunStore, inputs, cfg) -> str:
    """Stage: ``report/index.html`` (``[report]`` section). Returns the stage's line."""
    return write_report(store, None, data=inputs.data, cfg=cfg).line()
