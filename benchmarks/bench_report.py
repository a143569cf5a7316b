"""How long the HTML report takes, and how large it is, for a run of 40 models x 1,000 classes.

Builds a synthetic run directory of that shape (``_synthetic_run.make_run``: a Parquet dataset
of small PNGs, predictions, accuracy per class and attribute value, overlap, clusters,
directions with captions and nearest-image checks for a share of the classes, embeddings,
synthetic sets), then times ``write_report`` on it (read through ``RunView``): a first build
and a rebuild (the rebuild replaces the old pages). The targets are under 60 s on 2 cores and
under 50 MB.

    python benchmarks/bench_report.py                       # 40 x 1,000
    python benchmarks/bench_report.py --models 12 --classes 100 --keep /tmp/bench-run
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from _common import machine_line
from _synthetic_run import make_run


def tree_bytes(path: str) -> tuple[int, int, int]:
    """``(files, bytes, bytes allocated on disk)`` under ``path``."""
    n = size = disk = 0
    for d, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(d, f))
            n, size, disk = n + 1, size + st.st_size, disk + st.st_blocks * 512
    return n, size, disk


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=40)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument(
        "--per-class",
        type=int,
        default=10,
        help="images per class in each of the config's fit and eval splits",
    )
    p.add_argument("--families", type=int, default=8)
    p.add_argument("--dim", type=int, default=128, help="embedding dimension")
    p.add_argument(
        "--keep",
        default=None,
        help="build the run here and keep it (default: a temporary directory)",
    )
    a = p.parse_args(argv)

    from audit.report import write_report
    from audit.view import RunView

    root = a.keep or tempfile.mkdtemp(prefix="bench-report-")
    try:
        t0 = time.perf_counter()
        run = make_run(root, a.models, a.classes, a.per_class, a.families, a.dim)
        made = time.perf_counter() - t0
        _, run_size, _ = tree_bytes(run)
        print(machine_line())
        print(
            f"synthetic run: {a.models} models x {a.classes:,} classes, {2 * a.classes * a.per_class:,} images, "
            f"{run_size / 1e6:.0f} MB, made in {made:.1f}s"
        )
        out = os.path.join(root, "report")
        for what in ("first build", "rebuild"):
            res = write_report(RunView.open(run), out)
            n_files, size, disk = tree_bytes(out)
            ok = res.seconds < 60 and disk < 50e6
            print(
                f"{what:12s} {res.seconds:6.1f}s  {size / 1e6:6.1f} MB in {n_files:,} files ({disk / 1e6:.1f} MB on disk) "
                f"({res.n_models} model pages, {res.n_clusters} cluster pages)  "
                f"{'within' if ok else 'OVER'} the limits (60 s, 50 MB)"
            )
        if a.keep:
            print(f"report: {res.index}")
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
