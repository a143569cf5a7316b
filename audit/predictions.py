"""Predictions tables and per-group accuracy (pure functions over arrays/Arrow tables)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa

PREDICTION_SCHEMA = pa.schema(
    [
        ("example_id", pa.string()),
        ("label", pa.int32()),
        ("pred", pa.int32()),
        ("confidence", pa.float32()),
        ("correct", pa.bool_()),
        ("top5", pa.list_(pa.int32())),
    ]
)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predictions_table(
    example_ids: np.ndarray,
    labels: np.ndarray,
    logits: np.ndarray,
    label_map: np.ndarray | None = None,
) -> pa.Table:
    """Predictions of one model: ``logits [N, C]`` against ``labels [N]``.

    ``label_map`` (optional, ``[C]`` int) maps the model's output index to the dataset's
    class index (-1 for outputs that are no dataset class), e.g. ImageNet logits on a
    dataset of a subset of ImageNet classes.
    """
    logits = np.asarray(logits, np.float32)
    if len(example_ids) != len(logits) or len(labels) != len(logits):
        raise ValueError(
            f"example_ids ({len(example_ids)}), labels ({len(labels)}) and logits ({len(logits)}) differ in length"
        )
    probs = softmax(logits)
    k = min(5, logits.shape[1]) if logits.ndim == 2 and logits.shape[1] else 0
    top = np.argsort(-logits, axis=1)[:, :k] if k else np.zeros((len(logits), 0), int)
    pred = top[:, 0] if k else np.full(len(logits), -1)
    conf = probs[np.arange(len(logits)), pred] if k else np.zeros(len(logits))
    if label_map is not None:
        label_map = np.asarray(label_map)
        pred = label_map[pred]
        top = label_map[top]
    labels = np.asarray(labels, np.int64)
    return pa.table(
        {
            "example_id": pa.array(np.asarray(example_ids).astype(str), pa.string()),
            "label": pa.array(labels.astype(np.int32)),
            "pred": pa.array(pred.astype(np.int32)),
            "confidence": pa.array(conf.astype(np.float32)),
            "correct": pa.array(pred == labels),
            "top5": pa.array([list(map(int, r)) for r in top], pa.list_(pa.int32())),
        },
        schema=PREDICTION_SCHEMA,
    )


def wilson_interval(k: np.ndarray, n: np.ndarray, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for k successes in n trials (vectorised; n=0 gives (0, 1))."""
    k = np.asarray(k, float)
    n = np.asarray(n, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(n > 0, k / np.maximum(n, 1), 0.0)
        denom = 1 + z**2 / np.maximum(n, 1)
        centre = (p + z**2 / (2 * np.maximum(n, 1))) / denom
        half = (
            z * np.sqrt(p * (1 - p) / np.maximum(n, 1) + z**2 / (4 * np.maximum(n, 1) ** 2)) / denom
        )
    lo = np.where(n > 0, np.clip(centre - half, 0, 1), 0.0)
    hi = np.where(n > 0, np.clip(centre + half, 0, 1), 1.0)
    return lo, hi


def effective_counts(
    corr: Mapping[str, np.ndarray], ms: list[str], rows: np.ndarray
) -> tuple[float, float]:
    """``(successes, trials)`` for an interval of the accuracy on ``rows`` pooled over the
    models ``ms``. The images are what was sampled: the models of a cluster share their
    failures, so counting every (model, image) pair as a trial would narrow the interval by up
    to the square root of the models (and name chance subpopulations of a cluster). The
    trials are the images times the models over Kish's design effect, estimated from the
    spread of the per-image accuracies and kept between the images (the models always agree)
    and the pairs (they never do); one model: its images and hits, exactly."""
    rows = np.asarray(rows, int)
    if not len(rows) or not ms:
        return 0.0, 0.0
    per_image = np.mean([np.asarray(corr[m])[rows] for m in ms], axis=0, dtype=float)
    n_img, p = len(rows), float(per_image.mean())
    if len(ms) == 1 or n_img < 2:
        n_eff = float(n_img)
    else:
        spread = float(per_image.var(ddof=1))
        pairs = float(n_img * len(ms))
        n_eff = pairs if spread <= 0 else min(max(n_img * p * (1 - p) / spread, n_img), pairs)
    return p * n_eff, n_eff


def group_accuracy(
    model: str,
    correct: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    attributes: dict[str, np.ndarray],
) -> pa.Table:
    """Accuracy of one model per class and per (class, attribute, value).

    Rows: ``attribute == "*"`` for the whole class, ``class == "*"`` for the whole split.
    Columns: model, class, attribute, value, n, accuracy, ci_low, ci_high, class_accuracy, gap.
    """
    correct = np.asarray(correct, bool)
    labels = np.asarray(labels)
    rows = {
        k: [] for k in ("model", "class", "attribute", "value", "n", "n_correct", "class_accuracy")
    }

    def add(cls, attr, value, n, n_correct, cls_acc):
        row = (model, cls, attr, value, int(n), int(n_correct), cls_acc)
        for key, v in zip(rows, row, strict=True):
            rows[key].append(v)

    overall = float(correct.mean()) if len(correct) else float("nan")
    add("*", "*", "*", len(correct), correct.sum(), overall)
    # one pass over the rows per class (its slice of the rows sorted by label), attribute
    # columns as strings once: linear in examples (a mask over every row per class and value
    # made it examples x classes: 59 s for 4 models at ImageNet shape)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(len(classes) + 1), side="left")
    attrs = {a: np.asarray(v).astype(str) for a, v in attributes.items()}
    for ci, cname in enumerate(classes):
        idx = order[bounds[ci] : bounds[ci + 1]]
        if not len(idx):
            continue
        hits = correct[idx]
        acc_c = float(hits.mean())
        add(cname, "*", "*", len(idx), hits.sum(), acc_c)
        for attr, values in attrs.items():
            vals, inv = np.unique(values[idx], return_inverse=True)
            n_v = np.bincount(inv, minlength=len(vals))
            k_v = np.bincount(inv, weights=hits, minlength=len(vals))
            for v, n, k in zip(vals, n_v, k_v, strict=True):
                if v != "":
                    add(cname, attr, str(v), n, round(k), acc_c)
    n = np.asarray(rows["n"])
    k = np.asarray(rows["n_correct"])
    acc = np.where(n > 0, k / np.maximum(n, 1), np.nan)
    lo, hi = wilson_interval(k, n)
    t = pa.table(rows)
    return (
        t.append_column("accuracy", pa.array(acc, pa.float64()))
        .append_column("ci_low", pa.array(lo, pa.float64()))
        .append_column("ci_high", pa.array(hi, pa.float64()))
        .append_column(
            "gap", pa.array(acc - np.asarray(rows["class_accuracy"], float), pa.float64())
        )
    )
