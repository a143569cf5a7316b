"""One model's fix, as one executor task: its stored features, its head, every method of
:mod:`audit.mitigate.methods`, and the gains on the eval split.

:func:`run_model` reads what it needs from the run directory itself (the model's features
of the real splits and of the generated images), so a Ray worker gets only the task and
the small shared inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from audit.evaluate import align_ids, feature_path, prediction_path
from audit.mitigate.classes import active_classes, confusion_mass, weakest_classes
from audit.mitigate.gain import paired_gain
from audit.mitigate.head import LinearHead, mix_weights
from audit.mitigate.select import stratified_subsample
from audit.mitigate.synthetic import SyntheticIndex, syn_features
from audit.pipeline.config import MitigateSection
from audit.store import RunStore

MITIGATION_SCHEMA = pa.schema(
    [
        *[("scope", pa.string()), ("model", pa.string()), ("class", pa.string())],
        *[("method", pa.string()), ("lambda", pa.float64()), ("n_added", pa.int64())],
        *[("overall_before", pa.float64()), ("overall_after", pa.float64())],
        *[("hard_before", pa.float64()), ("hard_after", pa.float64()), ("gain", pa.float64())],
        *[("gain_ci_low", pa.float64()), ("gain_ci_high", pa.float64()), ("eval", pa.string())],
        *[("target", pa.string()), ("n_hard", pa.int64()), ("choice", pa.string())],
        ("generator", pa.string()),
    ]
)


@dataclass(frozen=True)
class Setting:
    """What the mitigation needs of the rest of the config."""

    fit_split: str
    eval_split: str
    k: int  # images per hard caption in the synthetic sets ([generate] k)


@dataclass
class HardClass:
    cls: int
    caption: str | None  # None: an unnamed mode (no caption explains it)
    fit_near: np.ndarray  # fit rows nearest the caption (unnamed: hardest by the direction)
    eval_near: np.ndarray  # eval rows nearest the caption (unnamed: hardest by the direction)
    pool_order: np.ndarray  # pool rows of the class, hardest first by the direction
    fit_order: np.ndarray  # fit rows of the class, hardest first by the direction
    # eval rows of the class whose attribute columns show every slot of the caption (None:
    # the data has no such columns)
    group_eval: np.ndarray | None = None
    group: str = ""  # those slots, as "attribute=value, ..."


@dataclass
class ModelTask:
    model: str
    cluster: str | None
    hard: list[HardClass]
    planted: list[tuple[int, str, np.ndarray]]  # (class, group, eval rows of the group)
    own_sets: dict[str, list[str]]  # generator -> the model's own hard sets
    cluster_sets: dict[str, list[str]]  # generator -> its cluster's shared sets


@dataclass
class Fit:
    """One method's retrained head and how it was made."""

    head: LinearHead
    lam: float
    n_added: int
    choice: str
    scope: str | None = None  # the mitigation's scope when not the model (a cluster's set)
    generator: str = ""  # what made its synthetic images ("" without any)


class ModelData:
    """A model's features (``F``, float32), labels (``Y``) and confidences on the real splits,
    its original head ``(W0, b0)``, its hard classes, and the real examples every method
    trains on. The original head's logits per split are computed once: a retrained head that
    moves only some rows predicts from them plus its own rows."""

    head_class = LinearHead  # the estimator a fit makes (benchmarks swap in the scipy oracle)

    def __init__(
        self, F: dict, Y: dict, conf: dict, head, cfg: MitigateSection, setting: Setting, hard=()
    ):
        self.F = {s: np.asarray(x, np.float32) for s, x in F.items()}
        self.Y, self.conf = Y, conf
        self.W0, self.b0 = (np.asarray(a, np.float64) for a in head)
        self.cfg, self.setting = cfg, setting
        self.hard = np.unique(np.asarray(hard, np.int64))
        keep = stratified_subsample(
            Y["train"], int(cfg.max_real), seed=0
        )  # the same for every method
        self.train_X, self.train_y, self._keep = self.F["train"][keep], Y["train"][keep], keep
        self._logits: dict[str, np.ndarray] = {}
        self._probas: dict[str, np.ndarray] = {}
        self._masses: dict[int, np.ndarray] = {}

    def fit(self, X_add=None, y_add=None, lam: float = 0.0, w_add=None) -> LinearHead:
        """The head retrained on the real examples plus ``X_add`` (weighted ``lam`` in all, or
        per example by ``w_add`` against real examples of weight 1), moving the rows of
        :meth:`active` only."""
        X, y, w = self.train_X, self.train_y, None
        if X_add is not None and len(X_add):
            X, y = np.concatenate([X, X_add]), np.concatenate([y, y_add])
            n = len(self.train_X)
            w = (
                mix_weights(n, len(X_add), lam)
                if w_add is None
                else np.concatenate([np.ones(n), w_add])
            )
        head = self.head_class(alpha=self.cfg.alpha, max_iter=self.cfg.max_iter)
        active = self.active(y_add if X_add is not None and len(X_add) else None)
        if active is None:
            return head.fit(X, y, w, self.W0, self.b0, n_classes=len(self.W0))
        Z = self.logits("train")[self._keep]  # the frozen rows' logits: the real ones cached
        if len(X) > len(Z):
            Z = np.concatenate([Z, self._logits_of(X[len(Z) :])])
        C = len(self.W0)
        return head.fit(X, y, w, self.W0, self.b0, n_classes=C, active=active, init_logits=Z)

    def active(self, y_add=None) -> np.ndarray | None:
        """The head rows a fit moves (None: all): the hard classes and those of the added
        examples (without either, the fit split's weakest classes), then their main
        confusions on the fit split, up to ``[mitigate] head_classes``."""
        cap, C = int(self.cfg.head_classes), len(self.W0)
        if cap <= 0 or cap >= C:
            return None
        focus = np.union1d(self.hard, np.zeros(0, np.int64) if y_add is None else y_add)
        fs = self.setting.fit_split
        if not len(focus):
            focus = weakest_classes(self.correct_before(fs), self.Y[fs], max(1, cap // 4))
        for c in focus.tolist():
            if c not in self._masses:
                self._masses[c] = confusion_mass(self._proba(fs), self.Y[fs], c)
        return active_classes(focus, self._masses, cap, C)

    def _proba(self, split: str) -> np.ndarray:
        if split not in self._probas:
            z = self.logits(split)
            e = np.exp(z - z.max(1, keepdims=True))
            self._probas[split] = e / e.sum(1, keepdims=True)
        return self._probas[split]

    def logits(self, split: str) -> np.ndarray:
        """``[N, C]`` float32 logits of the original head on ``split`` (computed once)."""
        if split not in self._logits:
            self._logits[split] = self._logits_of(self.F[split])
        return self._logits[split]

    def _logits_of(self, X: np.ndarray) -> np.ndarray:
        return X @ self.W0.T.astype(np.float32) + self.b0.astype(np.float32)

    def predict(self, head: LinearHead, split: str) -> np.ndarray:
        """``[N]`` a retrained head's predictions on ``split``: the original logits with the
        rows the head moved (``head.active_``) recomputed."""
        A = head.active_
        if len(A) == len(self.W0):
            return head.predict(self.F[split])
        z = self.logits(split).copy()
        z[:, A] = self.F[split] @ head.coef_[A].T.astype(np.float32) + head.intercept_[A]
        return z.argmax(1)

    def correct_before(self, split: str) -> np.ndarray:
        return self.logits(split).argmax(1) == self.Y[split]


@dataclass
class MethodContext:
    """What a mitigation method may use for one model (see :mod:`audit.mitigate.methods`)."""

    task: ModelTask
    data: ModelData
    syn: SyntheticIndex
    syn_X: np.ndarray  # [S, D] the model's features of the generated images
    chosen: dict = field(default_factory=dict)  # choices one method leaves for another

    def fit_score(self, head: LinearHead) -> tuple[float, float]:
        """``(hard, overall)`` accuracy on the fit split: the choices' score (never the eval split)."""
        fs = self.data.setting.fit_split
        ok = self.data.predict(head, fs) == self.data.Y[fs]
        hard = [ok[hc.fit_near].mean() for hc in self.task.hard if len(hc.fit_near)]
        return (float(np.mean(hard)) if hard else float(ok.mean())), float(ok.mean())

    def syn_rows(self, set_ids: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Features and labels of the first ``k`` images per caption of the sets."""
        parts = [self.syn.of(s, k) for s in set_ids]
        idx = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return self.syn_X[idx], self.syn.labels[idx]


def model_head(spec, classes, weights_path) -> tuple[np.ndarray, np.ndarray] | None:
    """``(W0 [C, D], b0 [C])`` of a zoo member's linear head, or None when it has none."""
    from audit.zoo.models import build_model

    return build_model(spec, classes, weights_path).module.linear_head()


def _rows(vectors, idx: np.ndarray) -> np.ndarray:
    """``[len(idx), D]`` float32 rows of a fixed-size-list column (only those rows copied)."""
    taken = vectors.take(pa.array(idx)).combine_chunks()
    flat = taken.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, np.float32).reshape(len(idx), vectors.type.list_size)


def load_model_data(
    store: RunStore, name: str, split_ids: dict, split_labels: dict, head, cfg, setting, hard=()
):
    """The model's :class:`ModelData` (``hard``: its hard classes), or an error string
    (missing features, a head that does not reproduce the model's predictions)."""
    ft = store.read_table(feature_path(name))
    fids = ft["example_id"].to_numpy(zero_copy_only=False)
    vectors = ft["vector"]
    del ft  # each split's rows are taken from the column: no flat copy of every row beside them
    preds = store.read_table(prediction_path(name), columns=["example_id", "pred", "confidence"])
    pids = preds["example_id"].to_numpy(zero_copy_only=False)
    F, Y, conf = {}, {}, {}
    for split, ids in split_ids.items():
        idx = align_ids(fids, ids)
        if (idx < 0).any():
            return f"model {name} has no features for {int((idx < 0).sum())} {split} examples"
        F[split], Y[split] = _rows(vectors, idx), split_labels[split]
        conf[split] = preds["confidence"].to_numpy(zero_copy_only=False)[align_ids(pids, ids)]
    del vectors
    data = ModelData(F, Y, conf, head, cfg, setting, hard)
    pred = preds["pred"].to_numpy()[align_ids(pids, split_ids[setting.fit_split])]
    agree = float(np.mean(data.logits(setting.fit_split).argmax(1) == pred))
    if agree < 0.99:
        return f"model {name}: features x head reproduce only {agree:.1%} of its predictions"
    return data


def evaluation_rows(
    task: ModelTask, data: ModelData, fits: dict[str, Fit], classes, n_boot: int
) -> list[dict]:
    """One row per (method, target): the planted groups and each hard caption's nearest images."""
    es = data.setting.eval_split
    before = data.correct_before(es)
    targets = [("planted", classes[c], g, rows) for c, g, rows in task.planted]
    for hc in task.hard:
        if hc.caption is None:  # an unnamed mode: the eval images its direction finds hardest
            targets.append(("direction", classes[hc.cls], "unnamed", hc.eval_near))
        else:
            targets.append(("nearest_caption", classes[hc.cls], hc.caption, hc.eval_near))
        if hc.group_eval is not None:
            targets.append(("attribute_group", classes[hc.cls], hc.group, hc.group_eval))
    rows = []
    for method, f in fits:
        after = data.predict(f.head, es) == data.Y[es]
        for kind, cls, target, idx in targets:
            g, lo, hi = paired_gain(before[idx], after[idx], n_boot=n_boot, seed=len(rows))
            rows.append(
                {
                    "scope": f.scope or task.model,
                    "model": task.model,
                    "class": cls,
                    "method": method,
                }
                | {
                    "lambda": f.lam,
                    "n_added": f.n_added,
                    "choice": f.choice,
                    "generator": f.generator,
                }
                | {"overall_before": float(before.mean()), "overall_after": float(after.mean())}
                | {"hard_before": float(before[idx].mean()) if len(idx) else float("nan")}
                | {"hard_after": float(after[idx].mean()) if len(idx) else float("nan")}
                | {"gain": g, "gain_ci_low": lo, "gain_ci_high": hi}
                | {"eval": kind, "target": target, "n_hard": len(idx)}
            )
    return rows


def run_model(task: ModelTask, **shared) -> dict:
    """Every method for one model: ``{"rows": [...], "error": str | None}`` (``shared``: the
    keyword arguments of :func:`model_context`)."""
    ctx = model_context(task, **shared)
    if isinstance(ctx, str):
        return {"rows": [], "error": ctx}
    return {"rows": mitigate_model(ctx, shared["classes"], shared["cfg"].n_boot), "error": None}


def model_context(
    task: ModelTask,
    *,
    run_uri: str,
    split_ids: dict,
    split_labels: dict,
    spec_of: dict,
    weights: dict,
    classes: list[str],
    cfg: MitigateSection,
    setting: Setting,
    outputs_uri: str | None = None,
    hard: list[int] | None = None,
) -> MethodContext | str:
    """A model's :class:`MethodContext` (its head, stored features and the run's generated
    images), or why it cannot be made. ``outputs_uri``: where the model's outputs are stored
    when not in the run itself (a new member fixed by ``zoo-audit fix``); ``hard``: the
    classes whose head rows may move (default: the task's hard classes)."""
    from audit.mitigate.synthetic import load_index

    store, name = RunStore(run_uri), task.model
    out = RunStore(outputs_uri) if outputs_uri else store
    head = model_head(spec_of[name], classes, weights.get(name))
    if head is None:
        return f"model {name} has no linear head to retrain (builder {spec_of[name].builder})"
    hard = [hc.cls for hc in task.hard] if hard is None else hard
    data = load_model_data(out, name, split_ids, split_labels, head, cfg, setting, hard)
    if isinstance(data, str):
        return data
    syn = load_index(store)
    syn_X = syn_features(out, name, syn)
    if syn_X is None and len(syn.prompts):
        return f"model {name} has no outputs on the generated images"
    if syn_X is None:  # no generated image in the run: the methods that need none still apply
        syn_X = np.zeros((0, data.W0.shape[1]))
    return MethodContext(task, data, syn, np.asarray(syn_X, np.float32))


def mitigate_model(ctx: MethodContext, classes: list[str], n_boot: int) -> list[dict]:
    """Every method of :mod:`audit.mitigate.methods` for one model, and its evaluation rows."""
    from audit.mitigate.methods import METHODS

    fits = []
    for m, method in METHODS.items():
        made = method(ctx)
        fits += [(m, f) for f in ([made] if isinstance(made, Fit) else made or [])]
    return evaluation_rows(ctx.task, ctx.data, fits, classes, n_boot)
