"""The ways to fix a model's failures, one small function each, in a registry.

A method takes the model's :class:`~audit.mitigate.task.MethodContext` and returns a
:class:`~audit.mitigate.task.Fit` (a retrained head and how it was made), a list of them
(one per generator, for the methods that use generated images), or None when it does not
apply (no set, no hard class). Every method is evaluated the same way on the eval
split; adding one touches this file only. Methods run in registration order (a later one
may read what an earlier one chose: ``synthetic_cluster`` uses ``synthetic``'s lambda).

- ``control``: the real examples only (lambda = 0): what retraining alone does.
- ``synthetic``: the model's own hard sets, weighted ``lambda`` against ``1 - lambda`` real
  (arXiv 2312.05464), lambda and the images per caption chosen on the fit split.
- ``synthetic_cluster``: the model's cluster's one shared set (collective debugging).
- ``pool_direction`` / ``pool_random`` / ``pool_confidence``: K real pool images per hard
  class, the hardest by the failure direction (Jain et al.), at random, or the least confident.
- ``upweight``: the fit split's direction-selected images with a higher weight.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from audit.mitigate.select import choose, select_lowest, select_random
from audit.mitigate.task import Fit, MethodContext

METHODS: dict[str, Callable[[MethodContext], Fit | None]] = {}


def method(name: str):
    """Decorator: register ``fn(ctx) -> Fit | None`` as the mitigation method ``name``."""

    def deco(fn):
        METHODS[name] = fn
        return fn

    return deco


@method("control")
def control(ctx: MethodContext) -> Fit:
    return Fit(ctx.data.fit(), 0.0, 0, "")


def _fit_set(ctx: MethodContext, set_ids: list[str], lam: float, k: int) -> tuple:
    X_add, y_add = ctx.syn_rows(set_ids, k)
    return ctx.data.fit(X_add, y_add, lam), len(X_add)


@method("synthetic")
def synthetic(ctx: MethodContext) -> list[Fit]:
    """Per generator: coordinate search on the fit split, lambda at the most images, then
    fewer images at that lambda; a choice may not lower the fit split's accuracy more than
    ``max_drop``."""
    return [search_set(ctx, g, sets) for g, sets in ctx.task.own_sets.items() if sets]


def search_set(ctx: MethodContext, generator: str, set_ids: list[str]) -> Fit:
    """The head retrained with the sets' images (one generator's) at the mix that :func:`search_mix`
    chooses on the fit split for the hard classes of ``ctx.task`` (the model's own sets here; a
    cluster's shared set for a new member in :mod:`audit.transfer`)."""
    cfg, fs, k_max = ctx.data.cfg, ctx.data.setting.fit_split, int(ctx.data.setting.k)
    fitted: dict[tuple, tuple] = {}

    def score(c):
        if c not in fitted:
            fitted[c] = _fit_set(ctx, set_ids, *c)
        return ctx.fit_score(fitted[c][0])

    base = float(ctx.data.correct_before(fs).mean())
    chosen, tried, kept = search_mix(cfg.lambdas, k_max, score, base, cfg.max_drop)
    ctx.chosen[("synthetic", generator)] = chosen
    tries = "; ".join(
        f"lambda={c[0]:g} k={c[1]}: hard {h:.3f} overall {o:.3f}" for c, h, o in tried
    )
    if not kept:
        # every mix costs the fit split more than max_drop: these images do not help this
        # head, so none is used (the fix is then the control's, and says so)
        ctx.chosen[("synthetic", generator)] = (0.0, 0)
        choice = f"no mix kept {fs} accuracy within max_drop={cfg.max_drop:g}: no image used; tried {tries}"
        return Fit(ctx.data.fit(), 0.0, 0, choice, generator=generator)
    head, n = fitted[chosen]
    choice = f"chose lambda={chosen[0]:g} k={chosen[1]} on {fs}; tried {tries}"
    return Fit(head, chosen[0], n, choice, generator=generator)


def search_mix(lambdas, k_max: int, score, base: float, max_drop: float) -> tuple:
    """``(chosen (lambda, k), every (mix, hard, overall) tried, whether it keeps the fit split
    within max_drop)``: lambda at the most images, then fewer images at that lambda; when every
    such mix costs the fit split more than ``max_drop``, gentler ones (:func:`_gentler`)."""
    lam, tried = choose([(x, k_max) for x in lambdas], score, base, max_drop)
    chosen, tried2 = choose([lam, (lam[0], max(1, k_max // 2))], score, base, max_drop)
    tried += tried2[1:]
    if all(o < base - max_drop for _, _, o in tried):
        # a head with few classes moves far on a few images: a smaller weight, fewer images,
        # before giving up on these images
        chosen, tried3 = choose(_gentler(min(lambdas), k_max), score, base, max_drop)
        tried += tried3
    return chosen, tried, any(o >= base - max_drop for _, _, o in tried)


def _gentler(lam: float, k: int) -> list[tuple[float, int]]:
    """Mixes gentler than the gentlest of ``[mitigate] lambdas``: a half and a quarter of its
    weight, with all and a quarter of the images per caption."""
    return [(lam * f, n) for f in (0.5, 0.25) for n in dict.fromkeys((k, max(1, k // 4)))]


@method("synthetic_cluster")
def synthetic_cluster(ctx: MethodContext) -> list[Fit]:
    """Per generator, the cluster's one shared set, at the model's own choice of lambda and
    images per caption."""
    out = []
    for g, sets in ctx.task.cluster_sets.items():
        if not sets:
            continue
        lam, k = ctx.chosen.get(("synthetic", g)) or (
            ctx.data.cfg.lambdas[0],
            int(ctx.data.setting.k),
        )
        if k == 0:  # the model's own images of this generator did not help: neither do these
            out.append(
                Fit(
                    ctx.data.fit(),
                    0.0,
                    0,
                    "no image used (as for the model's own set)",
                    ctx.task.cluster,
                    g,
                )
            )
            continue
        head, n = _fit_set(ctx, sets, lam, k)
        choice = f"lambda={lam:g} k={k} as chosen for the model's own set"
        out.append(Fit(head, lam, n, choice, ctx.task.cluster, generator=g))
    return out


def _pool(ctx: MethodContext, pick: Callable[[object, np.ndarray, int], np.ndarray]) -> Fit | None:
    """K pool images per hard class, chosen by ``pick(hard class, its pool rows, K)``, weight 1."""
    if "pool" not in ctx.data.F or not ctx.task.hard:
        return None
    K, pool_y = int(ctx.data.cfg.pool_k), ctx.data.Y["pool"]
    parts = [pick(hc, np.flatnonzero(pool_y == hc.cls), K) for hc in ctx.task.hard]
    idx = np.unique(np.concatenate(parts))
    head = ctx.data.fit(ctx.data.F["pool"][idx], pool_y[idx], w_add=np.ones(len(idx)))
    return Fit(head, 0.0, len(idx), f"K={K} per hard class from pool")


@method("pool_direction")
def pool_direction(ctx: MethodContext) -> Fit | None:
    return _pool(ctx, lambda hc, in_c, K: hc.pool_order[:K])


@method("pool_random")
def pool_random(ctx: MethodContext) -> Fit | None:
    return _pool(ctx, lambda hc, in_c, K: in_c[select_random(len(in_c), K, seed=hc.cls)])


@method("pool_confidence")
def pool_confidence(ctx: MethodContext) -> Fit | None:
    return _pool(ctx, lambda hc, in_c, K: in_c[select_lowest(ctx.data.conf["pool"][in_c], K)])


@method("upweight")
def upweight(ctx: MethodContext) -> Fit | None:
    if not ctx.task.hard:
        return None
    cfg, fs = ctx.data.cfg, ctx.data.setting.fit_split
    K, w = int(cfg.pool_k), float(cfg.upweight)
    idx = np.unique(np.concatenate([hc.fit_order[:K] for hc in ctx.task.hard]))
    head = ctx.data.fit(ctx.data.F[fs][idx], ctx.data.Y[fs][idx], w_add=np.full(len(idx), w))
    return Fit(head, 0.0, len(idx), f"K={K} per hard class from {fs}, weight {w:g}")
