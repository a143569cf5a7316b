"""The embed and directions stages.

- ``embed``: the joint image/text embedder (for ``world``, the world encoder is trained
  here, explicitly, and cached by content hash) embeds the train, fit and eval splits once
  into ``embeddings/``; every model shares them.
- ``directions``: per model (in parallel through the executor) and per cluster of models,
  failure directions on the fit split; captions named by the grammar (+ LLM); each hard
  and easy caption checked on its nearest eval images; on a world, the planted truth.
  Writes ``directions.parquet``, ``direction_similarity.parquet``, ``captions.parquet``,
  ``subpopulations.parquet`` and (with a ``group`` column) ``planted.parquet``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from audit.evaluate import align_ids
from audit.store import RunStore

log = logging.getLogger(__name__)


def embedder_for(inputs, train: bool):
    """The configured embedder; ``world`` trains (or loads from the cache) on the data's train
    split: its ``caption`` column, else captions composed from the ``[data]`` attributes;
    with neither, an image-only space (a zoo member's features: failure modes are found and
    shown, but cannot be named); ``features:MODEL`` asks for that space."""
    from audit.embed.features import image_only_embedder

    name = inputs.config.directions.embedder
    if name.startswith("features") or (name == "world" and not has_captions(inputs)):
        if name == "world":
            log.warning(
                "no caption or attribute column, and no CLIP embedder: failure modes are found in a "
                "zoo member's own features (an image-only space) and reported unnamed; set "
                "[directions] embedder = 'open_clip:ARCH:PRETRAINED' to name them"
            )
        return image_only_embedder(inputs, name if name != "world" else None), None
    return run_embedder(inputs.config, inputs.data, train=train, progress=inputs.services.progress)


def has_captions(inputs) -> bool:
    """Whether the world encoder has text to train on: a caption column or caption attributes."""
    from audit.pipeline.inputs import caption_attributes

    return "caption" in inputs.data.columns or bool(caption_attributes(inputs.config, inputs.data))


def run_embedder(config, data, train: bool = False, progress: bool = False):
    """``(embedder, TrainResult | None)`` for an audit config and its (class-named) data."""
    from audit.embed import create_embedder

    name = config.directions.embedder
    if name != "world":
        return create_embedder(name), None
    from audit.embed.world_encoder import (
        WorldEncoder,
        load_or_train,
        train_world_encoder,
        with_vocabulary,
    )

    table = _encoder_table(config, data)
    if not train:
        return load_or_train(table, train=False), None
    res = train_world_encoder(table, progress=progress)
    return with_vocabulary(WorldEncoder.load(res.path), table), res


def _encoder_table(config, data):
    """The rows and captions the world encoder trains on (the data's ``caption`` column, else
    captions composed from its attributes)."""
    from audit.embed.world_encoder import encoder_table
    from audit.pipeline.inputs import caption_attributes

    return encoder_table(
        data, None if "caption" in data.columns else caption_attributes(config, data)
    )


def world_checkpoint(inputs) -> str | None:
    """Where the world encoder the run embeds with is cached (None: another embedder)."""
    if inputs.config.directions.embedder != "world" or not has_captions(inputs):
        return None
    from audit.embed.world_encoder import checkpoint_path

    return checkpoint_path(_encoder_table(inputs.config, inputs.data))


def embed_current(store: RunStore, inputs) -> bool:
    """The world encoder the run embedded with is still in the cache: after the cache was
    cleared the stage runs again (the encoder trains again; what it embeds differently is
    embedded anew, since its key holds the weights' digest)."""
    path = world_checkpoint(inputs)
    return path is None or os.path.exists(path)


def embed_result(store: RunStore, inputs) -> list:
    """What the stage produced: the key of each stored embedding table (the stages after it
    rerun when an encoder trained again embeds differently)."""
    import pyarrow.parquet as pq

    out = []
    for d in sorted(store.listdir("embeddings") if store.exists("embeddings") else []):
        rel = f"embeddings/{d}/part-00000.parquet"
        if store.exists(rel):
            meta = pq.read_schema(store.path(rel), filesystem=store.fs).metadata or {}
            out.append((d, meta.get(b"key", b"").decode()))
    return out


def embed_stage(store: RunStore, inputs, cfg) -> str:
    """Stage: train/load the embedder and embed the splits the directions use."""
    from audit.embed import embed_table

    emb, res = embedder_for(inputs, train=True)
    table = inputs.data.split(inputs.embed_splits())
    E = embed_table(store, emb, table, progress=inputs.services.progress)
    how = "" if res is None else f"world encoder {'trained' if res.trained else 'cached'}"
    if res is not None and res.trained:
        how += f" in {res.seconds:.0f}s"
    return f"{emb.name}: {len(E):,} images embedded" + (f" ({how})" if how else "")


def correct_for(preds: Mapping[str, pa.Table], ids) -> tuple[dict, dict]:
    """``({model: correct bool [N]}, {model: confidence [N]})`` aligned with ``ids``; a model
    missing some of them is left out with a warning."""
    correct, conf = {}, {}
    for m, t in preds.items():
        idx = align_ids(t["example_id"].to_numpy(zero_copy_only=False), ids)
        if (idx < 0).any():
            log.warning(
                "model %s has no prediction for %d of %d examples; skipped",
                m,
                int((idx < 0).sum()),
                len(ids),
            )
            continue
        correct[m] = t["correct"].to_numpy(zero_copy_only=False)[idx]
        conf[m] = t["confidence"].to_numpy(zero_copy_only=False)[idx]
    return correct, conf


def _fit_one(scope, *, X, X_stats, labels, correct, estimator, clusters):
    """One scope's directions: ``("model", name)``, or ``("cluster", id)`` (its members'
    pooled failures); None for a cluster with no member that has predictions."""
    from audit.directions import fit_collective, fit_directions

    kind, name = scope
    if kind == "model":
        one = {name: correct[name]}
        return fit_directions(X, one, labels, X_stats=X_stats, estimator=estimator)[name]
    fitted = fit_collective(
        X, correct, {name: clusters[name]}, labels, X_stats=X_stats, estimator=estimator
    )
    return fitted.get(f"cluster:{name}")


class _Split:
    """One split's rows that have an embedding and a prediction of every model."""

    def __init__(self, table, E, preds):
        ids = table.example_ids.astype(str)
        have = np.isin(ids, E.example_ids.astype(str))
        for t in preds.values():
            have &= np.isin(ids, t["example_id"].to_numpy(zero_copy_only=False).astype(str))
        self.table = table.take(np.flatnonzero(have))
        self.ids = self.table.example_ids.astype(str)
        self.X = E.align(self.ids)
        self.labels = self.table.labels
        self.correct, self.confidence = correct_for(preds, self.ids)


def _fit_directions(store: RunStore, inputs, cfg, fit: _Split, X_train) -> tuple[pa.Table, dict]:
    """Per model and per cluster, each a task of the executor: ``(directions table, clusters)``."""
    from audit.directions import (
        FailureDirections,
        clusters_from_table,
        directions_table,
        with_q_values,
    )

    est = FailureDirections(
        max_modes=cfg.max_modes,
        n_permutations=cfg.n_permutations,
        max_permutations=cfg.max_permutations,
    )
    clusters = {}
    if store.exists("clusters.parquet"):
        clusters = clusters_from_table(store.read_table("clusters.parquet"))
    scopes = [("model", m) for m in sorted(fit.correct)] + [("cluster", c) for c in clusters]
    shared = {"X": fit.X, "X_stats": X_train, "labels": fit.labels, "correct": fit.correct}
    shared |= {"estimator": est, "clusters": clusters}
    fits = inputs.services.executor.map(_fit_one, scopes, shared=shared)
    fitted = {
        name if kind == "model" else f"cluster:{name}": f
        for (kind, name), f in zip(scopes, fits, strict=True)
        if f is not None
    }
    return with_q_values(directions_table(fitted, inputs.data.classes)), clusters


def directions_stage(store: RunStore, inputs, cfg) -> str:
    """Stage: fit, name and check failure directions (``[directions]`` section)."""
    from audit.directions import direction_similarity
    from audit.embed import embed_table
    from audit.evaluate import load_predictions
    from audit.index import ClassIndex, subpopulations_table
    from audit.pipeline.sweep import swept_models

    emb, _ = embedder_for(inputs, train=False)
    data = inputs.data
    E = embed_table(
        store, emb, data.split(inputs.embed_splits()), progress=False
    )  # the embed stage's
    preds = load_predictions(store, swept_models(store, inputs.zoo))
    fit = _Split(data.split(inputs.fit_split), E, preds)
    if not fit.correct:
        raise ValueError(
            f"no model has predictions for the {inputs.fit_split!r} split; run the sweep over it first"
        )
    train_ids = data.split("train").example_ids.astype(str)
    X_train = E.align(train_ids[np.isin(train_ids, E.example_ids.astype(str))])
    dirs, clusters = _fit_directions(store, inputs, cfg, fit, X_train)
    store.write_table("directions.parquet", dirs)
    store.write_table("direction_similarity.parquet", direction_similarity(dirs))
    if not emb.has_text:  # an image-only space: the modes are found and shown, not named
        from audit.captions import CAPTIONS_SCHEMA
        from audit.index import SUBPOPULATION_SCHEMA

        store.write_table("captions.parquet", CAPTIONS_SCHEMA.empty_table())
        store.write_table("subpopulations.parquet", SUBPOPULATION_SCHEMA.empty_table())
        n_ok = sum(s == "ok" for s in dirs["status"].to_pylist())
        return f"{dirs.num_rows} directions ({n_ok} significant) in {emb.name}, an image-only space: no captions"
    cands, refs = _candidates(store, inputs, cfg, emb)
    grounding = _grounding(cfg.caption_scoring == "images", fit, data.classes, cfg.grounding_k)
    caps = _captions_table(dirs, cands, refs, emb, cfg.top_k, grounding)
    store.write_table("captions.parquet", caps)
    ev = _Split(data.split(inputs.eval_split), E, {m: preds[m] for m in fit.correct})
    scopes = {f"cluster:{cid}": members for cid, members in clusters.items()}
    index = ClassIndex(ev.X, ev.labels)
    subs = subpopulations_table(caps, ev.correct, emb, index, data.classes, k=cfg.k, scopes=scopes)
    store.write_table("subpopulations.parquet", subs)
    if "group" in data.columns and store.exists("accuracy.parquet"):
        planted = _planted(store, inputs, cfg, dirs, caps, cands, refs, emb, fit, grounding)
        store.write_table("planted.parquet", planted)
    n_ok = sum(s == "ok" for s in dirs["status"].to_pylist())
    return (
        f"{dirs.num_rows} directions ({n_ok} significant), {caps.num_rows:,} captions, "
        f"{subs.num_rows:,} nearest-image checks"
    )


def _world_spec(inputs):
    if not inputs.world_dir:
        return None
    from audit.data.world import WorldSpec

    return WorldSpec.from_toml(os.path.join(inputs.world_dir, "spec.toml"))


def _record_dropped(store: RunStore, emb, n_before: int, n_kept: int, dropped: dict) -> None:
    """The candidates the embedder cannot embed: counted in the manifest, one error row a word."""
    counts = {"candidates": n_before, "kept": n_kept, "dropped_unknown_words": n_before - n_kept}
    store.update_manifest(captions={"embedder": emb.name, **counts, "unknown_words": len(dropped)})
    if not dropped:
        return
    words = ", ".join(sorted(dropped)[:10])
    log.warning(
        "%s does not know %d word(s) (%s); candidate captions with them are dropped",
        emb.name,
        len(dropped),
        words,
    )
    why = f"not in the vocabulary of embedder {emb.name!r}"
    store.record_errors(
        {
            "stage": "directions",
            "item": f"word:{w}",
            "reason": f"{why}: {n} candidate caption(s) with it dropped",
        }
        for w, n in sorted(dropped.items())
    )


def _candidates(store: RunStore, inputs, cfg, emb) -> tuple[dict, dict]:
    """``(candidate captions per class, reference caption per class)``: the data's grammar
    (the world's, or its attribute columns'), the generic one and LLM proposals, without
    the ones with words the embedder does not know."""
    from audit.captions import (
        candidate_captions,
        drop_unknown_words,
        reference_caption,
        world_reference,
    )
    from audit.data.attributes import attribute_values
    from audit.llm import LLMConfig
    from audit.pipeline.inputs import caption_attributes

    spec = _world_spec(inputs)
    classes = inputs.data.classes
    llm = None
    if cfg.llm_model:
        base_url = cfg.llm_base_url or os.environ.get("OPENAI_BASE_URL") or None
        llm = LLMConfig(model=cfg.llm_model, base_url=base_url)
    slots = {} if spec is not None else caption_attributes(inputs.config, inputs.data)
    values = {a: attribute_values(inputs.data, a) for a in slots}
    cands = candidate_captions(classes, world_spec=spec, llm=llm, attributes=values, slots=slots)
    n_before = sum(len(v) for v in cands.values())
    cands, dropped = drop_unknown_words(cands, emb.unknown_words)
    _record_dropped(store, emb, n_before, sum(len(v) for v in cands.values()), dropped)
    in_world = spec.items if spec is not None else ()
    refs = {c: world_reference(spec, c) if c in in_world else reference_caption(c) for c in classes}
    return cands, refs


def _grounding(on: bool, fit: _Split, classes, k: int):
    """The fit split's images as the captions' ground ("images" scoring), or None ("text")."""
    from audit.captions import CaptionGrounding

    return CaptionGrounding(fit.X, fit.labels, classes, k) if on else None


def _captions_table(dirs, cands, refs, emb, top_k: int, grounding) -> pa.Table:
    from audit.captions import captions_table

    return captions_table(dirs, cands, emb.encode_text, refs, top_k=top_k, grounding=grounding)


def _planted(store, inputs, cfg, dirs, caps, cands, refs, emb, fit, grounding) -> pa.Table:
    """Both caption scorings checked against the planted truth, so the summary compares them."""
    from audit.directions import decision_from_row
    from audit.planted import planted_evaluation

    classes = inputs.data.classes
    decisions = {}
    for row in dirs.to_pylist():
        if row["mode"] == 0 and row["direction"] is not None and row["scope"] in fit.correct:
            in_c = fit.labels == classes.index(row["class"])
            decisions[(row["scope"], row["class"])] = decision_from_row(row, fit.X[in_c])
    other_grounding = _grounding(grounding is None, fit, classes, cfg.grounding_k)
    other = _captions_table(dirs, cands, refs, emb, 1, other_grounding)
    acc = store.read_table("accuracy.parquet")
    tables = []
    for scoring, c in (
        (cfg.caption_scoring, caps),
        ("text" if grounding is not None else "images", other),
    ):
        t = planted_evaluation(
            acc,
            c,
            decisions,
            fit.confidence,
            fit.correct,
            fit.labels,
            fit.table.column("group"),
            classes,
            min_gap=inputs.config.stats.min_gap,
        )
        tables.append(
            t.append_column("caption_scoring", pa.array([scoring] * t.num_rows, pa.string()))
        )
    return pa.concat_tables(tables)
