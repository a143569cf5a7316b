"""Retrieval, the generator for any dataset: real pool images instead of generated ones.

For a caption, :class:`RetrievalSetGenerator` takes the real images of a *pool* split that
lie nearest to the caption in the run's joint image/text space (the embedder of the audit's
``[directions]`` section), through the FAISS index (:class:`audit.index.ClassIndex`). When
the caption names one of the dataset's classes, only that class's images are searched. It
is what the run uses when the data is not a world and no diffusion weights are configured
(AdaVision-style), and it writes its sets into the run in the format of
:mod:`audit.synthetic.sets`, with ``generator = "retrieval"``.

- **Deterministic**: image ``(caption, seed)`` is the neighbour at rank ``seed mod top_n``
  among the caption's ``top_n`` nearest; a caption's images in one set are distinct (a
  taken rank moves to the next free one).
- **Never the evaluation split**: the pool is the ``pool`` split (else ``train``), and the
  audit's evaluation split is refused as a pool.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from audit.store import RunStore
from audit.synthetic.sets import (
    png_bytes,
    read_set_meta,
    request_key,
    request_seeds,
    write_set,
)

log = logging.getLogger(__name__)

GENERATOR = "retrieval"
#: what the retrieved images depend on beyond the request (in the set's request key)
VERSION = "rerank-slots-2"
#: nearest images reranked per caption, in multiples of the images kept (``top_n``)
CANDIDATES = 8


class RetrievalPool:
    """The pool's decoded images and their per-class FAISS indexes in the embedder's space.

    ``images`` uint8 [N, H, W, 3] and ``example_ids`` [N] are the pool's decodable rows;
    ``labels`` [N] their class indices into ``classes``.
    """

    def __init__(
        self,
        images,
        example_ids,
        labels,
        vectors,
        classes,
        embedder,
        top_n: int = 32,
        grammar=None,
        scorer=None,
    ):
        from audit.index import ClassIndex

        self.images, self.example_ids = images, np.asarray(example_ids)
        self.labels, self.classes = np.asarray(labels), list(classes)
        self.embedder, self.top_n = embedder, int(top_n)
        self.grammar, self.scorer = (
            grammar,
            scorer,
        )  # the caption's slots, and the images' fit to them
        self.by_class = ClassIndex(vectors, self.labels)
        self.anywhere = ClassIndex(vectors, np.zeros(len(vectors), np.int64))
        # longest class names first, so "ankle boot" wins over "boot"
        self._class_res = sorted(
            (
                (re.compile(rf"(?<![\w-]){re.escape(c.lower())}(?![\w-])"), i)
                for i, c in enumerate(self.classes)
            ),
            key=lambda t: -len(t[0].pattern),
        )

    @property
    def size(self) -> list[int]:
        """``[H, W]`` of the pool's images (retrieved images keep their size)."""
        return [int(self.images.shape[1]), int(self.images.shape[2])]

    def class_of(self, caption: str) -> int | None:
        """The class a caption names (the longest class name in it), or None."""
        p = caption.lower()
        for rx, i in self._class_res:
            if rx.search(p) and i in self.by_class.indexes:
                return i
        return None

    @property
    def name(self) -> str:
        """``retrieval+attributes`` when it matched on the pool's attribute columns."""
        return getattr(self.scorer, "name", GENERATOR)

    def slots(self, caption: str) -> dict[str, str]:
        return self.grammar.parse(caption) if self.grammar is not None else {}

    def neighbours(self, captions: list[str]) -> dict[str, np.ndarray]:
        """``{caption: its top_n pool rows}``: the nearest ``CANDIDATES`` x top_n images (within
        its class when it names one), reranked by their fit to the caption's slots."""
        from audit.synthetic.slotfit import rerank

        uniq = list(dict.fromkeys(captions))
        Q = self.embedder.encode_text(uniq)
        out = {}
        for p, q in zip(uniq, Q, strict=True):
            c = self.class_of(p)
            index, label = (self.by_class, c) if c is not None else (self.anywhere, 0)
            _, ids = index.search(q[None, :], CANDIDATES * self.top_n, label)
            out[p] = rerank(ids[0][ids[0] >= 0], self.slots(p), self.scorer, self.top_n)
        return out

    def fitting(self, caption: str, ranked: np.ndarray) -> int:
        """How many of the ``ranked`` rows (best fit first) fit every slot of the caption
        (probes: predicted to, with probability >= 0.5); ``len(ranked)`` without slots."""
        slots = self.slots(caption)
        if not slots or self.scorer is None or not len(ranked):
            return len(ranked)
        names, fit = self.scorer.fit(ranked, slots)
        if not names:
            return len(ranked)
        return int((np.prod(fit, axis=1) >= 0.5).sum())

    def precision(self, captions: list[str], rows: list[int]) -> dict:
        """Per slot, the share of retrieved images that show it, over a set's images."""
        from audit.synthetic.slotfit import slot_precision

        by: dict[str, list[float]] = {}
        rows_of: dict[str, list[int]] = {}
        for p, r in zip(captions, rows, strict=True):
            rows_of.setdefault(p, []).append(r)
        for p, rs in rows_of.items():
            for a, v in slot_precision(self.scorer, np.asarray(rs), self.slots(p)).items():
                by.setdefault(a, []).append(v)
        out = {a: round(float(np.mean(v)), 4) for a, v in by.items()}
        if out:
            out["source"] = (
                "pool attributes"
                if getattr(self.scorer, "measured", False)
                else "estimated by attribute probes"
            )
        return out

    def pick(self, captions: list[str], seeds: list[int]) -> list[int]:
        """Pool row of each (caption, seed): rank ``seed mod n`` among the caption's first
        ``n`` neighbours, moved to the next free rank when another image of the caption in this
        call took it; ``n`` is the number that fit every slot of the caption (at least as many
        as the caption's images in the call, when the pool has them)."""
        near = self.neighbours(captions)
        wanted = {p: captions.count(p) for p in near}
        taken: dict[str, set] = {}
        out = []
        for p, s in zip(captions, seeds, strict=True):
            ids = near[p]
            n = min(len(ids), max(self.fitting(p, ids), wanted[p])) or len(ids)
            r = int(s) % n
            used = taken.setdefault(p, set())
            if len(used) < n:
                while r in used:
                    r = (r + 1) % n
            used.add(r)
            out.append(int(ids[r]))
        return out


def pool_split_of(have: set[str], eval_split: str, pool_split: str | None = None) -> str:
    """The split retrieval draws from: ``pool_split``, else ``pool``, else ``train``; never
    ``eval_split`` (images the audit evaluates on must not come back as training data)."""
    from audit.data.table import SPLITS

    if pool_split is None:
        pool_split = next((s for s in ("pool", "train") if s in have and s != eval_split), "")
    if not pool_split or pool_split == eval_split or pool_split not in SPLITS:
        raise ValueError(
            f"retrieval needs a pool split other than the evaluation split {eval_split!r}; "
            f"the dataset has {sorted(have)}"
        )
    return pool_split


def slot_scorer(store: RunStore, data, embedder, grammar, pool, ok: np.ndarray, X_pool: np.ndarray):
    """The pool's fit to caption slots: its own attribute columns when every pool row has
    them (exact), else probes trained on the train split's embeddings; None without slots."""
    from audit.embed import embed_table
    from audit.synthetic.slotfit import AttributeProbes, PoolAttributes

    attrs = [a for a in (grammar.values if grammar is not None else {}) if a in pool.columns]
    if not attrs:
        return None
    cols = {a: pool.table[a].to_pylist() for a in attrs}
    if all(v is not None and str(v).strip() for a in attrs for v in cols[a]):
        return PoolAttributes({a: np.asarray(cols[a], dtype=object)[ok] for a in attrs})
    train = data.split("train")
    if not len(train):
        return None
    E = embed_table(store, embedder, train, progress=False)
    tids = train.example_ids.astype(str)
    have = np.isin(tids, E.example_ids.astype(str))
    X_train = E.align(tids[have])
    y = {a: np.asarray(train.table[a].to_pylist(), dtype=object)[have].astype(str) for a in attrs}
    return AttributeProbes(X_pool, X_train, y)


def build_pool(
    store: RunStore,
    data,
    embedder,
    eval_split: str,
    pool_split: str | None = None,
    top_n=32,
    templates=None,
) -> RetrievalPool:
    """The :class:`RetrievalPool` of ``data``'s pool split (its embeddings cached in
    ``store``), reranking by the data's caption slots (``templates``: the run's
    ``[data] attribute_templates``)."""
    from audit.embed import embed_table
    from audit.slots import SlotGrammar

    split = pool_split_of(set(data.column("split").tolist()), eval_split, pool_split)
    pool = data.split(split)
    if not len(pool):
        raise ValueError(f"the pool split {split!r} of the dataset is empty")
    E = embed_table(store, embedder, pool, progress=False)
    images, ok, _ = pool.decode()
    ids = pool.example_ids.astype(str)[ok]
    X = E.align(ids)
    grammar = SlotGrammar.of(data, templates)
    scorer = slot_scorer(store, data, embedder, grammar, pool, ok, X)
    log.info(
        "retrieval: %d %s images (embedder %s, %s)",
        len(ids),
        split,
        embedder.name,
        getattr(scorer, "name", "no slots"),
    )
    return RetrievalPool(
        images, ids, pool.labels[ok], X, data.classes, embedder, top_n, grammar, scorer
    )


class RetrievalSetGenerator:
    """A SetGenerator (:class:`audit.pipeline.generate.SetGenerator`) that retrieves.

    ``store`` is the run directory (the sets land in ``synthetic/``, the pool's embeddings in
    ``embeddings/``); ``config`` the run's :class:`~audit.pipeline.config.AuditConfig`.
    ``data`` (the run's ImageTable) and ``embedder`` are loaded from ``config`` on the first
    request when not given. A set already stored under its id is returned, not made again.
    """

    name = GENERATOR

    def __init__(
        self,
        store: RunStore,
        config,
        data=None,
        embedder=None,
        pool_split: str | None = None,
        top_n: int = 32,
    ):
        self.store, self.config, self.data, self.embedder = store, config, data, embedder
        self.pool_split, self.top_n = pool_split, int(top_n)
        self._pool: RetrievalPool | None = None

    def pool(self) -> RetrievalPool:
        if self._pool is None:
            from audit.pipeline.directions import run_embedder
            from audit.pipeline.inputs import load_data

            if self.data is None:
                self.data, _ = load_data(self.config)
            if self.embedder is None:
                self.embedder, _ = run_embedder(self.config, self.data, train=False)
            self._pool = build_pool(
                self.store,
                self.data,
                self.embedder,
                self.config.data.eval_split,
                self.pool_split,
                self.top_n,
                self.config.data.attribute_templates,
            )
        return self._pool

    def make_set(self, captions: list[str], k: int, seed: int, set_id: str) -> dict:
        """Store (or find) the set of ``k`` images per caption; returns its metadata, with the
        precision per slot of what it holds (``slot_precision``)."""
        pool = self.pool()
        request = {
            "prompts": list(captions),
            "images_per_prompt": int(k),
            "seed": int(seed),
            "steps": 1,
            "guidance": 0.0,
            "size": pool.size,
        }
        key = request_key(request, f"{pool.name}/{VERSION}")
        seeds = request_seeds(request["prompts"], request["images_per_prompt"], seed)
        prompts = [c for c in request["prompts"] for _ in range(request["images_per_prompt"])]
        rows = pool.pick(prompts, seeds)
        meta = read_set_meta(self.store, set_id)
        if meta is None:
            pngs = [png_bytes(pool.images[r]) for r in rows]
            meta = write_set(self.store, set_id, request, key, pool.name, seeds, pngs)
            meta = meta or read_set_meta(self.store, set_id)  # written meanwhile: that set stands
        if meta is None or meta["request_hash"] != key:
            raise ValueError(
                f"set_id {set_id!r} in {self.store.uri} already holds a different request "
                f"(generator {meta and meta['generator']}); delete synthetic/{set_id} or change "
                "[generate] seed"
            )
        return {**meta, "slot_precision": pool.precision(prompts, rows)}

    def request_sets(
        self,
        wanted: Mapping[str, list[str]],
        set_ids: Mapping[str, str],
        k: int | Mapping[str, int],
        seed: int,
    ) -> pa.Table:
        """One set per scope, ``k`` (or ``k[scope]``) images per caption: rows of SETS_SCHEMA."""
        import json

        from audit.pipeline.generate import SETS_SCHEMA

        rows = []
        for scope, caps in wanted.items():
            meta = self.make_set(caps, k if isinstance(k, int) else k[scope], seed, set_ids[scope])
            rows.append(
                {
                    "scope": scope,
                    "set_id": meta["set_id"],
                    "captions": list(caps),
                    "n_images": meta["n_images"],
                    "generator": meta["generator"],
                    "slot_precision": json.dumps(meta["slot_precision"])
                    if meta["slot_precision"]
                    else None,
                }
            )
        return pa.Table.from_pylist(rows, schema=SETS_SCHEMA)
