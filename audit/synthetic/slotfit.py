"""How well an image fits every slot of a caption: retrieval's reranking and its precision.

A caption's nearest images in a joint space match it loosely (measured on planted data:
the whole caption for 15-27% of them). Retrieval takes many candidates and reranks them by
their fit to each slot the caption names (:class:`audit.slots.SlotGrammar`):

- :class:`PoolAttributes`: the pool carries the attribute columns: an image fits a slot when
  its value is the slot's (exact; the generator is then named ``retrieval+attributes``, so a
  figure made with labelled pool images says so);
- :class:`AttributeProbes`: a raw pool (no attribute column): one logistic-regression probe
  per attribute, trained on the train split's embeddings and attribute values, gives each
  pool image the probability of each value; a caption's fit is the product over its slots.

Both report the precision per slot of what was retrieved (measured with the pool's columns,
estimated from the probes' probabilities otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


class PoolAttributes:
    """Exact slot fit from the pool's own attribute columns (``attrs[a]``: value per pool row)."""

    name = "retrieval+attributes"
    measured = True

    def __init__(self, attrs: Mapping[str, np.ndarray]):
        self.attrs = {a: np.asarray(v).astype(str) for a, v in attrs.items()}

    def fit(self, rows: np.ndarray, slots: Mapping[str, str]) -> tuple[list[str], np.ndarray]:
        """``(the slots it can judge, [len(rows), that many] fits in [0, 1])``."""
        names = [a for a in slots if a in self.attrs]
        cols = [self.attrs[a][rows] == str(slots[a]) for a in names]
        return names, (np.stack(cols, 1).astype(float) if cols else np.ones((len(rows), 0)))


class AttributeProbes:
    """Slot fit estimated by per-attribute probes on the joint embedding (``X`` [N, D] pool)."""

    name = "retrieval"
    measured = False

    def __init__(
        self, X_pool: np.ndarray, X_train: np.ndarray, train_attrs: Mapping[str, np.ndarray]
    ):
        from sklearn.linear_model import LogisticRegression

        self.proba: dict[str, dict[str, np.ndarray]] = {}
        for a, y in train_attrs.items():
            y = np.asarray(y).astype(str)
            keep = (y != "None") & (y != "")
            if len(set(y[keep])) < 2:
                continue
            probe = LogisticRegression(max_iter=300, C=1.0).fit(X_train[keep], y[keep])
            p = probe.predict_proba(X_pool)
            self.proba[a] = {str(c): p[:, i] for i, c in enumerate(probe.classes_)}

    def fit(self, rows: np.ndarray, slots: Mapping[str, str]) -> tuple[list[str], np.ndarray]:
        names = [a for a in slots if a in self.proba]
        zero = np.zeros(len(rows))
        cols = [
            self.proba[a][str(slots[a])][rows] if str(slots[a]) in self.proba[a] else zero
            for a in names
        ]
        return names, (np.stack(cols, 1) if cols else np.ones((len(rows), 0)))


def rerank(candidates: np.ndarray, slots: Mapping[str, str], scorer, top_n: int) -> np.ndarray:
    """The ``top_n`` candidates (pool rows, nearest first) that fit the caption's slots best:
    by the product of their slot fits, ties kept in embedding order."""
    if not slots or scorer is None or not len(candidates):
        return candidates[:top_n]
    _, fit = scorer.fit(candidates, slots)
    if not fit.shape[1]:
        return candidates[:top_n]
    score = np.prod(fit, axis=1)
    order = np.argsort(-score, kind="stable")
    return candidates[order[:top_n]]


def slot_precision(scorer, rows: np.ndarray, slots: Mapping[str, str]) -> dict[str, float]:
    """Per slot (and ``all``): the share of ``rows`` that show the slot's value (measured with
    the pool's columns; the probes' mean probability otherwise)."""
    if scorer is None or not slots or not len(rows):
        return {}
    names, fit = scorer.fit(rows, slots)
    out = {a: float(fit[:, i].mean()) for i, a in enumerate(names)}
    if names:
        out["all"] = float(np.prod(fit, axis=1).mean())
    return out
