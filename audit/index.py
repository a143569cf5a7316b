"""FAISS indexes over image embeddings and the nearest-caption subpopulation evaluation.

- :class:`VectorIndex`: inner-product search over unit vectors (cosine). ``kind="auto"``
  picks exact ``IndexFlatIP`` up to ``exact_max`` vectors, HNSW above it and IVF-Flat for
  very large sets; for approximate kinds the recall@k against exact search is measured on
  a sample of queries at build time (``recall_``) and the search breadth (``efSearch`` /
  ``nprobe``) is widened until it reaches ``target_recall``.
- :class:`ClassIndex`: one :class:`VectorIndex` per class, so a caption's query is
  restricted to the images of its class with no loss of recall (an ``IDSelector`` over a
  global index would make HNSW walk a graph mostly made of other classes).
- :func:`subpopulations_table`: the paper's check that a caption names a real failure mode
  (Jain et al., Section 2.2): accuracy on a class's k test images nearest the caption vs
  on the class, with a Wilson interval (a cluster's counting its images, not its pairs).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from audit.predictions import effective_counts

log = logging.getLogger(__name__)

KINDS = ("auto", "flat", "hnsw", "ivf")
SUBPOPULATION_SCHEMA = pa.schema(
    [
        ("scope", pa.string()),
        ("class", pa.string()),
        ("caption", pa.string()),
        ("polarity", pa.string()),
        ("k", pa.int32()),
        ("accuracy_on_nearest", pa.float64()),
        ("class_accuracy", pa.float64()),
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("n", pa.int32()),
        ("n_models", pa.int32()),
        ("delta", pa.float64()),
    ]
)


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ImportError(
            "the FAISS index needs faiss: pip install faiss-cpu (or faiss-gpu)"
        ) from e
    return faiss


def _as_vectors(x, name: str, dim: int | None = None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array [N, D]; got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(
            f"{name} have dimension {x.shape[1]} but the index holds {dim}-d vectors (same embedder?)"
        )
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must be floating point; got {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k: ``(scores [M, k], ids [M, k])``, ids -1 past the end."""
    faiss = _faiss()
    vectors = _as_vectors(vectors, "vectors")
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    return flat.search(_as_vectors(queries, "queries", vectors.shape[1]), int(k))


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row's true top-k ids (``truth [M, k]``, -1 ignored) found in ``found``."""
    hits, total = 0, 0
    for f, t in zip(found, truth, strict=True):
        t = t[t >= 0]
        hits += np.isin(t, f).sum()
        total += len(t)
    return float(hits / total) if total else 1.0


class VectorIndex:
    """Top-k inner-product search over ``vectors [N, D]`` (unit rows: cosine similarity).

    ``kind``: ``auto`` | ``flat`` (exact) | ``hnsw`` | ``ivf``. Approximate kinds measure
    ``recall_`` (recall@``recall_k`` against exact search on ``recall_queries`` sampled
    vectors, perturbed so a query is not its own neighbour) and widen ``ef_search`` /
    ``nprobe`` up to ``max_breadth`` until the recall reaches ``target_recall``.
    """

    def __init__(
        self,
        vectors,
        kind: str = "auto",
        *,
        exact_max: int = 50_000,
        ivf_min: int = 2_000_000,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int | None = None,
        nlist: int | None = None,
        nprobe: int | None = None,
        target_recall: float | None = 0.95,
        recall_k: int = 10,
        recall_queries: int = 200,
        max_breadth: int = 4096,
        seed: int = 0,
    ):
        faiss = _faiss()
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose one of {list(KINDS)}")
        self.vectors = _as_vectors(vectors, "vectors")
        n, d = self.vectors.shape
        self.n, self.dim = n, d
        if kind == "auto":
            kind = "flat" if n <= exact_max else "hnsw" if n < ivf_min else "ivf"
        self.kind_ = kind
        self.params_: dict = {}
        if kind == "flat":
            self.index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = int(ef_construction)
            self.params_ = {
                "M": int(hnsw_m),
                "efConstruction": int(ef_construction),
                "efSearch": int(ef_search or 64),
            }
        else:
            nlist = int(nlist or max(1, min(n // 39, int(4 * np.sqrt(n)))))
            quantizer = faiss.IndexFlatIP(d)
            self.index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            sample = (
                self.vectors[np.sort(rng.choice(n, min(n, 64 * nlist), replace=False))]
                if n > 64 * nlist
                else self.vectors
            )
            self.index.cp.seed = int(seed)
            self.index.train(sample)
            self.params_ = {"nlist": nlist, "nprobe": int(nprobe or max(1, nlist // 64))}
        self.index.add(self.vectors)
        self._apply_params()
        self.recall_k = int(recall_k)
        self.recall_ = 1.0
        if kind != "flat" and n > 0:
            rng = np.random.default_rng(seed + 1)
            q = self.vectors[rng.choice(n, min(n, int(recall_queries)), replace=False)]
            q = q + 0.05 * rng.standard_normal(q.shape).astype(np.float32) / np.sqrt(d)
            self.tune(q, target_recall, max_breadth)

    # -- parameters ----------------------------------------------------------------------
    def _apply_params(self) -> None:
        if self.kind_ == "hnsw":
            self.index.hnsw.efSearch = int(self.params_["efSearch"])
        elif self.kind_ == "ivf":
            self.index.nprobe = int(self.params_["nprobe"])

    def tune(self, queries, target_recall: float | None = 0.95, max_breadth: int = 4096) -> float:
        """Measure recall@recall_k on ``queries``; widen the search until ``target_recall``."""
        queries = _as_vectors(queries, "queries", self.dim)
        k = min(self.recall_k, self.n)
        _, truth = exact_search(self.vectors, queries, k)
        knob = "efSearch" if self.kind_ == "hnsw" else "nprobe"
        limit = min(max_breadth, self.params_.get("nlist", max_breadth))
        while True:
            self.recall_ = recall_at_k(self.index.search(queries, k)[1], truth)
            if (
                target_recall is None
                or self.recall_ >= target_recall
                or self.params_[knob] >= limit
            ):
                break
            self.params_[knob] = min(limit, self.params_[knob] * 2)
            self._apply_params()
        if target_recall is not None and self.recall_ < target_recall:
            log.warning(
                "%s index reaches recall@%d %.3f < %.2f at %s=%d",
                self.kind_,
                k,
                self.recall_,
                target_recall,
                knob,
                self.params_[knob],
            )
        return self.recall_

    # -- search --------------------------------------------------------------------------
    def search(
        self, queries, k: int, subset: Sequence[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` neighbours: ``(scores [M, k] float32, ids [M, k] int64)``, ids -1 where
        fewer than ``k`` exist. ``subset``: only these row ids are eligible (IDSelector)."""
        faiss = _faiss()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = _as_vectors(queries, "queries", self.dim)
        if subset is None:
            return self.index.search(queries, int(k))
        sel = faiss.IDSelectorBatch(np.asarray(subset, dtype=np.int64))
        if self.kind_ == "hnsw":
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=int(self.params_["efSearch"]))
        elif self.kind_ == "ivf":
            params = faiss.SearchParametersIVF(sel=sel, nprobe=int(self.params_["nprobe"]))
        else:
            params = faiss.SearchParameters(sel=sel)
        return self.index.search(queries, int(k), params=params)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"VectorIndex(kind={self.kind_!r}, n={self.n}, dim={self.dim}, params={self.params_}, recall@{self.recall_k}={self.recall_:.3f})"


class ClassIndex:
    """Per-class :class:`VectorIndex` over ``vectors [N, D]`` with ``labels [N]``.

    ``search(queries, k, label)`` returns global row ids (into ``vectors``) of the ``k``
    nearest rows of class ``label``. Extra keyword arguments go to each VectorIndex.
    """

    def __init__(self, vectors, labels, **index_kwargs):
        vectors = _as_vectors(vectors, "vectors")
        labels = np.asarray(labels)
        if labels.shape != (len(vectors),):
            raise ValueError(
                f"labels must be [N] = [{len(vectors)}] aligned with vectors; got shape {labels.shape}"
            )
        self.dim = vectors.shape[1]
        self.labels = labels
        self.rows: dict = {}
        self.indexes: dict = {}
        for c in np.unique(labels):
            rows = np.flatnonzero(labels == c)
            self.rows[c.item()] = rows
            self.indexes[c.item()] = VectorIndex(vectors[rows], **index_kwargs)

    def search(self, queries, k: int, label) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [M, k], global ids [M, k])`` within class ``label``; -1 pads short classes."""
        key = label.item() if isinstance(label, np.generic) else label
        if key not in self.indexes:
            raise ValueError(
                f"no indexed examples of class {label!r}; indexed classes: {sorted(self.indexes)}"
            )
        scores, local = self.indexes[key].search(queries, k)
        rows = self.rows[key]
        return scores, np.where(local >= 0, rows[np.clip(local, 0, None)], -1)

    @property
    def recall_(self) -> float:
        """The lowest measured recall over the per-class indexes."""
        return min((ix.recall_ for ix in self.indexes.values()), default=1.0)


# -- nearest-caption evaluation -------------------------------------------------------------
def _caption_vectors(captions: list[str], embedder) -> dict[str, np.ndarray]:
    unique = sorted(set(captions))
    if isinstance(embedder, Mapping):
        missing = [c for c in unique if c not in embedder]
        if missing:
            raise ValueError(f"no text vector for {len(missing)} caption(s), e.g. {missing[0]!r}")
        return {c: np.asarray(embedder[c], np.float32) for c in unique}
    if not hasattr(embedder, "encode_text"):
        raise TypeError("embedder must be an audit.embed.Embedder or a mapping caption -> vector")
    vecs = embedder.encode_text(unique)
    return dict(zip(unique, vecs, strict=True))


def subpopulations_table(
    captions,
    correct: Mapping[str, np.ndarray],
    embedder,
    index: ClassIndex,
    classes: Sequence[str],
    k: int = 50,
    scopes: Mapping[str, Sequence[str]] | None = None,
    z: float = 1.96,
) -> pa.Table:
    """Accuracy on the ``k`` nearest indexed images of the caption's class vs on the class.

    ``captions``: a table or row dicts with ``scope, class, caption, polarity``.
    ``correct``: ``{model: bool [N]}`` aligned with the rows of ``index`` (the test images).
    ``embedder``: an Embedder (captions embedded once each) or ``{caption: vector}``.
    ``scopes``: for scopes that are not model names (a cluster), the models they pool (``n``:
    images x models). Returns a table with :data:`SUBPOPULATION_SCHEMA` (a row per caption).
    """
    from audit.predictions import wilson_interval

    rows = _caption_rows(captions)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    corr = _checked_correct(correct, len(index.labels))
    scopes = dict(scopes or {})
    class_pos = {c: i for i, c in enumerate(classes)}
    vecs = _caption_vectors([str(r["caption"]) for r in rows], embedder)
    neighbours = _neighbours(rows, vecs, index, classes, k)
    out = {f.name: [] for f in SUBPOPULATION_SCHEMA}
    hits_all, n_all = [], []
    for r in rows:
        ci = class_pos[r["class"]]
        ms = _members(str(r["scope"]), scopes, corr)
        near = neighbours[(ci, str(r["caption"]))]
        hits, n, acc, cls_acc = _nearest_vs_class(corr, ms, near, index.labels == ci)
        out["scope"].append(str(r["scope"]))
        out["class"].append(str(r["class"]))
        out["caption"].append(str(r["caption"]))
        out["polarity"].append(str(r["polarity"]))
        out["k"].append(int(k))
        out["accuracy_on_nearest"].append(acc)
        out["class_accuracy"].append(cls_acc)
        out["n"].append(len(near) * len(ms))
        out["n_models"].append(len(ms))
        out["delta"].append(acc - cls_acc)
        hits_all.append(hits)
        n_all.append(n)
    lo, hi = wilson_interval(np.asarray(hits_all), np.asarray(n_all), z=z)
    out["ci_low"] = [float(x) for x in lo]
    out["ci_high"] = [float(x) for x in hi]
    return pa.table(out, schema=SUBPOPULATION_SCHEMA)


def _caption_rows(captions) -> list[dict]:
    """Caption rows (a table or row dicts), each checked to have scope, class, caption, polarity."""
    rows = captions.to_pylist() if isinstance(captions, pa.Table) else list(captions)
    need = ("scope", "class", "caption", "polarity")
    for i, r in enumerate(rows):
        miss = [c for c in need if c not in r]
        if miss:
            raise ValueError(f"caption row {i} lacks {miss}; rows need {list(need)}")
    return rows


def _checked_correct(correct: Mapping[str, np.ndarray], n_index: int) -> dict[str, np.ndarray]:
    """``{model: bool [n_index]}``, raising when an array is not aligned with the index."""
    corr = {}
    for m, c in correct.items():
        c = np.asarray(c, bool)
        if c.shape != (n_index,):
            raise ValueError(
                f"correct[{m!r}] has shape {c.shape}; it must be [{n_index}], aligned with the indexed images"
            )
        corr[m] = c
    return corr


def _members(scope: str, scopes: Mapping[str, Sequence[str]], corr: Mapping) -> list[str]:
    """The models a scope pools: ``scopes[scope]``, or the scope itself when it is a model."""
    if scope in scopes:
        ms = list(scopes[scope])
    elif scope in corr:
        ms = [scope]
    else:
        raise ValueError(
            f"scope {scope!r} is neither a model in `correct` ({sorted(corr)[:5]}...) nor a key of `scopes`"
        )
    unknown = [m for m in ms if m not in corr]
    if unknown:
        raise ValueError(f"scope {scope!r} names model(s) {unknown} that have no `correct` array")
    return ms


def _neighbours(
    rows: list[dict], vecs: Mapping[str, np.ndarray], index: ClassIndex, classes, k: int
) -> dict[tuple[int, str], np.ndarray]:
    """``{(class position, caption): ids [<= k]}``: one search per distinct (class, caption),
    shared by all scopes; raises on a class outside ``classes``."""
    class_pos = {c: i for i, c in enumerate(classes)}
    neighbours: dict[tuple[int, str], np.ndarray] = {}
    for r in rows:
        if r["class"] not in class_pos:
            raise ValueError(
                f"caption {r['caption']!r} names class {r['class']!r}; the classes are {list(classes)}"
            )
        key = (class_pos[r["class"]], str(r["caption"]))
        if key not in neighbours:
            _, ids = index.search(vecs[key[1]][None, :], k, key[0])
            neighbours[key] = ids[0][ids[0] >= 0]
    return neighbours


def _nearest_vs_class(
    corr: Mapping[str, np.ndarray], ms: list[str], near: np.ndarray, in_class: np.ndarray
) -> tuple[float, float, float, float]:
    """``(hits, n, accuracy on near, accuracy on the class)`` pooled over the models ``ms``
    (NaN for an empty set); ``hits, n``: an interval's counts (``effective_counts``)."""
    near = np.asarray(near, int)
    hits, n = effective_counts(corr, ms, near)
    acc = hits / n if n else float("nan")
    cls_hits = sum(int(corr[m][in_class].sum()) for m in ms)
    cls_n = int(in_class.sum()) * len(ms)
    cls_acc = cls_hits / cls_n if cls_n else float("nan")
    return hits, n, acc, cls_acc
