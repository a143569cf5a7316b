"""The mitigate stage: fix the failures the audit found, prove each fix on held-out real
data, and confirm the failures by generation.

1. The synthetic sets of the run (each model's hard captions, each cluster's shared set,
   the probe set) go through the zoo once on the injected sweeper (Ray shard actors):
   logits and penultimate features of every generated image.
2. Per model, through the executor (one task a model), its linear head is retrained with
   :class:`audit.mitigate.LinearHead` on the stored features of the train split plus:
   ``control`` nothing (lambda = 0); ``synthetic`` its own hard sets and ``synthetic_cluster``
   its cluster's shared set, weighted ``(1 - lambda)`` real / ``lambda`` synthetic with lambda
   and the images per caption chosen on the fit split; ``pool_direction`` / ``pool_random``
   / ``pool_confidence`` K pool images per hard class chosen by the failure direction, at
   random, or by lowest confidence; ``upweight`` the fit split's direction-selected images
   with a higher weight. Choices use the fit split only; the eval split only evaluates.
3. Evaluation on the eval split, before and after, with paired bootstrap intervals: on the
   planted group (``eval = planted``, worlds) and on the nearest eval images of each hard
   caption (``eval = nearest_caption``, any data) -> ``mitigation.parquet``.
4. Confirmation by generation -> ``confirmations.parquet`` (:mod:`audit.pipeline.confirm`).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from audit.store import RunStore

log = logging.getLogger(__name__)

METHODS = (
    "control",
    "synthetic",
    "synthetic_cluster",
    "pool_direction",
    "pool_random",
    "pool_confidence",
    "upweight",
)
MITIGATION_SCHEMA = pa.schema(
    [
        ("scope", pa.string()),
        ("model", pa.string()),
        ("class", pa.string()),
        ("method", pa.string()),
        ("lambda", pa.float64()),
        ("n_added", pa.int64()),
        ("overall_before", pa.float64()),
        ("overall_after", pa.float64()),
        ("hard_before", pa.float64()),
        ("hard_after", pa.float64()),
        ("gain", pa.float64()),
        ("gain_ci_low", pa.float64()),
        ("gain_ci_high", pa.float64()),
        ("eval", pa.string()),
        ("target", pa.string()),
        ("n_hard", pa.int64()),
        ("choice", pa.string()),
    ]
)


# -- the synthetic images through the zoo --------------------------------------------------
@dataclass
class SyntheticImages:
    """Every generated image of the run once (deduplicated by prompt and seed)."""

    images: np.ndarray  # [N, H, W, 3] uint8
    prompts: np.ndarray  # [N] str
    rank: np.ndarray  # [N] int: the image's index among its prompt's images
    sets: dict[str, np.ndarray] = field(default_factory=dict)  # set_id -> row indices

    def of(self, set_id: str, k: int | None = None) -> np.ndarray:
        idx = self.sets.get(set_id, np.zeros(0, np.int64))
        return idx if k is None else idx[self.rank[idx] < k]


def load_synthetic(store: RunStore, sets: pa.Table) -> SyntheticImages:
    from PIL import Image

    key_to_row: dict[tuple[str, int], int] = {}
    images, prompts, ranks, by_set = [], [], [], {}
    for r in sets.to_pylist():
        t = store.read_table(f"synthetic/{r['set_id']}", columns=["png", "prompt", "seed"])
        rows, seen = [], {}
        for png, prompt, seed in zip(
            *(t[c].to_pylist() for c in ("png", "prompt", "seed")), strict=True
        ):
            rank = seen[prompt] = (
                seen.get(prompt, -1) + 1
            )  # the image's index among its prompt's (row order)
            key = (prompt, int(seed))
            if key not in key_to_row:
                key_to_row[key] = len(images)
                images.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
                prompts.append(prompt)
                ranks.append(int(rank))
            rows.append(key_to_row[key])
        by_set[r["set_id"]] = np.asarray(rows, np.int64)
    if not images:
        return SyntheticImages(
            np.zeros((0, 1, 1, 3), np.uint8), np.zeros(0, str), np.zeros(0, int), {}
        )
    return SyntheticImages(np.stack(images), np.asarray(prompts), np.asarray(ranks), by_set)


def _labelled(syn: SyntheticImages, keep: np.ndarray) -> SyntheticImages:
    """Only the rows in ``keep``, with every set's indices renumbered."""
    if keep.all():
        return syn
    new = np.cumsum(keep) - 1
    sets = {s: new[idx[keep[idx]]] for s, idx in syn.sets.items()}
    return SyntheticImages(syn.images[keep], syn.prompts[keep], syn.rank[keep], sets)


class _Keep:
    """A sweep sink that keeps outputs in memory."""

    def __init__(self):
        self.logits, self.features, self.failed = {}, {}, {}

    def model_done(self, name, logits, features, shard):
        self.logits[name], self.features[name] = logits, features

    def model_failed(self, name, reason):
        self.failed[name] = reason


def sweep_synthetic(inputs, syn: SyntheticImages, labels: np.ndarray) -> _Keep:
    from audit.pipeline.sweep import SweepJob
    from audit.zoo.train import trained_weights

    weights = trained_weights(inputs.zoo, inputs.data, cache=inputs.config.zoo.cache or None)
    ids = np.asarray([f"syn-{i}" for i in range(len(syn.images))])
    job = SweepJob(
        syn.images,
        ids,
        labels,
        list(inputs.data.classes),
        list(inputs.zoo),
        weights,
        inputs.config.ray.batch_size,
        with_features=True,
    )
    keep = _Keep()
    inputs.services.sweeper.run(job, keep)
    if keep.failed and not keep.logits:
        first = next(iter(keep.failed.values())).splitlines()[0]
        raise RuntimeError(
            f"no model could classify the generated images ({len(keep.failed)} failed; first: {first})"
        )
    return keep


# -- the per-model work (an executor task) -------------------------------------------------
@dataclass
class HardClass:
    cls: int
    caption: str
    fit_near: np.ndarray  # fit-split rows nearest to the hard caption (the choice's subpopulation)
    eval_near: (
        np.ndarray
    )  # eval-split rows nearest to the hard caption (nearest_caption evaluation)
    pool_order: np.ndarray  # pool rows of the class, hardest first by the direction
    fit_order: np.ndarray  # fit rows of the class, hardest first by the direction


@dataclass
class ModelTask:
    model: str
    cluster: str | None
    hard: list[HardClass]
    planted: list[tuple[int, str, np.ndarray]]  # (class, group, eval rows of the group)
    syn_features: np.ndarray  # [S, D] features of the run's synthetic images for this model
    own_sets: list[str]
    cluster_sets: list[str]


def _head(spec, classes, weights_path):
    """``(W0 [C, D], b0 [C])`` of a zoo member's linear head, or None when it has none."""
    import torch

    from audit.zoo.models import build_model

    m = build_model(spec, classes, weights_path).module
    if m.kind == "timm":
        lin = m.head if m.head is not None else m.backbone.get_classifier()
        if isinstance(lin, torch.nn.Linear):
            return lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy()
    if m.kind == "open_clip":
        scale = float(m.backbone.logit_scale.exp())
        w = scale * m.head.detach().double().numpy().T
        return w, np.zeros(len(w))
    return None


def _run_model(
    task: ModelTask,
    *,
    run_uri,
    split_ids,
    split_labels,
    syn_labels,
    syn_rank,
    syn_sets,
    spec_of,
    weights,
    classes,
    cfg,
    baseline_check: float = 0.99,
) -> dict:
    """Every method for one model; returns ``{"rows": [...], "error": str | None}``."""
    from audit.evaluate import feature_path, prediction_path
    from audit.mitigate import (
        LinearHead,
        choose,
        mix_weights,
        paired_gain,
        select_lowest,
        select_random,
        stratified_subsample,
    )
    from audit.pipeline.stats import align_ids

    store = RunStore(run_uri)
    name = task.model
    head = _head(spec_of[name], classes, weights.get(name))
    if head is None:
        return {
            "rows": [],
            "error": f"model {name} has no linear head to retrain (builder {spec_of[name].builder})",
        }
    W0, b0 = head
    ft = store.read_table(feature_path(name))
    fvec = np.asarray(ft["vector"].combine_chunks().flatten().to_numpy(), np.float64).reshape(
        ft.num_rows, -1
    )
    fids = ft["example_id"].to_numpy(zero_copy_only=False)
    preds = store.read_table(prediction_path(name))
    F, Y, conf = {}, {}, {}
    for split, ids in split_ids.items():
        idx = align_ids(fids, ids)
        if (idx < 0).any():
            return {
                "rows": [],
                "error": f"model {name} has no features for {int((idx < 0).sum())} {split} examples",
            }
        F[split], Y[split] = fvec[idx], split_labels[split]
        pidx = align_ids(preds["example_id"].to_numpy(zero_copy_only=False), ids)
        conf[split] = preds["confidence"].to_numpy(zero_copy_only=False)[pidx]
    fs, es = cfg["fit_split"], cfg["eval_split"]
    agree = float(
        np.mean(
            (F[fs] @ W0.T + b0).argmax(1)
            == preds["pred"].to_numpy()[
                align_ids(preds["example_id"].to_numpy(zero_copy_only=False), split_ids[fs])
            ]
        )
    )
    if agree < baseline_check:
        return {
            "rows": [],
            "error": f"model {name}: features x head reproduce only {agree:.1%} of its predictions",
        }
    S = task.syn_features
    keep = stratified_subsample(
        Y["train"], int(cfg["max_real"]), seed=0
    )  # the same real examples for every method
    train_X, train_y = F["train"][keep], Y["train"][keep]

    def fit(X_add=None, y_add=None, lam=0.0, w_add=None):
        if X_add is None or not len(X_add):
            X, y, w = train_X, train_y, None
        else:
            X, y = np.concatenate([train_X, X_add]), np.concatenate([train_y, y_add])
            w = (
                mix_weights(len(train_X), len(X_add), lam)
                if w_add is None
                else np.concatenate([np.ones(len(train_X)), w_add])
            )
        return LinearHead(alpha=cfg["alpha"], max_iter=cfg["max_iter"]).fit(
            X, y, w, W0, b0, n_classes=len(classes)
        )

    before = {s: (F[s] @ W0.T + b0).argmax(1) == Y[s] for s in (fs, es)}

    def fit_score(h):  # the choice's score: fit split only
        ok = h.predict(F[fs]) == Y[fs]
        hard = [ok[hc.fit_near].mean() for hc in task.hard if len(hc.fit_near)]
        return float(np.mean(hard)) if hard else float(ok.mean()), float(ok.mean())

    def syn_rows(set_ids, k):
        idx = (
            np.concatenate([syn_sets[s][syn_rank[syn_sets[s]] < k] for s in set_ids])
            if set_ids
            else np.zeros(0, int)
        )
        return S[idx], syn_labels[idx]

    results = {}  # method -> (head, lambda, n_added, choice)
    results["control"] = (fit(), 0.0, 0, "")
    base_overall = float(before[fs].mean())
    k_max = int(cfg["k"])
    chosen = None
    if task.own_sets:
        fitted = {}

        def score(c):
            if c not in fitted:
                X_add, y_add = syn_rows(task.own_sets, c[1])
                fitted[c] = (fit(X_add, y_add, c[0]), len(X_add))
            return fit_score(fitted[c][0])

        # coordinate search on the fit split: lambda at the most images, then fewer images at that lambda
        lam, tried = choose(
            [(x, k_max) for x in cfg["lambdas"]], score, base_overall, cfg["max_drop"]
        )
        chosen, tried2 = choose(
            [lam, (lam[0], max(1, k_max // 2))], score, base_overall, cfg["max_drop"]
        )
        tried += tried2[1:]
        lam, k = chosen
        tries = "; ".join(
            f"lambda={c[0]:g} k={c[1]}: hard {h:.3f} overall {o:.3f}" for c, h, o in tried
        )
        results["synthetic"] = (
            fitted[chosen][0],
            lam,
            fitted[chosen][1],
            f"chose lambda={lam:g} k={k} on {fs}; tried {tries}",
        )
    if task.cluster_sets:
        # the cluster's one shared set, at the model's own choice of lambda and images per caption
        lam, k = chosen or (cfg["lambdas"][0], k_max)
        X_add, y_add = syn_rows(task.cluster_sets, k)
        results["synthetic_cluster"] = (
            fit(X_add, y_add, lam),
            lam,
            len(X_add),
            f"lambda={lam:g} k={k} as chosen for the model's own set",
        )
    K = int(cfg["pool_k"])
    if "pool" in F and task.hard:
        pool_y = Y["pool"]
        picks = {"pool_direction": [], "pool_random": [], "pool_confidence": []}
        for hc in task.hard:
            in_c = np.flatnonzero(pool_y == hc.cls)
            picks["pool_direction"].append(hc.pool_order[:K])
            picks["pool_random"].append(in_c[select_random(len(in_c), K, seed=hc.cls)])
            picks["pool_confidence"].append(in_c[select_lowest(conf["pool"][in_c], K)])
        for method, parts in picks.items():
            idx = np.unique(np.concatenate(parts))
            results[method] = (
                fit(F["pool"][idx], pool_y[idx], w_add=np.ones(len(idx))),
                0.0,
                len(idx),
                f"K={K} per hard class from pool",
            )
    if task.hard:
        idx = np.unique(np.concatenate([hc.fit_order[:K] for hc in task.hard]))
        w_up = float(cfg["upweight"])
        results["upweight"] = (
            fit(F[fs][idx], Y[fs][idx], w_add=np.full(len(idx), w_up)),
            0.0,
            len(idx),
            f"K={K} per hard class from {fs}, weight {w_up:g}",
        )

    rows = []
    overall_before = float(before[es].mean())
    targets = [("planted", classes[c], g, rows_) for c, g, rows_ in task.planted]
    targets += [("nearest_caption", classes[hc.cls], hc.caption, hc.eval_near) for hc in task.hard]
    for method, (h, lam, n_added, choice) in results.items():
        after = h.predict(F[es]) == Y[es]
        scope = task.cluster if method == "synthetic_cluster" else name
        for kind, cls, target, idx in targets:
            g, lo, hi = paired_gain(
                before[es][idx], after[idx], n_boot=cfg["n_boot"], seed=len(rows)
            )
            rows.append(
                {
                    "scope": scope,
                    "model": name,
                    "class": cls,
                    "method": method,
                    "lambda": lam,
                    "n_added": n_added,
                    "overall_before": overall_before,
                    "overall_after": float(after.mean()),
                    "hard_before": float(before[es][idx].mean()) if len(idx) else float("nan"),
                    "hard_after": float(after[idx].mean()) if len(idx) else float("nan"),
                    "gain": g,
                    "gain_ci_low": lo,
                    "gain_ci_high": hi,
                    "eval": kind,
                    "target": target,
                    "n_hard": len(idx),
                    "choice": choice,
                }
            )
    return {"rows": rows, "error": None}


def mitigation_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=MITIGATION_SCHEMA)


def _as_dict(cfg) -> Mapping:
    return cfg.model_dump() if hasattr(cfg, "model_dump") else dict(cfg)


# -- the stage -----------------------------------------------------------------------------
def _caption_classes(caps: pa.Table, probe: Mapping[str, str], pairs) -> dict[str, str]:
    out = {r["caption"]: r["class"] for r in caps.to_pylist()}
    by_hard = {h: cls for (_, cls), (h, _) in pairs.items()}
    for hard, cf in probe.items():
        if hard in by_hard:
            out.setdefault(cf, by_hard[hard])
    return out


def _nearest(index, emb, caption: str, cls: int, k: int) -> np.ndarray:
    q = emb.encode_text([caption])
    _, idx = index.search(q, k, cls)
    return idx[0][idx[0] >= 0]


def mitigate_stage(store: RunStore, inputs, cfg) -> str:
    """Stage: retrain heads per model and method, evaluate on the eval split, confirm by generation."""
    from audit.directions import decision_from_row
    from audit.embed import embed_table
    from audit.index import ClassIndex
    from audit.pipeline.confirm import confirmations, hard_and_easy, probe_captions
    from audit.pipeline.directions import embedder_for
    from audit.pipeline.sweep import swept_models
    from audit.zoo.train import trained_weights

    data, classes = inputs.data, inputs.data.classes
    fit, ev = inputs.fit_split, inputs.eval_split
    caps, dirs = store.read_table("captions.parquet"), store.read_table("directions.parquet")
    sets = store.read_table("synthetic_sets.parquet")
    pairs = hard_and_easy(caps, dirs)
    probe = probe_captions(pairs, data)
    cap_cls = _caption_classes(caps, probe, pairs)
    syn = load_synthetic(store, sets)
    unknown = sorted({p for p in syn.prompts.tolist() if p not in cap_cls})
    if unknown:  # a set made elsewhere: its images cannot be labelled
        log.warning(
            "%d generated prompt(s) name no class of the run's captions and are left out: %s",
            len(unknown),
            unknown[:3],
        )
    syn_labels = np.asarray(
        [classes.index(cap_cls[p]) if p in cap_cls else -1 for p in syn.prompts], np.int64
    )
    syn = _labelled(syn, syn_labels >= 0)
    syn_labels = syn_labels[syn_labels >= 0]
    keep = sweep_synthetic(inputs, syn, syn_labels) if len(syn.images) else _Keep()
    store.record_errors(
        {"stage": "mitigate", "item": f"model {m}", "reason": f"on the generated images: {r}"}
        for m, r in keep.failed.items()
    )

    models = [m for m in swept_models(store, inputs.zoo) if m in keep.logits]
    splits = [s for s in dict.fromkeys(["train", fit, ev, "pool"]) if len(data.split(s))]
    emb, _ = embedder_for(inputs, train=False)
    E = embed_table(store, emb, data.split(splits), progress=False)
    have = set(E.example_ids.astype(str).tolist())
    for m in models:  # rows every model predicted (undecodable images have none)
        have &= set(
            store.read_table(f"predictions/model={m}", columns=["example_id"])[
                "example_id"
            ].to_pylist()
        )
    part = {
        s: data.split(s).take(
            np.flatnonzero(np.isin(data.split(s).example_ids.astype(str), list(have)))
        )
        for s in splits
    }
    split_ids = {s: t.example_ids.astype(str) for s, t in part.items()}
    X = {s: E.align(split_ids[s]) for s in splits}
    index = {s: ClassIndex(X[s], part[s].labels) for s in (fit, ev)}
    set_of = {r["scope"]: r["set_id"] for r in sets.to_pylist()}
    clusters = {}
    if store.exists("clusters.parquet"):
        clusters = {
            r["model"]: f"cluster:{r['cluster']}"
            for r in store.read_table("clusters.parquet").to_pylist()
        }
    rows_by = {
        (r["scope"], r["class"]): r
        for r in dirs.to_pylist()
        if r["mode"] == 0 and r["status"] == "ok"
    }
    planted_groups = (
        _planted_groups(store, part.get(ev), cfg.min_gap, classes)
        if "group" in data.columns
        else {}
    )

    tasks = []
    k_near = int(cfg.k_nearest)
    for m in models:
        hard = []
        for (scope, cname), (hcap, _) in pairs.items():
            if scope != m:
                continue
            c = classes.index(cname)
            row = rows_by[(m, cname)]
            order = {}
            for s in ("pool", fit):
                if s in X:
                    in_c = np.flatnonzero(part[s].labels == c)
                    order[s] = in_c[np.argsort(decision_from_row(row, X[s][in_c]), kind="stable")]
            hard.append(
                HardClass(
                    c,
                    hcap,
                    _nearest(index[fit], emb, hcap, c, k_near),
                    _nearest(index[ev], emb, hcap, c, k_near),
                    order.get("pool", np.zeros(0, int)),
                    order[fit],
                )
            )
        cl = clusters.get(m)
        tasks.append(
            ModelTask(
                m,
                cl,
                hard,
                planted_groups.get(m, []),
                keep.features[m],
                [set_of[m]] if m in set_of else [],
                [set_of[cl]] if cl in set_of else [],
            )
        )
    shared = {
        "run_uri": store.uri,
        "split_ids": split_ids,
        "split_labels": {s: t.labels for s, t in part.items()},
        "syn_labels": syn_labels,
        "syn_rank": syn.rank,
        "syn_sets": syn.sets,
        "spec_of": {s.name: s for s in inputs.zoo},
        "weights": trained_weights(inputs.zoo, data, cache=inputs.config.zoo.cache or None),
        "classes": classes,
        "cfg": {
            **cfg.model_dump(),
            "fit_split": fit,
            "eval_split": ev,
            "k": inputs.config.generate.k,
        },
    }
    out = inputs.services.executor.map(_run_model, tasks, shared=shared)
    rows = [r for o in out for r in o["rows"]]
    errors = [o["error"] for o in out if o["error"]]
    store.record_errors({"stage": "mitigate", "item": e.split(":")[0], "reason": e} for e in errors)
    table = mitigation_table(rows)
    store.write_table("mitigation.parquet", table)

    members: dict[str, list[str]] = {}
    for m, cl in clusters.items():
        if m in keep.logits:
            members.setdefault(cl, []).append(m)
    correct_on = _correct_on(pairs, probe, syn, set_of, keep, syn_labels, members)
    conf = confirmations(pairs, correct_on, probe, min_gap=cfg.min_gap, n_boot=cfg.n_boot)
    store.write_table("confirmations.parquet", conf)
    return _line(table, conf, len(models), errors)


def _planted_groups(store, ev_table, min_gap, classes) -> dict[str, list]:
    """Per model, the planted groups that fail on the fit split (accuracy.parquet), with their eval rows."""
    if ev_table is None or not store.exists("accuracy.parquet"):
        return {}
    groups = ev_table.column("group").astype(str)
    out: dict[str, list] = {}
    for r in store.read_table("accuracy.parquet").to_pylist():
        if (
            r["attribute"] == "group"
            and r["class_accuracy"] - r["accuracy"] >= min_gap
            and r["class"] in classes
        ):
            idx = np.flatnonzero(groups == r["value"])
            if len(idx):
                out.setdefault(r["model"], []).append((classes.index(r["class"]), r["value"], idx))
    return out


def _correct_on(pairs, probe, syn: SyntheticImages, set_of, keep: _Keep, labels, members) -> dict:
    """``{scope: {caption: per-image correctness}}`` on the generated images of each caption."""
    out: dict[str, dict[str, np.ndarray]] = {}
    probe_rows = syn.of(set_of.get("probe", ""))
    for (scope, _), (hard, easy) in pairs.items():
        who = (
            members.get(scope, [])
            if scope.startswith("cluster:")
            else ([scope] if scope in keep.logits else [])
        )
        if not who:
            continue
        src = {cap: probe_rows for cap in (hard, easy, probe.get(hard)) if cap}
        if not len(
            probe_rows[syn.prompts[probe_rows] == hard]
        ):  # no probe images: the scope's own hard set
            src[hard] = syn.of(set_of.get(scope, ""))
        for cap, rows in src.items():
            idx = rows[syn.prompts[rows] == cap]
            if len(idx):
                ok = np.mean([keep.logits[m][idx].argmax(1) == labels[idx] for m in who], axis=0)
                out.setdefault(scope, {})[cap] = ok
    return out


def _line(table: pa.Table, conf: pa.Table, n_models: int, errors: list[str]) -> str:
    import pyarrow.compute as pc

    kind = "planted" if pc.any(pc.equal(table["eval"], "planted")).as_py() else "nearest_caption"
    t = table.filter(pc.equal(table["eval"], kind)) if table.num_rows else table
    gains = {}
    for r in t.to_pylist():
        gains.setdefault(r["method"], []).append(r["gain"])
    show = ", ".join(
        f"{m} {np.nanmean(gains[m]) * 100:+.1f}" for m in ("synthetic", "control") if m in gains
    )
    n_conf = int(np.sum(conf["confirmed"].to_numpy(zero_copy_only=False))) if conf.num_rows else 0
    line = f"{n_models} models' heads retrained; mean {kind} gain (points): {show or 'none'}; {n_conf}/{conf.num_rows} hard captions confirmed"
    return line + (f"; {len(errors)} models skipped (errors.parquet)" if errors else "")
