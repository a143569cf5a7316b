"""The report's figures (matplotlib, Agg backend, PNG bytes): the overlap heatmap ordered by
the dendrogram, the dendrogram coloured by family, within- vs between-family similarity
and error consistency with intervals. Pure functions over arrays; matplotlib is imported
inside them so ``import audit.report`` stays quick."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def family_colors(families: Sequence[str]) -> dict[str, str]:
    """One colour per family (tab10, then tab20), in sorted family order."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    names = sorted(set(families))
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {f: to_hex(cmap(i % cmap.N)) for i, f in enumerate(names)}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def linkage_order(
    similarity: np.ndarray, method: str = "average"
) -> tuple[np.ndarray | None, np.ndarray]:
    """``(linkage matrix or None, leaf order [M])`` of hierarchical clustering on 1 - similarity."""
    from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
    from scipy.spatial.distance import squareform

    s = np.asarray(similarity, np.float64)
    m = len(s)
    if m < 3:
        return None, np.arange(m)
    d = np.clip(1.0 - (s + s.T) / 2, 0.0, None)
    np.fill_diagonal(d, 0.0)
    y = squareform(d, checks=False)
    z = linkage(y, method=method)
    z = optimal_leaf_ordering(z, y)
    return z, leaves_list(z)


def heatmap_png(
    similarity: np.ndarray,
    names: Sequence[str],
    order: np.ndarray,
    families: Mapping[str, str],
    clusters: Mapping[str, str],
    label: str,
) -> bytes:
    """``similarity [M, M]`` as a heatmap in ``order``; ticks coloured by family, clusters outlined."""
    plt = _plt()
    from matplotlib.patches import Rectangle

    m = len(names)
    s = np.asarray(similarity, np.float64)[np.ix_(order, order)].copy()
    np.fill_diagonal(s, np.nan)
    ordered = [names[i] for i in order]
    size = min(max(5.5, 0.26 * m + 3.0), 15.0)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    off = s[~np.isnan(s)]
    vmax = float(np.nanmax(off)) if off.size else 1.0
    im = ax.imshow(s, cmap="magma_r", vmin=0.0, vmax=max(vmax, 1e-6), interpolation="nearest")
    colors = family_colors([families.get(n, "") for n in names])
    fs = 9 if m <= 24 else max(4, int(9 - (m - 24) / 6))
    ax.set_xticks(range(m), ordered, rotation=90, fontsize=fs)
    ax.set_yticks(range(m), ordered, fontsize=fs)
    for lab in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
        lab.set_color(colors.get(families.get(lab.get_text(), ""), "black"))
    if m <= 16:
        _annotate_cells(ax, s, vmax)
    _outline_clusters(ax, [clusters.get(n) for n in ordered])
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    cb.set_label(label)
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(
        handles,
        list(colors),
        title="family",
        loc="upper left",
        bbox_to_anchor=(1.25, 1.0),
        fontsize=8,
        frameon=False,
    )
    ax.set_title(f"Failure overlap ({label}) between models", fontsize=11)
    return _png(fig)


def _annotate_cells(ax, s: np.ndarray, vmax: float) -> None:
    """Write each off-diagonal value of ``s [M, M]`` in its cell (light text on dark cells)."""
    m = len(s)
    for i in range(m):
        for j in range(m):
            if i != j and not np.isnan(s[i, j]):
                ax.text(
                    j,
                    i,
                    f"{s[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if s[i, j] > 0.6 * vmax else "black",
                )


def _outline_clusters(ax, cl: Sequence[str | None]) -> None:
    """Outline runs of the same cluster along the diagonal (``cl``: cluster per row, in order)."""
    from matplotlib.patches import Rectangle

    m = len(cl)
    start = 0
    for i in range(1, m + 1):
        if i == m or cl[i] != cl[start]:
            if cl[start] is not None:
                ax.add_patch(
                    Rectangle(
                        (start - 0.5, start - 0.5),
                        i - start,
                        i - start,
                        fill=False,
                        lw=2,
                        ec="black",
                    )
                )
            start = i


def dendrogram_png(
    z: np.ndarray | None, names: Sequence[str], families: Mapping[str, str], label: str
) -> bytes:
    """The dendrogram of linkage ``z`` over ``names``, leaves coloured by family; y = similarity."""
    plt = _plt()
    from matplotlib.patches import Rectangle
    from scipy.cluster.hierarchy import dendrogram

    m = len(names)
    colors = family_colors([families.get(n, "") for n in names])
    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.28 * m + 2.5), 16.0), 3.8))
    if z is None:
        ax.text(
            0.5,
            0.5,
            "fewer than 3 models: no tree",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.set_axis_off()
        return _png(fig)
    d = dendrogram(
        z,
        labels=list(names),
        ax=ax,
        color_threshold=0,
        above_threshold_color="#555555",
        leaf_rotation=90,
        leaf_font_size=9 if m <= 24 else 6,
    )
    for lab in ax.get_xticklabels():
        lab.set_color(colors.get(families.get(lab.get_text(), ""), "black"))
    xs = 5 + 10 * np.arange(m)
    ax.scatter(
        xs,
        np.zeros(m),
        c=[colors.get(families.get(n, ""), "black") for n in d["ivl"]],
        s=40,
        zorder=3,
        clip_on=False,
    )
    ticks = ax.get_yticks()
    ax.set_yticks(ticks, [f"{1 - t:.2f}" for t in ticks])
    ax.set_ylabel(f"{label} at which\nthe groups join")
    ax.spines[["top", "right"]].set_visible(False)
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(
        handles,
        list(colors),
        title="family",
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
        frameon=False,
    )
    return _png(fig)


def family_png(rows: Sequence[Mapping], label: str) -> bytes:
    """Per family: within-family and between-family similarity (pairs as dots, mean with interval).

    ``rows``: dicts with family, within (list of pair values), between (list), and
    within_mean/lo/hi, between_mean/lo/hi (NaN when undefined).
    """
    plt = _plt()
    fams = [r["family"] for r in rows]
    colors = family_colors(fams)
    fig, ax = plt.subplots(figsize=(6.4, max(2.2, 0.55 * len(rows) + 1.2)))
    rng = np.random.default_rng(0)
    for i, r in enumerate(rows):
        for dy, key, col, mk in (
            (-0.16, "within", colors[r["family"]], "o"),
            (0.16, "between", "#888888", "s"),
        ):
            vals = np.asarray(r[key], float)
            if vals.size:
                ax.scatter(
                    vals,
                    i + dy + rng.uniform(-0.05, 0.05, vals.size),
                    s=8,
                    color=col,
                    alpha=0.35,
                    lw=0,
                )
            mean, lo, hi = r[f"{key}_mean"], r[f"{key}_lo"], r[f"{key}_hi"]
            if np.isfinite(mean):
                err = [[mean - lo], [hi - mean]] if np.isfinite(lo) else None
                ax.errorbar(
                    [mean],
                    [i + dy],
                    xerr=err,
                    fmt=mk,
                    color=col,
                    mec="black",
                    ms=7,
                    capsize=3,
                    lw=1.5,
                )
    ax.set_yticks(range(len(rows)), fams)
    for lab in ax.get_yticklabels():
        lab.set_color(colors.get(lab.get_text(), "black"))
    ax.invert_yaxis()
    ax.set_xlabel(label)
    ax.errorbar([], [], fmt="o", color="#444444", label="within the family")
    ax.errorbar([], [], fmt="s", color="#888888", label="with other families")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def consistency_png(
    value: np.ndarray, lo: np.ndarray, hi: np.ndarray, same_family: np.ndarray
) -> bytes:
    """Error consistency of every model pair, sorted, with intervals; same-family pairs in red."""
    plt = _plt()
    order = np.argsort(value)
    v, lo, hi, same = (np.asarray(a)[order] for a in (value, lo, hi, same_family))
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = np.arange(len(v))
    for mask, col, lab in (
        (~same, "#9e9e9e", "different families"),
        (same, "#c62828", "same family"),
    ):
        if mask.any():
            ax.errorbar(
                x[mask],
                v[mask],
                yerr=[v[mask] - lo[mask], hi[mask] - v[mask]],
                fmt="o",
                ms=3,
                color=col,
                ecolor=col,
                elinewidth=0.8,
                alpha=0.9,
                label=lab,
            )
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("model pairs, sorted")
    ax.set_ylabel("error consistency (κ)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)
