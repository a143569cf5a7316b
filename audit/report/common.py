"""What every page of the report shares: small formatting helpers, page names and the
Jinja2 environment."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from audit.report.images import _safe

NAV = [
    ("index.html", "Overview", "index"),
    ("shared.html", "Shared failures", "shared"),
    ("cards.html", "Models & clusters", "cards"),
    ("sets.html", "Synthetic sets", "sets"),
]
#: the page of ``zoo-audit fix``, in the header only when the run has ``transfer.parquet``
TRANSFER_NAV = ("transfer.html", "Fixing new members", "transfer")
METRIC_LABELS = {
    "jaccard": "Jaccard overlap",
    "shared_fraction": "shared fraction of errors",
    "error_consistency": "error consistency",
}
DIRECTION_COLUMNS = [
    *("scope", "class", "class_index", "mode", "status", "cv_score"),
    *("ci_low", "ci_high", "p_value", "n_errors", "n_correct"),
]
MARKER = "<!-- zoo-audit report -->"


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
    from audit.naming import BEYOND_EARLIER

    env.globals["BEYOND_EARLIER"] = BEYOND_EARLIER
    return env


def _cluster_title(scope: str, members: list[str], families: Mapping[str, str]) -> str:
    fams = sorted({families.get(m, "?") for m in members})
    return f"Cluster {scope.split(':', 1)[1]} ({', '.join(fams)})"


def _page(scope: str) -> str:
    return (
        f"clusters/{_safe(scope.replace(':', '-'))}.html"
        if scope.startswith("cluster:")
        else f"models/{_safe(scope)}.html"
    )
