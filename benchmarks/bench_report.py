"""How long the HTML report takes, and how large it is, for a run of 40 models x 1,000 classes.

Builds a synthetic run directory of that shape (a Parquet dataset of small PNGs, predictions,
accuracy per class and attribute value, overlap, clusters, directions with captions and
nearest-image checks for a share of the classes, embeddings, synthetic sets), then times
``write_report`` on it: a first build and a rebuild (the rebuild replaces the old pages).
The targets are under 60 s on 2 cores and under 50 MB.

    python benchmarks/bench_report.py                       # 40 x 1,000
    python benchmarks/bench_report.py --models 12 --classes 100 --keep /tmp/bench-run
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


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


def make_run(
    root: str, n_models: int, n_classes: int, per_class: int, families: int, dim: int, seed: int = 0
) -> str:
    """Write a synthetic run directory of the given shape under ``root``; returns its path."""
    rng = np.random.default_rng(seed)
    run = os.path.join(root, "run")
    os.makedirs(run, exist_ok=True)
    classes = [f"class-{c:04d}" for c in range(n_classes)]
    colors = ["red", "green", "blue", "yellow"]
    # the dataset: debug and test, per_class images per class each, 32x32 PNGs (a pool of 512 reused)
    pngs = [_png(rng, 32) for _ in range(512)]
    rows = {"example_id": [], "split": [], "label": [], "image": [], "color": []}
    for split in ("debug", "test"):
        for c in range(n_classes):
            for i in range(per_class):
                rows["example_id"].append(f"{split}-{c}-{i}")
                rows["split"].append(split)
                rows["label"].append(c)
                rows["image"].append(pngs[(c * per_class + i) % len(pngs)])
                rows["color"].append(colors[i % len(colors)])
    data = pa.table(
        {
            **rows,
            "label": pa.array(rows["label"], pa.int32()),
            "image": pa.array(rows["image"], pa.binary()),
        }
    )
    data = data.replace_schema_metadata({"classes": json.dumps(classes)})
    data_path = os.path.join(root, "data.parquet")
    pq.write_table(data, data_path)
    ids = np.asarray(rows["example_id"])
    labels = np.asarray(rows["label"])

    models = [f"arch{f}-v{j}" for f in range(families) for j in range(n_models // families + 1)][
        :n_models
    ]
    fam = {m: m.split("-")[0] for m in models}
    cluster_of = {m: int(m.split("-")[0][4:]) for m in models}
    skill = {m: rng.uniform(0.6, 0.9) for m in models}
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

    acc = {
        k: []
        for k in (
            "model",
            "class",
            "attribute",
            "value",
            "n",
            "n_correct",
            "class_accuracy",
            "accuracy",
            "ci_low",
            "ci_high",
            "gap",
        )
    }

    def add(m, c, a, v, n, a_):
        k = int(round(a_ * n))
        for key, val in zip(
            acc,
            (m, c, a, v, n, k, ca, a_, max(0, a_ - 0.1), min(1, a_ + 0.1), a_ - ca),
            strict=True,
        ):
            acc[key].append(val)

    for m in models:
        ca = skill[m]
        add(m, "*", "*", "*", len(ids) // 2, skill[m])
        for c in classes:
            ca = float(np.clip(skill[m] + rng.normal(0, 0.08), 0, 1))
            add(m, c, "*", "*", per_class, ca)
            for v in colors:
                add(
                    m,
                    c,
                    "color",
                    v,
                    per_class // len(colors),
                    float(np.clip(ca + rng.normal(0, 0.1), 0, 1)),
                )
    pq.write_table(pa.table(acc), f"{run}/accuracy.parquet")

    ov = {
        k: []
        for k in (
            "model_a",
            "model_b",
            "jaccard",
            "p_b_fails_given_a",
            "shared_fraction",
            "error_consistency",
            "ci_low",
            "ci_high",
            "n_fail_a",
            "n_fail_b",
            "n_both",
            "n_examples",
        )
    }
    for a in models:
        for b in models:
            if a != b:
                j = 0.5 if fam[a] == fam[b] else 0.35
                j = float(np.clip(j + rng.normal(0, 0.04), 0, 1))
                for key, val in zip(
                    ov,
                    (a, b, j, j + 0.1, j + 0.1, j - 0.05, j - 0.1, j, 100, 100, 50, len(ids) // 2),
                    strict=True,
                ):
                    ov[key].append(val)
    pq.write_table(pa.table(ov), f"{run}/overlap.parquet")
    pq.write_table(
        pa.table(
            {
                "model": models,
                "family": [fam[m] for m in models],
                "cluster": pa.array([cluster_of[m] for m in models], pa.int32()),
            }
        ),
        f"{run}/clusters.parquet",
    )

    # directions: every scope x class has mode 0; a third are significant (status ok), with captions
    scopes = models + [f"cluster:{c}" for c in sorted(set(cluster_of.values()))]
    mean = rng.normal(0, 1, dim).astype(np.float32).tolist()
    scale = np.ones(dim, np.float32).tolist()
    d = {
        k: []
        for k in (
            "scope",
            "class",
            "class_index",
            "mode",
            "status",
            "cv_score",
            "ci_low",
            "ci_high",
            "p_value",
            "n_errors",
            "n_correct",
            "C",
            "direction",
            "weight_norm",
            "intercept",
            "mean",
            "scale",
            "q_value",
        )
    }
    caps = {
        k: [] for k in ("scope", "class", "mode", "caption", "source", "score", "rank", "polarity")
    }
    subs = {
        k: []
        for k in (
            "scope",
            "class",
            "caption",
            "polarity",
            "k",
            "accuracy_on_nearest",
            "class_accuracy",
            "ci_low",
            "ci_high",
            "n",
            "n_models",
            "delta",
        )
    }
    for s in scopes:
        ok_classes = rng.random(n_classes) < 1 / 3
        for c, name in enumerate(classes):
            ok = bool(ok_classes[c])
            v = rng.normal(0, 1, dim)
            cv = float(rng.uniform(0.6, 0.9) if ok else rng.uniform(0.45, 0.6))
            for key, val in zip(
                d,
                (
                    s,
                    name,
                    c,
                    0,
                    "ok" if ok else "not_significant",
                    cv,
                    cv - 0.05,
                    cv + 0.05,
                    0.01 if ok else 0.4,
                    20,
                    80,
                    1.0,
                    (v / np.linalg.norm(v)).astype(np.float32).tolist(),
                    3.0,
                    -1.0,
                    mean,
                    scale,
                    0.02 if ok else 0.6,
                ),
                strict=True,
            ):
                d[key].append(val)
            if ok:
                for pol in ("hard", "easy"):
                    for r in range(1, 6):
                        cap = f"a photo of a {colors[r % 4]} {name} {'on grass' if pol == 'hard' else ''}".strip()
                        for key, val in zip(
                            caps,
                            (s, name, 0, cap + f" #{r}", "grammar", 0.1 * r, r, pol),
                            strict=True,
                        ):
                            caps[key].append(val)
                        for key, val in zip(
                            subs,
                            (s, name, cap + f" #{r}", pol, 50, 0.5, 0.7, 0.4, 0.6, 50, 1, -0.2),
                            strict=True,
                        ):
                            subs[key].append(val)
    dt = pa.table({k: v for k, v in d.items()})
    pq.write_table(dt, f"{run}/directions.parquet")
    pq.write_table(pa.table(caps), f"{run}/captions.parquet")
    pq.write_table(pa.table(subs), f"{run}/subpopulations.parquet")

    E = rng.normal(0, 1, (len(ids), dim)).astype(np.float32)
    os.makedirs(f"{run}/embeddings/embedder=world", exist_ok=True)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(E.ravel()), dim)
    pq.write_table(
        pa.table({"example_id": ids, "image_hash": ids, "vector": vec}),
        f"{run}/embeddings/embedder=world/part-00000.parquet",
    )

    sets = []
    for c in sorted(set(cluster_of.values())):
        set_id = f"cluster-{c}-hard-bench"
        hard = sorted(
            {
                cap
                for s_, cap, pol, r in zip(
                    caps["scope"], caps["caption"], caps["polarity"], caps["rank"], strict=True
                )
                if s_ == f"cluster:{c}" and pol == "hard" and r == 1
            }
        )[:100]
        rows = [
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
        os.makedirs(f"{run}/synthetic/{set_id}", exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), f"{run}/synthetic/{set_id}/part-00000.parquet")
        sets.append(
            {
                "scope": f"cluster:{c}",
                "set_id": set_id,
                "captions": hard,
                "n_images": len(rows),
                "generator": "bench",
            }
        )
    pq.write_table(pa.Table.from_pylist(sets), f"{run}/synthetic_sets.parquet")
    pq.write_table(
        pa.table(
            {
                "stage": ["sweep"],
                "item": [models[0]],
                "reason": ["example: a model that failed to load"],
                "time": ["2026-01-01T00:00:00+00:00"],
            }
        ),
        f"{run}/errors.parquet",
    )

    stages = {
        s: {
            "status": "done",
            "line": f"{s}: synthetic",
            "seconds": 1.0,
            "time": f"2026-01-01T00:00:0{i}+00:00",
        }
        for i, s in enumerate(
            ["train", "sweep", "accuracy", "stats", "embed", "directions", "generate"]
        )
    }
    manifest = {
        "config": {
            "data": {"path": data_path, "split": "debug", "eval_split": "test"},
            "stats": {"similarity": "jaccard", "method": "average"},
            "directions": {"embedder": "world", "k": 50},
        },
        "data": {"n": len(ids), "classes": classes, "source": data_path, "world_dir": None},
        "zoo": {"name": "bench", "models": models, "families": fam},
        "embeddings": {"world": {"path": "embeddings/embedder=world/part-00000.parquet"}},
        "stages": stages,
        "status": "done",
        "seconds": 1.0,
        "updated": "2026-01-01T00:00:00+00:00",
    }
    with open(f"{run}/manifest.json", "w") as f:
        json.dump(manifest, f)
    return run


def tree_bytes(path: str) -> tuple[int, int, int]:
    """``(files, bytes, bytes allocated on disk)`` under ``path``."""
    n = size = disk = 0
    for d, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(d, f))
            n, size, disk = n + 1, size + st.st_size, disk + st.st_blocks * 512
    return n, size, disk


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=40)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument(
        "--per-class", type=int, default=10, help="images per class in each of debug and test"
    )
    p.add_argument("--families", type=int, default=8)
    p.add_argument("--dim", type=int, default=128, help="embedding dimension")
    p.add_argument(
        "--keep",
        default=None,
        help="build the run here and keep it (default: a temporary directory)",
    )
    a = p.parse_args(argv)

    from audit.report import write_report
    from audit.store import RunStore

    root = a.keep or tempfile.mkdtemp(prefix="bench-report-")
    try:
        t0 = time.perf_counter()
        run = make_run(root, a.models, a.classes, a.per_class, a.families, a.dim)
        made = time.perf_counter() - t0
        _, run_size, _ = tree_bytes(run)
        print(
            f"machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}"
        )
        print(
            f"synthetic run: {a.models} models x {a.classes:,} classes, {2 * a.classes * a.per_class:,} images, "
            f"{run_size / 1e6:.0f} MB, made in {made:.1f}s"
        )
        out = os.path.join(root, "report")
        for what in ("first build", "rebuild"):
            res = write_report(RunStore(run), out)
            n_files, size, disk = tree_bytes(out)
            ok = res.seconds < 60 and disk < 50e6
            print(
                f"{what:12s} {res.seconds:6.1f}s  {size / 1e6:6.1f} MB in {n_files:,} files ({disk / 1e6:.1f} MB on disk) "
                f"({res.n_models} model pages, {res.n_clusters} cluster pages)  "
                f"{'within' if ok else 'OVER'} the limits (60 s, 50 MB)"
            )
        if a.keep:
            print(f"report: {res.index}")
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
