"""The classify stage: the zoo on the run's generated images, once.

Every image of the synthetic sets (deduplicated by prompt and seed, labelled with the class
its caption names) goes through the injected sweeper (Ray shard actors in production), and
each model's predictions and penultimate features are stored beside the real ones
(:mod:`audit.mitigate.synthetic`). Head retraining (``mitigate``) and confirmation by
generation (``confirm``) read them there, so neither runs a model again.
"""

from __future__ import annotations

import logging

import numpy as np

from audit.mitigate.synthetic import (
    IMAGES,
    decode_pngs,
    index_sets,
    syn_feature_path,
    syn_prediction_path,
)
from audit.store import RunStore

log = logging.getLogger(__name__)


def caption_classes(store: RunStore, data) -> dict[str, str]:
    """``{caption: class name}`` for every caption of the run (ranked, named, the named modes'
    comparison captions) and the probe set's counterfactuals (named after the caption they
    swap a word of)."""
    from audit.pipeline.confirm import probe_captions
    from audit.pipeline.name import load_named, pairs_of

    out = {r["caption"]: r["class"] for r in store.read_table("captions.parquet").to_pylist()}
    pairs = pairs_of(load_named(store))
    for (_, cls, _), (caption, easy) in pairs.items():
        out.setdefault(caption, cls)
        if easy:  # a class's reference caption is no ranked caption
            out.setdefault(easy, cls)
    by_hard = {h: cls for (_, cls, _), (h, _) in pairs.items()}
    for hard, cf in probe_captions(pairs, data).items():
        if hard in by_hard:
            out.setdefault(cf, by_hard[hard])
    return out


class _Store:
    """A sweep sink that stores each model's outputs on the generated images."""

    def __init__(self, store: RunStore, ids: np.ndarray, labels: np.ndarray):
        self.store, self.ids, self.labels = store, ids, labels
        self.done: list[str] = []
        self.failed: dict[str, str] = {}

    def model_done(self, name, logits, features, shard):
        from audit.evaluate import features_table
        from audit.predictions import predictions_table

        self.store.write_table(
            syn_prediction_path(name), predictions_table(self.ids, self.labels, logits)
        )
        self.store.write_table(syn_feature_path(name), features_table(self.ids, features))
        self.done.append(name)

    def model_failed(self, name, reason):
        self.failed[name] = reason


def _labels(store: RunStore, inputs) -> dict[str, int]:
    classes = inputs.data.classes
    return {
        p: classes.index(c) for p, c in caption_classes(store, inputs.data).items() if c in classes
    }


def sweep_images(
    out: RunStore, inputs, specs, images: np.ndarray, ids: np.ndarray, labels: np.ndarray
) -> _Store:
    """``specs`` (zoo members) over generated ``images``; their outputs stored in ``out``."""
    from audit.pipeline.sweep import SweepJob

    classes, batch = list(inputs.data.classes), inputs.config.ray.batch_size
    job = SweepJob(images, ids, labels, classes, specs, inputs.weights, batch, with_features=True)
    sink = _Store(out, ids, labels)
    inputs.services.sweeper.run(job, sink)
    return sink


def labelled_images(store: RunStore, inputs) -> tuple:
    """``(index, PNG bytes)`` of the run's generated images whose prompt names a class of the
    run (the rows of ``synthetic_images.parquet``, in its order)."""
    sets = store.read_table("synthetic_sets.parquet")
    index, pngs = index_sets(store, sets, _labels(store, inputs))
    unknown = sorted(
        {p for p, y in zip(index.prompts.tolist(), index.labels.tolist(), strict=True) if y < 0}
    )
    if unknown:  # a set made elsewhere: its images cannot be labelled
        log.warning(
            "%d generated prompt(s) name no class of the run and are left out: %s",
            len(unknown),
            unknown[:3],
        )
    keep = np.flatnonzero(index.labels >= 0)
    return index.take(keep), [pngs[i] for i in keep]


def classify_stage(store: RunStore, inputs, cfg) -> str:
    """Stage: the zoo's predictions and features on every labelled generated image."""
    from audit.pipeline.sweep import swept_models

    index, pngs = labelled_images(store, inputs)
    store.write_table(IMAGES, index.table())
    if not len(pngs):
        return "no labelled generated image"
    specs = [m for m in inputs.zoo if m.name in set(swept_models(store, inputs.zoo))]
    sink = sweep_images(store, inputs, specs, decode_pngs(pngs), index.example_ids, index.labels)
    rows = (
        {"stage": "classify", "item": f"model {m}", "reason": f"on the generated images: {r}"}
        for m, r in sink.failed.items()
    )
    store.record_errors(rows)
    if not sink.done:
        first = next(iter(sink.failed.values()), "no model ran").splitlines()[0]
        raise RuntimeError(
            f"no model could classify the generated images ({len(sink.failed)} failed; first: {first})"
        )
    line = f"{len(sink.done)} models x {len(pngs):,} generated images"
    return line + (f"; {len(sink.failed)} failed (errors.parquet)" if sink.failed else "")
