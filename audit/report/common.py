"""What every page of the report shares: options, the run's tables read once, small
formatting helpers and the Jinja2 environment."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from audit.report.images import _safe
from audit.store import RunStore

log = logging.getLogger(__name__)

NAV = [
    ("index.html", "Overview", "index"),
    ("shared.html", "Shared failures", "shared"),
    ("cards.html", "Models & clusters", "cards"),
    ("sets.html", "Synthetic sets", "sets"),
]
METRIC_LABELS = {
    "jaccard": "Jaccard overlap",
    "shared_fraction": "shared fraction of errors",
    "error_consistency": "error consistency",
}
DIRECTION_COLUMNS = [
    "scope",
    "class",
    "class_index",
    "mode",
    "status",
    "cv_score",
    "ci_low",
    "ci_high",
    "p_value",
    "n_errors",
    "n_correct",
]
MARKER = "<!-- zoo-audit report -->"
#: the pipeline's stage order (audit.pipeline.runner.default_stages); others follow by time
STAGE_ORDER = (
    "train",
    "sweep",
    "accuracy",
    "stats",
    "embed",
    "directions",
    "generate",
    "mitigate",
    "report",
)


@dataclass(frozen=True)
class ReportOptions:
    """The ``[report]`` knobs (``audit.pipeline.config.ReportSection`` carries the same fields)."""

    max_modes: int = 12  # failure modes per card shown with image grids (strongest first)
    images: int = 8  # real images per grid (hardest and easiest), generated images per mode
    max_rows: int = 200  # rows per table on a card (worst first)
    max_set_images: int = 240  # thumbnails per synthetic set on the sets page
    max_index_rows: int = 5000  # failure modes listed on the cards page (strongest first)
    thumb_size: int = 64  # pixels; larger images are scaled down to JPEG

    @classmethod
    def of(cls, cfg) -> ReportOptions:
        if cfg is None:
            return cls()
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__ if hasattr(cfg, k)})


@dataclass(frozen=True)
class ReportResult:
    index: str  # path of index.html
    n_models: int
    n_clusters: int
    n_bytes: int
    seconds: float

    def line(self) -> str:
        return (
            f"report/index.html: {self.n_models} model pages, {self.n_clusters} cluster pages, "
            f"{self.n_bytes / 1e6:.1f} MB"
        )


# -- small helpers ---------------------------------------------------------------------------
def _f(x) -> float:
    return float("nan") if x is None else float(x)


def _pct(x, digits: int = 1) -> str:
    return (
        "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"
    )


def _env():
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(
        loader=PackageLoader("audit.report", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    nan = lambda x: x is None or (isinstance(x, float) and math.isnan(x))  # noqa: E731
    env.filters.update(
        pct=_pct,
        signed_pct=lambda x: "n/a" if nan(x) else f"{100 * x:+.1f} pts",
        signed=lambda x: "n/a" if nan(x) else f"{x:+.2f}",
        fmt2=lambda x: "n/a" if nan(x) else f"{x:.2f}",
        fmt3=lambda x: "n/a" if nan(x) else (f"{x:.3f}" if x >= 0.001 else f"{x:.1e}"),
        num=lambda x: f"{x:,}" if isinstance(x, int) else x,
        when=lambda t: str(t or "").replace("T", " ").replace("+00:00", " UTC"),
        secs=lambda s: (
            "" if s is None else (f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s")
        ),
    )
    return env


def _bootstrap_mean(
    values, n_boot: int = 1000, ci: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean, low, high)`` with a percentile bootstrap over the values (NaN interval below 2 values)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if not v.size:
        return math.nan, math.nan, math.nan
    if v.size < 2:
        return float(v.mean()), math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (n_boot, v.size))].mean(axis=1)
    a = (1 - ci) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def open_dataset(manifest: Mapping):
    """The run's dataset (for real images), or None when it is not on this machine."""
    from audit.data.readers import read_dataset

    data = manifest.get("data", {}) or {}
    cfg = (manifest.get("config", {}) or {}).get("data", {}) or {}
    for p in (data.get("world_dir"), cfg.get("path")):
        if p and "://" not in p and os.path.exists(p):
            try:
                return read_dataset(p)
            except Exception as e:  # noqa: BLE001 - the report goes on without real images
                log.warning("report: cannot open the dataset %s (%s); no real images", p, e)
    return None


class _Run:
    """The run directory's tables, read once (optional ones are None)."""

    def __init__(self, store: RunStore):
        self.store = store
        self.manifest = store.manifest()
        cfg = self.manifest.get("config", {}) or {}
        self.fit_split = (cfg.get("data") or {}).get("split", "debug")
        self.eval_split = (cfg.get("data") or {}).get("eval_split", "test")
        self.metric = (cfg.get("stats") or {}).get("similarity", "jaccard")
        self.method = (cfg.get("stats") or {}).get("method", "average")
        self.k = (cfg.get("directions") or {}).get("k", 50)
        self.embedder = (cfg.get("directions") or {}).get("embedder", "world")
        zoo = self.manifest.get("zoo", {}) or {}
        self.families: dict[str, str] = dict(zoo.get("families") or {})
        self.clusters: dict[str, str] = {}
        t = self.opt("clusters.parquet")
        if t is not None:
            for r in t.to_pylist():
                self.clusters[r["model"]] = f"cluster:{r['cluster']}"
                self.families.setdefault(r["model"], r["family"])
        self.acc = self.opt("accuracy.parquet")
        self.models = [
            m for m in (zoo.get("models") or []) if m in self.clusters or self._has_acc(m)
        ]
        for m in sorted(set(self.clusters) | self._acc_models()):
            if m not in self.models:
                self.models.append(m)
        self.zoo_models = list(zoo.get("models") or [])

    def opt(self, rel: str, columns=None) -> pa.Table | None:
        if not self.store.exists(rel):
            return None
        if columns is not None:
            have = set(self._schema(rel).names)
            columns = [c for c in columns if c in have]
        return self.store.read_table(rel, columns=columns)

    def _schema(self, rel: str) -> pa.Schema:
        import pyarrow.parquet as pq

        with self.store.fs.open_input_file(self.store.path(rel)) as f:
            return pq.read_schema(f)

    def _acc_models(self) -> set[str]:
        return set(self.acc["model"].to_pylist()) if self.acc is not None else set()

    def _has_acc(self, m: str) -> bool:
        return m in self._acc_models()


def _cluster_title(scope: str, members: list[str], families: Mapping[str, str]) -> str:
    fams = sorted({families.get(m, "?") for m in members})
    return f"Cluster {scope.split(':', 1)[1]} ({', '.join(fams)})"


def _page(scope: str) -> str:
    return (
        f"clusters/{_safe(scope.replace(':', '-'))}.html"
        if scope.startswith("cluster:")
        else f"models/{_safe(scope)}.html"
    )
