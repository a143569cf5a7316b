"""The second half of the audit: embeddings, failure directions, captions, subpopulations.

Pure work lives in ``audit`` (embedders, :mod:`audit.directions`, :mod:`audit.captions`,
:mod:`audit.index`); this stage wires it to the run directory and, when Ray is running,
fits the models' directions in parallel Ray tasks (the embeddings go to the object store
once). Outputs: ``embeddings/``, ``directions.parquet``, ``direction_similarity.parquet``,
``captions.parquet``, ``subpopulations.parquet`` and, on a world with planted groups,
``planted.parquet``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from audit.data.table import ImageTable
from audit.store import RunStore

log = logging.getLogger(__name__)


@dataclass
class DirectionsConfig:
    embedder: str = "world"
    fit_split: str = "debug"
    eval_split: str = "test"
    k: int = 50  # nearest test images per caption
    top_k: int = 5  # hard and easy captions kept per direction
    caption_scoring: str = "images"  # "images": mean decision value of the caption's nearest images; "text": the paper's
    grounding_k: int = 50  # nearest fit-split images per caption for "images" scoring
    max_modes: int = 2
    n_permutations: int = 50  # smallest p-value 1/51, small enough to survive the FDR control over a zoo
    llm_model: str = ""  # an OpenAI-compatible model name; empty = grammar captions only
    llm_base_url: str = ""  # default: $OPENAI_BASE_URL


@dataclass
class DirectionsResult:
    directions: pa.Table
    captions: pa.Table
    subpopulations: pa.Table
    planted: pa.Table | None
    similarity: pa.Table
    summary: str


def _correct_for(preds: Mapping[str, pa.Table], ids: np.ndarray) -> tuple[dict, dict]:
    """``({model: correct bool [N]}, {model: confidence [N]})`` aligned with ``ids``."""
    correct, conf = {}, {}
    for m, t in preds.items():
        pos = {e: i for i, e in enumerate(t["example_id"].to_pylist())}
        idx = np.array([pos.get(e, -1) for e in ids])
        if (idx < 0).any():
            log.warning("model %s has no prediction for %d of %d examples; skipped", m, int((idx < 0).sum()), len(ids))
            continue
        correct[m] = t["correct"].to_numpy(zero_copy_only=False)[idx]
        conf[m] = t["confidence"].to_numpy(zero_copy_only=False)[idx]
    return correct, conf


def _fit_models(X, correct: Mapping[str, np.ndarray], labels, X_stats, estimator) -> dict:
    """Per-model directions: Ray tasks (one per model) when Ray runs, else threads here."""
    from audit.directions import fit_directions

    try:
        import ray

        use_ray = ray.is_initialized() and len(correct) > 1
    except ImportError:
        use_ray = False
    if not use_ray:
        return fit_directions(X, correct, labels, X_stats=X_stats, estimator=estimator)

    @ray.remote(num_cpus=1)
    def fit_one(X, X_stats, labels, name, c, estimator):
        from audit.directions import fit_directions

        return fit_directions(X, {name: c}, labels, X_stats=X_stats, estimator=estimator)[name]

    refs = [ray.put(X), ray.put(X_stats), ray.put(labels)]
    futures = {m: fit_one.remote(*refs, m, c, estimator) for m, c in correct.items()}
    return {m: ray.get(f) for m, f in futures.items()}


def with_q_values(dirs: pa.Table) -> pa.Table:
    """Add Benjamini-Hochberg q-values over every direction of the run: with many models
    and classes, some permutation p-values are small by chance; the q-value bounds the
    share of false discoveries among the directions reported at or below it."""
    from scipy.stats import false_discovery_control

    p = np.asarray(dirs["p_value"].to_numpy(zero_copy_only=False), float)
    q = np.full(len(p), np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        q[ok] = false_discovery_control(p[ok], method="bh")
    return dirs.append_column("q_value", pa.array(q, pa.float64()))


def directions_stage(store: RunStore, data: ImageTable, models: Sequence[str], cfg: DirectionsConfig | None = None,
                     world_dir: str | None = None, progress: bool = True) -> DirectionsResult:  # fmt: skip
    """Fit, name and check failure directions for every model and every cluster in the run."""
    from audit.captions import (
        CaptionGrounding,
        LLMConfig,
        candidate_captions,
        captions_table,
        reference_caption,
        world_reference,
    )
    from audit.directions import (
        FailureDirections,
        clusters_from_table,
        decision_from_row,
        direction_similarity,
        directions_table,
        fit_collective,
    )
    from audit.embed import create_embedder, embed_table
    from audit.index import ClassIndex, subpopulations_table

    cfg = cfg or DirectionsConfig()
    store.set_stage("directions", "running")
    classes = data.classes
    spec = None
    if world_dir and os.path.exists(os.path.join(world_dir, "spec.toml")):
        from audit.data.world import WorldSpec

        spec = WorldSpec.from_toml(os.path.join(world_dir, "spec.toml"))

    emb = create_embedder(cfg.embedder, data=data) if cfg.embedder.startswith("world") else create_embedder(cfg.embedder)
    table = data.split(["train", cfg.fit_split, cfg.eval_split])
    E = embed_table(store, emb, table, progress=progress)
    fit, ev, train = data.split(cfg.fit_split), data.split(cfg.eval_split), data.split("train")
    X, X_eval, X_train = (E.align(t.example_ids.astype(str)) for t in (fit, ev, train))

    from audit.evaluate import load_predictions

    preds = load_predictions(store, models)  # read once: the fit split and the eval split both come from it
    correct, confidence = _correct_for(preds, fit.example_ids.astype(str))
    if not correct:
        raise ValueError(f"no model has predictions for the {cfg.fit_split!r} split; run the sweep over it first")
    est = FailureDirections(max_modes=cfg.max_modes, n_permutations=cfg.n_permutations)
    fitted = _fit_models(X, correct, fit.labels, X_train, est)
    if store.exists("clusters.parquet"):
        clusters = clusters_from_table(store.read_table("clusters.parquet"))
        fitted.update(fit_collective(X, correct, clusters, fit.labels, X_stats=X_train, estimator=est))
    else:
        clusters = {}
    dirs = with_q_values(directions_table(fitted, classes))
    store.write_table("directions.parquet", dirs)
    sim = direction_similarity(dirs)
    store.write_table("direction_similarity.parquet", sim)

    llm = None
    if cfg.llm_model:
        llm = LLMConfig(model=cfg.llm_model, base_url=cfg.llm_base_url or os.environ.get("OPENAI_BASE_URL") or None)
    cands = candidate_captions(classes, world_spec=spec, llm=llm)
    refs = {c: world_reference(spec, c) if spec is not None and c in spec.items else reference_caption(c) for c in classes}
    if cfg.caption_scoring not in ("images", "text"):
        raise ValueError(f"caption_scoring must be 'images' or 'text', got {cfg.caption_scoring!r}")
    grounding = CaptionGrounding(X, fit.labels, classes, cfg.grounding_k) if cfg.caption_scoring == "images" else None
    caps = captions_table(dirs, cands, emb.encode_text, refs, top_k=cfg.top_k, grounding=grounding)
    store.write_table("captions.parquet", caps)

    correct_eval, _ = _correct_for({m: preds[m] for m in correct}, ev.example_ids.astype(str))
    index = ClassIndex(X_eval, ev.labels)
    scopes = {f"cluster:{cid}": members for cid, members in clusters.items()}
    subs = subpopulations_table(caps, correct_eval, emb, index, classes, k=cfg.k, scopes=scopes)
    store.write_table("subpopulations.parquet", subs)

    planted = None
    if "group" in data.columns and store.exists("accuracy.parquet"):
        from audit.planted import planted_evaluation

        decisions = {}
        for row in dirs.to_pylist():
            if row["mode"] == 0 and row["direction"] is not None and row["scope"] in correct:
                in_c = fit.labels == classes.index(row["class"])
                decisions[(row["scope"], row["class"])] = decision_from_row(row, X[in_c])
        acc = store.read_table("accuracy.parquet")
        # both caption scorings are checked against the truth, so the report compares them
        other = captions_table(dirs, cands, emb.encode_text, refs, top_k=1,
                               grounding=None if grounding is not None else CaptionGrounding(X, fit.labels, classes, cfg.grounding_k))  # fmt: skip
        tables = []
        for scoring, c in ((cfg.caption_scoring, caps), ("text" if grounding is not None else "images", other)):
            t = planted_evaluation(acc, c, decisions, confidence, correct, fit.labels, fit.column("group"), classes)
            tables.append(t.append_column("caption_scoring", pa.array([scoring] * t.num_rows, pa.string())))
        planted = pa.concat_tables(tables)
        store.write_table("planted.parquet", planted)
    store.set_stage("directions", "done", embedder=emb.name, n_directions=dirs.num_rows, n_captions=caps.num_rows)
    return DirectionsResult(dirs, caps, subs, planted, sim, format_directions(dirs, caps, subs, planted, sim=sim))


def format_direction_similarity(sim: pa.Table, families: Mapping[str, str]) -> str:
    """Mean cosine between two models' mode-0 directions for the same class, within vs
    between families: how much of a failure mode the zoo shares."""
    within, between = [], []
    for r in sim.to_pylist():
        a, b = r["scope_a"], r["scope_b"]
        if a.startswith("cluster:") or b.startswith("cluster:") or a == b or a not in families or b not in families:
            continue
        (within if families[a] == families[b] else between).append(r["cosine"])
    if not within or not between:
        return ""
    return (f"Failure directions shared across the zoo: mean cosine between two models' directions for the same "
            f"class {np.mean(within):.2f} within a family vs {np.mean(between):.2f} between families")  # fmt: skip


def format_directions(dirs: pa.Table, caps: pa.Table, subs: pa.Table, planted: pa.Table | None,
                      families: Mapping[str, str] | None = None, per_family: int = 2,
                      sim: pa.Table | None = None) -> str:  # fmt: skip
    """The strongest failure modes per family (or scope), with captions and nearest-image accuracy."""
    families = families or {}
    sub = {(r["scope"], r["class"], r["caption"]): r for r in subs.to_pylist()}
    caps_by = {}
    for r in caps.to_pylist():
        caps_by.setdefault((r["scope"], r["class"], r["mode"], r["polarity"]), []).append(r)
    ok = [r for r in dirs.to_pylist() if r["status"] == "ok"]
    by_group: dict[str, list] = {}
    for r in ok:
        g = r["scope"] if r["scope"].startswith("cluster:") else families.get(r["scope"], r["scope"])
        by_group.setdefault(g, []).append(r)
    lines = ["Strongest failure modes (CV score = balanced accuracy of the SVM; hard / easy captions;",
             "accuracy on the 50 nearest test images vs the class):"]  # fmt: skip
    for g in sorted(by_group):
        lines.append(f"  {g}:")
        for r in sorted(by_group[g], key=lambda r: -r["cv_score"])[:per_family]:
            lines.append(f"    {r['scope']:18s} {r['class']:10s} mode {r['mode']}  cv {r['cv_score']:.2f}  "
                         f"p={r['p_value']:.3f} q={r.get('q_value', float('nan')):.3f}")  # fmt: skip
            for pol in ("hard", "easy"):
                top = sorted(caps_by.get((r["scope"], r["class"], r["mode"], pol), []), key=lambda c: c["rank"])[:1]
                for c in top:
                    s = sub.get((r["scope"], r["class"], c["caption"]))
                    acc = f"  nearest {s['accuracy_on_nearest']:.0%} vs class {s['class_accuracy']:.0%}" if s else ""
                    lines.append(f"      {pol:4s}: {c['caption']!r}{acc}")
    if sim is not None and families:
        line = format_direction_similarity(sim, families)
        if line:
            lines.append("\n" + line)
    if planted is not None and planted.num_rows:
        import pyarrow.compute as pc

        from audit.planted import summarize_planted

        lines.append("\nAgainst the planted truth (groups at least 15 points below their class):")
        for scoring in dict.fromkeys(planted["caption_scoring"].to_pylist()):
            s = summarize_planted(planted.filter(pc.equal(planted["caption_scoring"], scoring)))
            lines.append(
                f"  captions scored on {scoring:6s}: the top-1 hard caption names the planted attribute for "
                f"{s['named_share']:.1%} of {s['pairs']} (model, group) pairs"
            )
        lines.append(
            f"  ranking a class's images by the direction finds the planted group with precision {s['precision_svm']:.2f} "
            f"at the number of errors, vs {s['precision_confidence']:.2f} ranking by the model's confidence"
        )
    return "\n".join(lines)
