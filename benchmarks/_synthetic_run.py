"""A synthetic run directory of a given shape (models x classes x images), written without a
zoo: what ``bench_report.py`` times the report on, and a run any reader of runs can be tried on.

The tables are the run directory's contract (ARCHITECTURE.md): a Parquet dataset of small
PNGs, predictions, accuracy per class and attribute value, overlap, clusters, directions with
captions and nearest-image checks for a third of the classes, embeddings, one synthetic set
per cluster, an errors row and a manifest whose config is a full :class:`AuditConfig` (the
dataset's splits are the config's own).
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

COLORS = ["red", "green", "blue", "yellow"]


def _png(rng, size: int) -> bytes:
    from PIL import Image

    base = rng.integers(0, 255, 3)
    yy, xx = np.mgrid[0:size, 0:size]
    img = (
        base[None, None, :]
        + 60 * np.sin((xx + rng.integers(size)) / 4.0)[..., None]
        + 40 * np.cos((yy + rng.integers(size)) / 5.0)[..., None]
    )
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _columns(names: str) -> dict[str, list]:
    return {k: [] for k in names.split()}


def _append(table: dict[str, list], *values) -> None:
    for key, val in zip(table, values, strict=True):
        table[key].append(val)


def write_dataset(path: str, rng, classes: list[str], per_class: int, splits) -> dict:
    """``per_class`` 32x32 PNGs per class in each split (a pool of 512 reused) at ``path``;
    returns the columns written (``example_id``, ``label``, ... and the PNG pool)."""
    pngs = [_png(rng, 32) for _ in range(512)]
    rows = _columns("example_id split label image color")
    for split in splits:
        for c in range(len(classes)):
            for i in range(per_class):
                png = pngs[(c * per_class + i) % len(pngs)]
                _append(rows, f"{split}-{c}-{i}", split, c, png, COLORS[i % len(COLORS)])
    data = pa.table(
        {
            **rows,
            "label": pa.array(rows["label"], pa.int32()),
            "image": pa.array(rows["image"], pa.binary()),
        }
    )
    pq.write_table(data.replace_schema_metadata({"classes": json.dumps(classes)}), path)
    return {**rows, "pngs": pngs}


def write_predictions(run: str, rng, models: list[str], skill: dict, ids, labels, n_classes: int):
    for m in models:
        correct = rng.random(len(ids)) < skill[m]
        pred = np.where(correct, labels, (labels + 1) % n_classes)
        t = pa.table(
            {
                "example_id": ids,
                "label": labels.astype(np.int32),
                "pred": pred.astype(np.int32),
                "confidence": rng.random(len(ids)).astype(np.float32),
                "correct": correct,
            }
        )
        os.makedirs(f"{run}/predictions/model={m}", exist_ok=True)
        pq.write_table(t, f"{run}/predictions/model={m}/part-00000.parquet")


def write_accuracy(run: str, rng, models, skill, classes, per_class: int, n: int) -> None:
    acc = _columns(
        "model class attribute value n n_correct class_accuracy accuracy ci_low ci_high gap"
    )

    def add(m, c, a, v, n, a_, ca):
        k = int(round(a_ * n))
        _append(acc, m, c, a, v, n, k, ca, a_, max(0, a_ - 0.1), min(1, a_ + 0.1), a_ - ca)

    for m in models:
        add(m, "*", "*", "*", n // 2, skill[m], skill[m])
        for c in classes:
            ca = float(np.clip(skill[m] + rng.normal(0, 0.08), 0, 1))
            add(m, c, "*", "*", per_class, ca, ca)
            for v in COLORS:
                a_ = float(np.clip(ca + rng.normal(0, 0.1), 0, 1))
                add(m, c, "color", v, per_class // len(COLORS), a_, ca)
    pq.write_table(pa.table(acc), f"{run}/accuracy.parquet")


def write_overlap(run: str, rng, models, fam, n: int) -> None:
    ov = _columns(
        "model_a model_b jaccard p_b_fails_given_a shared_fraction error_consistency "
        "ci_low ci_high n_fail_a n_fail_b n_both n_examples"
    )
    for a in models:
        for b in models:
            if a != b:
                j = 0.5 if fam[a] == fam[b] else 0.35
                j = float(np.clip(j + rng.normal(0, 0.04), 0, 1))
                _append(ov, a, b, j, j + 0.1, j + 0.1, j - 0.05, j - 0.1, j, 100, 100, 50, n // 2)
    pq.write_table(pa.table(ov), f"{run}/overlap.parquet")


def write_clusters(run: str, models, fam, cluster_of) -> None:
    clusters = pa.array([cluster_of[m] for m in models], pa.int32())
    t = pa.table({"model": models, "family": [fam[m] for m in models], "cluster": clusters})
    pq.write_table(t, f"{run}/clusters.parquet")


def _captions(caps: dict, subs: dict, s: str, name: str) -> None:
    for pol in ("hard", "easy"):
        for r in range(1, 6):
            where = "on grass" if pol == "hard" else ""
            cap = f"a photo of a {COLORS[r % 4]} {name} {where}".strip()
            _append(caps, s, name, 0, cap + f" #{r}", "grammar", 0.1 * r, r, pol)
            _append(subs, s, name, cap + f" #{r}", pol, 50, 0.5, 0.7, 0.4, 0.6, 50, 1, -0.2)


def write_directions(run: str, rng, scopes: list[str], classes: list[str], dim: int) -> dict:
    """Every scope x class has mode 0; a third are significant (status ok), with captions
    and nearest-image checks. Returns the captions' columns."""
    mean = rng.normal(0, 1, dim).astype(np.float32).tolist()
    scale = np.ones(dim, np.float32).tolist()
    d = _columns(
        "scope class class_index mode status cv_score ci_low ci_high p_value n_errors "
        "n_correct C direction weight_norm intercept mean scale q_value"
    )
    caps = _columns("scope class mode caption source score rank polarity")
    subs = _columns(
        "scope class caption polarity k accuracy_on_nearest class_accuracy ci_low ci_high "
        "n n_models delta"
    )
    for s in scopes:
        ok_classes = rng.random(len(classes)) < 1 / 3
        for c, name in enumerate(classes):
            ok = bool(ok_classes[c])
            v = rng.normal(0, 1, dim)
            cv = float(rng.uniform(0.6, 0.9) if ok else rng.uniform(0.45, 0.6))
            status, p, q = ("ok", 0.01, 0.02) if ok else ("not_significant", 0.4, 0.6)
            unit = (v / np.linalg.norm(v)).astype(np.float32).tolist()
            row = (s, name, c, 0, status, cv, cv - 0.05, cv + 0.05, p, 20, 80, 1.0, unit)
            _append(d, *row, 3.0, -1.0, mean, scale, q)
            if ok:
                _captions(caps, subs, s, name)
    pq.write_table(pa.table(d), f"{run}/directions.parquet")
    pq.write_table(pa.table(caps), f"{run}/captions.parquet")
    pq.write_table(pa.table(subs), f"{run}/subpopulations.parquet")
    return caps


def write_embeddings(run: str, rng, ids, dim: int) -> None:
    E = rng.normal(0, 1, (len(ids), dim)).astype(np.float32)
    os.makedirs(f"{run}/embeddings/embedder=world", exist_ok=True)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(E.ravel()), dim)
    pq.write_table(
        pa.table({"example_id": ids, "image_hash": ids, "vector": vec}),
        f"{run}/embeddings/embedder=world/part-00000.parquet",
    )


def _set_rows(set_id: str, hard: list[str], pngs: list[bytes]) -> list[dict]:
    return [
        {
            "image_id": f"{set_id}-{i:05d}",
            "png": pngs[i % len(pngs)],
            "prompt": p,
            "seed": i,
            "generator": "bench",
            "params": "{}",
            "prompt_index": j,
            "image_index": i % 3,
        }
        for j, p in enumerate(hard)
        for i in range(3 * j, 3 * j + 3)
    ]


def write_sets(run: str, clusters: list[int], caps: dict, pngs: list[bytes]) -> None:
    """One set per cluster: three images for each of its top hard captions."""
    sets = []
    for c in clusters:
        set_id = f"cluster-{c}-hard-bench"
        keys = ("scope", "caption", "polarity", "rank")
        hard = sorted(
            {
                cap
                for s_, cap, pol, r in zip(*(caps[k] for k in keys), strict=True)
                if s_ == f"cluster:{c}" and pol == "hard" and r == 1
            }
        )[:100]
        rows = _set_rows(set_id, hard, pngs)
        os.makedirs(f"{run}/synthetic/{set_id}", exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), f"{run}/synthetic/{set_id}/part-00000.parquet")
        scope = f"cluster:{c}"
        n, gen = len(rows), "bench"
        sets.append(
            {"scope": scope, "set_id": set_id, "captions": hard, "n_images": n, "generator": gen}
        )
    pq.write_table(pa.Table.from_pylist(sets), f"{run}/synthetic_sets.parquet")


def write_errors(run: str, model: str) -> None:
    errors = {
        "stage": ["sweep"],
        "item": [model],
        "reason": ["example: a model that failed to load"],
        "time": ["2026-01-01T00:00:00+00:00"],
    }
    pq.write_table(pa.table(errors), f"{run}/errors.parquet")


def write_manifest(run: str, config, classes, models, fam, n: int) -> None:
    names = ["train", "sweep", "accuracy", "stats", "embed", "directions", "generate"]
    stages = {
        s: {"status": "done", "line": f"{s}: synthetic", "seconds": 1.0}
        | {"time": f"2026-01-01T00:00:0{i}+00:00"}
        for i, s in enumerate(names)
    }
    path = config.data.path
    manifest = {
        "config": config.model_dump(),
        "data": {"n": n, "classes": classes, "source": path, "world_dir": None},
        "zoo": {"name": "bench", "models": models, "families": fam},
        "embeddings": {"world": {"path": "embeddings/embedder=world/part-00000.parquet"}},
        "stages": stages,
        "status": "done",
        "seconds": 1.0,
        "updated": "2026-01-01T00:00:00+00:00",
    }
    with open(f"{run}/manifest.json", "w") as f:
        json.dump(manifest, f)


def make_run(
    root: str, n_models: int, n_classes: int, per_class: int, families: int, dim: int, seed: int = 0
) -> str:
    """Write a synthetic run directory of the given shape under ``root``; returns its path."""
    from audit.pipeline.config import AuditConfig

    rng = np.random.default_rng(seed)
    run = os.path.join(root, "run")
    os.makedirs(run, exist_ok=True)
    data_path = os.path.join(root, "data.parquet")
    config = AuditConfig(data={"path": data_path})
    classes = [f"class-{c:04d}" for c in range(n_classes)]
    splits = (config.data.split, config.data.eval_split)
    rows = write_dataset(data_path, rng, classes, per_class, splits)
    ids, labels = np.asarray(rows["example_id"]), np.asarray(rows["label"])
    per_family = n_models // families + 1
    models = [f"arch{f}-v{j}" for f in range(families) for j in range(per_family)][:n_models]
    fam = {m: m.split("-")[0] for m in models}
    cluster_of = {m: int(m.split("-")[0][4:]) for m in models}
    skill = {m: rng.uniform(0.6, 0.9) for m in models}
    write_predictions(run, rng, models, skill, ids, labels, n_classes)
    write_accuracy(run, rng, models, skill, classes, per_class, len(ids))
    write_overlap(run, rng, models, fam, len(ids))
    write_clusters(run, models, fam, cluster_of)
    clusters = sorted(set(cluster_of.values()))
    scopes = models + [f"cluster:{c}" for c in clusters]
    caps = write_directions(run, rng, scopes, classes, dim)
    write_embeddings(run, rng, ids, dim)
    write_sets(run, clusters, caps, rows["pngs"])
    write_errors(run, models[0])
    write_manifest(run, config, classes, models, fam, len(ids))
    return run
