"""The static HTML report of a run: ``build_report(run_dir, out_dir=None) -> path of index.html``.

Pure (no Ray, no Serve): it reads the run directory (and the dataset its manifest names,
for real images) and writes an offline folder of pages, figures and thumbnails: overview,
shared failures, one card per model and per cluster, synthetic sets. Jinja2 and matplotlib
load inside the functions that use them.
"""

from audit.report.build import ReportResult, build_report, report_stage, write_report

__all__ = ["ReportResult", "build_report", "report_stage", "write_report"]
