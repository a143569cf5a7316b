"""Build the static HTML report of a run directory: Jinja2 templates, matplotlib figures,
thumbnails as small files, one page per model and per cluster. It reads the run through
:class:`audit.view.RunView` (and the dataset it names, for real images) and writes only the
report folder, so ``zoo-audit report RUN`` works on any finished or partial run."""

from __future__ import annotations

import time

from audit.pipeline.config import ReportSection
from audit.report.cards import write_cards
from audit.report.common import ReportResult
from audit.report.context import ReportContext
from audit.report.images import Thumbs
from audit.report.overview import write_overview, write_sets
from audit.report.shared import write_shared
from audit.report.site import Site, out_dir_for, take_out_dir
from audit.report.transfer import write_transfer
from audit.store import RunStore
from audit.view import RunView


def write_report(
    run: RunView | RunStore, out_dir: str | None = None, *, opts: ReportSection | None = None
) -> ReportResult:
    """Write the report of ``run`` to ``out_dir`` (default ``RUN/report``); ``opts``: the
    ``[report]`` section (default: the run's own)."""
    t0 = time.perf_counter()
    view = run if isinstance(run, RunView) else RunView.open(run)
    opts = opts or view.config.report
    out = RunStore(out_dir_for(view.store, out_dir))
    take_out_dir(out)
    site = Site(out, view)
    site.static()
    thumbs = Thumbs(out, opts.thumb_size)
    ctx = ReportContext.build(view, opts, thumbs)
    n_model_pages = write_cards(ctx, site)
    write_shared(ctx, site)
    n_synthetic = write_sets(ctx, site)
    write_transfer(ctx, site)
    write_overview(ctx, site, n_synthetic)
    n_bytes = site.n_bytes + thumbs.n_bytes
    seconds = time.perf_counter() - t0
    return ReportResult(out.path("index.html"), n_model_pages, len(ctx.scopes), n_bytes, seconds)


def build_report(run_dir: str, out_dir: str | None = None) -> str:
    """Write the static HTML report of the run at ``run_dir`` (default into ``RUN/report``);
    returns the path of its ``index.html``."""
    return write_report(RunView.open(run_dir), out_dir).index


def report_stage(store: RunStore, inputs, cfg: ReportSection) -> str:
    """Stage: ``report/index.html`` (``[report]`` section). Returns the stage's line."""
    view = RunView(store, inputs.config, data=inputs.data)
    return write_report(view, None, opts=cfg).line()
