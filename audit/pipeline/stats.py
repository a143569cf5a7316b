"""The accuracy and failure-statistics stages: pure work over the stored predictions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from audit.data.table import ImageTable
from audit.evaluate import align_ids, load_predictions
from audit.store import RunStore

#: attribute columns reported per group (a world's ground truth, or any attribute column)
SKIP_ATTRIBUTES = {"item", "caption"}
#: models x examples from which the stats stage counts pairs through the injected executor
PARALLEL_COUNTS_AT = 200 * 1_000_000


def accuracy_tables(store: RunStore, data: ImageTable, models: list[str]) -> pa.Table:
    """Per model, class and attribute-value accuracy on ``data`` from the stored predictions."""
    from audit.predictions import group_accuracy

    attrs = [a for a in data.attributes if a not in SKIP_ATTRIBUTES]
    tables = []
    for name, preds in load_predictions(store, models).items():
        idx = align_ids(preds["example_id"].to_numpy(zero_copy_only=False), data.example_ids)
        rows = np.flatnonzero(idx >= 0)  # examples the model has a prediction for (decoded ones)
        correct = preds["correct"].to_numpy(zero_copy_only=False)[idx[rows]]
        tables.append(
            group_accuracy(
                name,
                correct,
                data.labels[rows],
                data.classes,
                {a: data.column(a)[rows] for a in attrs},
            )
        )
    return pa.concat_tables(tables)


def accuracy_stage(store: RunStore, inputs, cfg) -> str:
    """Stage: ``accuracy.parquet`` on the fit split. Returns the stage's line."""
    from audit.pipeline.sweep import swept_models

    models = swept_models(store, inputs.zoo)
    fit = inputs.data.split(inputs.fit_split)
    acc = accuracy_tables(store, fit, models)
    store.write_table("accuracy.parquet", acc)
    overall = [r["accuracy"] for r in acc.to_pylist() if r["class"] == "*"]
    return f"{len(models)} models on {inputs.fit_split}: accuracy {min(overall):.1%} to {max(overall):.1%}"


def stats_stage(store: RunStore, inputs, cfg) -> str:
    """Stage: failure matrix, overlap and clustering of the models (``[stats]`` section)."""
    from audit.failures import (
        cluster_models,
        clusters_table,
        failure_matrix,
        family_similarity,
        overlap_statistics,
        overlap_table,
        similarity_matrix,
    )
    from audit.pipeline.sweep import swept_models

    names = swept_models(store, inputs.zoo)
    if len(names) < 2:
        raise ValueError(
            f"failure overlap needs predictions of at least 2 models; the run has {names}"
        )
    preds = load_predictions(store, names)
    # the fit split's examples that every model predicted (an undecodable image has no prediction)
    common = set.intersection(*(set(t["example_id"].to_pylist()) for t in preds.values()))
    fm = failure_matrix(preds, example_ids=[e for e in inputs.fit_ids() if e in common])
    # a zoo-scale matrix (1,000 models x 1,000,000 examples) counts its blocks in parallel; a small one
    # is quicker in this process than the executor's round trip
    big = fm.n_models * fm.n_examples >= PARALLEL_COUNTS_AT
    stats = overlap_statistics(
        fm,
        n_boot=cfg.n_boot,
        ci=cfg.ci,
        seed=cfg.seed,
        executor=inputs.services.executor if big else None,
    )
    sim = similarity_matrix(stats, cfg.similarity)
    families = inputs.families
    n_clusters = cfg.n_clusters
    if cfg.threshold is None and n_clusters is None:
        n_clusters = max(1, min(len(names), len({families.get(m, "") for m in names})))
    labels = cluster_models(sim, threshold=cfg.threshold, n_clusters=n_clusters, method=cfg.method)
    store.write_table("overlap.parquet", overlap_table(stats))
    store.write_table("clusters.parquet", clusters_table(names, families, labels))
    store.write_table("family_similarity.parquet", family_similarity(sim, names, families))
    return (
        f"{len(names)} models x {fm.n_examples:,} examples: {len(names) * (len(names) - 1)} ordered pairs, "
        f"{int(labels.max() + 1) if len(labels) else 0} clusters by {cfg.similarity}"
    )
