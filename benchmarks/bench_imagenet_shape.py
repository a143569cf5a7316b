"""The audit's stages after the sweep at ImageNet shape, without running any backbone.

A run directory of M models x N debug and N eval examples x C classes (and a train subset of
3 per class and a pool of 5 per class) is written by ``_imagenet_run``: each model's
penultimate features (1,280- or 2,048-d) and predictions come from planted class blobs and
the calibrated head, with planted failure groups (each hard class's images "on snow") that
half of the zoo shares; the joint embedder is ``bench`` (512-d, a word-sum text side, so
captions from the ``background`` attribute name the modes). The real runner
(:func:`audit.pipeline.runner.run_pipeline`) then runs every stage, with a sweeper that reads
each image's row from its colour (:class:`_imagenet_run.IndexSweeper`) and the project's
retrieval generator over the pool split; generate, classify, mitigate, confirm and report
all run. Per stage: wall time, peak RSS (a thread sampling /proc/self/statm every 20 ms:
the stage's peak above the RSS it started at, and the process's peak) and a check against
the planted answer. Then a projection to the full shape on N cores and G GPUs.

    python benchmarks/bench_imagenet_shape.py --models 4 --classes 100 --examples 5000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import warnings

import _imagenet_run as ir
import numpy as np
from _common import machine_line

AFTER_SWEEP = (
    "accuracy stats embed directions name generate classify mitigate confirm report".split()
)


class RssSampler(threading.Thread):
    """Samples the process's resident set every ``period`` seconds into ``(time, bytes)``."""

    def __init__(self, period: float = 0.02):
        super().__init__(daemon=True)
        self.period, self.samples, self.stop = period, [], threading.Event()
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def run(self):
        while not self.stop.is_set():
            self.samples.append((time.perf_counter(), self.rss()))
            time.sleep(self.period)

    def window(self, t0: float, t1: float) -> tuple[float, float]:
        """``(peak above the RSS at t0, peak)`` in MiB over ``[t0, t1]``."""
        inside = [b for t, b in self.samples if t0 <= t <= t1] or [self.rss()]
        before = [b for t, b in self.samples if t <= t0] or inside[:1]
        return (max(inside) - before[-1]) / 2**20, max(inside) / 2**20


def make_inputs(root: str, shape: ir.RunShape, workers: int = 1):
    """``(store, inputs)``: the dataset written, the config and services built."""
    from audit.data.readers import read_dataset
    from audit.pipeline.config import AuditConfig
    from audit.pipeline.executor import ThreadExecutor
    from audit.pipeline.inputs import RunInputs, Services, table_key
    from audit.store import RunStore
    from audit.synthetic import RetrievalSetGenerator
    from audit.zoo.spec import ZooSpec

    ir.register()
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "data.parquet")
    ir.write_dataset(path, shape, ir.rows(shape))
    cfg = AuditConfig(
        data={"path": path, "attributes": ["background"]}
        | {"attribute_templates": {"background": "{noun} on {value}"}},
        directions={"embedder": ir.embedder_name(shape)},
        generate={"backend": "retrieval"},
    )
    data = read_dataset(path)
    store = RunStore(os.path.join(root, "run"))
    gens: dict = {}

    def generator_for(backend: str):
        return gens.setdefault(backend, RetrievalSetGenerator(store, cfg, data=data))

    services = Services(ThreadExecutor(workers), ir.IndexSweeper(shape), None, generator_for)
    zoo = ZooSpec("bench-imagenet-shape", ir.model_specs(shape))
    return store, RunInputs(cfg, data, table_key(data), None, zoo, services)


def run_stages(store, inputs) -> tuple[dict, RssSampler]:
    """Every stage through the real runner; ``{stage: (seconds, MiB above start, peak MiB,
    line)}`` from the manifest and the sampler (a stage's window ends at its console line)."""
    from audit.pipeline.runner import run_pipeline

    marks: list[tuple[str, float]] = []

    def console(line: str) -> None:
        marks.append((line.split()[0], time.perf_counter()))
        print(line, flush=True)

    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    out = run_pipeline(store, inputs, console=console)
    sampler.stop.set()
    if out.failed:
        print(f"FAILED: {out.failed}")
    stages = store.manifest()["stages"]
    per, start = {}, t0
    for name, t in marks:
        rec = stages.get(name, {})
        per[name] = (rec.get("seconds", t - start), *sampler.window(start, t), rec.get("line", ""))
        start = t
    return per, sampler


def _table(store, name: str):
    return store.read_table(name).to_pylist() if store.exists(name) else []


def check_found(store, shape: ir.RunShape, specs) -> str:
    """Significant directions on the planted classes: in the failing models (should be all)
    and in the others (should be few)."""
    hard = {shape.class_name(int(c)) for c in shape.hard}
    ok = {
        (r["scope"], r["class"]) for r in _table(store, "directions.parquet") if r["status"] == "ok"
    }
    fails = [s.name for s in specs if shape.fails(int(s.kwargs["m"]))]
    others = [s.name for s in specs if s.name not in fails]
    found = sum((m, c) in ok for m in fails for c in hard)
    false = sum((m, c) in ok for m in others for c in hard)
    n_ok = len(ok)
    return (
        f"planted classes significant in {found}/{len(fails) * len(hard)} failing-model pairs, "
        f"{false}/{len(others) * len(hard)} in the others; {n_ok} significant directions in all"
    )


def check_named(store, shape: ir.RunShape) -> str:
    hard = {shape.class_name(int(c)) for c in shape.hard}
    modes = [r for r in _table(store, "modes.parquet") if r["class"] in hard and r["named"]]
    snow = sum(ir.FAILING in (r["caption"] or "") for r in modes)
    return f"{len(modes)} named modes on the planted classes, {snow} of them '... on {ir.FAILING}'"


def check_mitigated(store) -> str:
    """Mean gain on the planted groups (eval = planted), per method, in points."""
    rows = [r for r in _table(store, "mitigation.parquet") if r["eval"] == "planted"]
    if not rows:
        return "no planted-group row in mitigation.parquet"
    gains: dict[str, list] = {}
    for r in rows:
        gains.setdefault(r["method"], []).append(r["gain"])
    show = ", ".join(f"{m} {np.nanmean(g) * 100:+.1f}" for m, g in sorted(gains.items()))
    n = len({(r["model"], r["class"]) for r in rows})
    return f"planted-group gain (points) over {n} model x class groups: {show}"


def check_confirmed(store) -> str:
    rows = _table(store, "confirmations.parquet")
    ok = sum(bool(r.get("confirmed")) for r in rows)
    return f"{ok} of {len(rows)} named captions confirmed by generation"


#: stage -> (what its cost grows with, what runs it in parallel: "cores", "gpus" or "serial")
SCALING = {
    # per model, one pass over each class's slice of the rows
    "accuracy": ("M x N (a pass over each class's rows)", "serial"),
    "stats": ("M^2 x N", "serial"),
    "embed": ("N (here decode + lookup; a real embedder: its forward)", "gpus"),
    # the SVMs are M x N (each class's rows); the captions' image grounding scores the
    # neighbours it reads (it scored all N fit rows per direction: M x N x C)
    "directions": ("M x N (per-class SVMs; grounding on the neighbours read)", "serial"),
    "name": ("M x C", "serial"),
    "generate": ("M x H (named modes; retrieval over the pool)", "serial"),
    "classify": ("M x generated images (here lookup; real: forward)", "gpus"),
    "mitigate": ("M x C (one head per model; an upper bound: [mitigate] head_classes)", "cores"),
    "confirm": ("M x H", "serial"),
    "report": ("M x C", "serial"),
}


def _units(stage: str, m: int, n: int, c: int) -> float:
    grows = SCALING[stage][0].split(" (")[0]
    h = max(2, c // 100)
    return {
        "M x N x C": m * n * c,
        "M x N": m * n,
        "M^2 x N": m * m * n,
        "N": n,
        "M x C": m * c,
        "M x H": m * h,
        "M x generated images": m * h,
    }[grows]


def projection(per: dict, shape, target, cores: int, gpus: int, workers: int) -> None:
    """Each stage's measured time scaled by its units to ``target`` and by the parallelism
    it ran with here (``workers`` threads for per-model stages) over the one it would get."""
    print(
        f"\nprojection to {target.models}x{target.examples}x{target.classes} on {cores} cores, "
        f"{gpus} GPUs (measured here in 1 process, per-model stages on {workers} threads):"
    )
    total = 0.0
    for st in AFTER_SWEEP:
        if st not in per:
            continue
        grows, par = SCALING[st]
        u0 = _units(st, shape.models, shape.examples, shape.classes)
        u1 = _units(st, target.models, target.examples, target.classes)
        ways = {"cores": min(cores, target.models), "gpus": max(1, gpus), "serial": 1}[par]
        here = min(workers, shape.models) if par == "cores" else 1
        s = per[st][0] * u1 / u0 * here / ways
        total += s
        print(f"  {st:<11s} {s:9.1f} s   grows with {grows}; parallel over {par} ({ways})")
    print(f"  {'total':<11s} {total:9.1f} s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=40)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--examples", type=int, default=50_000, help="debug and eval images each")
    ap.add_argument("--cores", type=int, default=16, help="for the projection")
    ap.add_argument("--gpus", type=int, default=1, help="for the projection")
    ap.add_argument("--workers", type=int, default=1, help="threads for per-model stages")
    ap.add_argument("--out", default="", help="run root (default: a temporary directory)")
    a = ap.parse_args(argv)
    # one line per class with a single failing image, from the directions' 2-fold CV
    warnings.filterwarnings("ignore", message="The least populated class in y")
    shape = ir.RunShape(a.models, a.examples, a.classes)
    print(machine_line("numpy", "sklearn", "torch"))
    print(f"load average {os.getloadavg()[0]:.2f}; shape {shape}; sizes {shape.sizes}")
    print("peak memory: RSS sampled every 20 ms (/proc/self/statm); +MiB above the stage's start")
    with tempfile.TemporaryDirectory() as tmp:
        root = a.out or tmp
        t = time.perf_counter()
        store, inputs = make_inputs(root, shape, a.workers)
        print(f"dataset written in {time.perf_counter() - t:.1f} s; running the stages:")
        per, sampler = run_stages(store, inputs)
        report(per, store, shape, inputs, sampler)
        projection(per, shape, ir.RunShape(), a.cores, a.gpus, a.workers)
        after = sum(per[s][0] for s in AFTER_SWEEP if s in per)
        peak = max(per[s][2] for s in AFTER_SWEEP if s in per)
        name = f"{shape.models}x{shape.examples}x{shape.classes}"
        print(f"imagenet-shape {name}: after-sweep {after:.1f} s, peak {peak:.0f} MiB")


def report(per: dict, store, shape: ir.RunShape, inputs, sampler) -> None:
    checks = {
        "directions": check_found(store, shape, list(inputs.zoo)),
        "name": check_named(store, shape),
        "mitigate": check_mitigated(store),
        "confirm": check_confirmed(store),
        "report": f"report/index.html written: {store.exists('report/index.html')}",
    }
    print(f"\n{'stage':<11s} {'seconds':>8s} {'+MiB':>7s} {'peak MiB':>9s}  check")
    for st, (s, up, peak, line) in per.items():
        print(f"{st:<11s} {s:8.1f} {up:7.0f} {peak:9.0f}  {checks.get(st, line)}")


if __name__ == "__main__":
    sys.exit(main())
