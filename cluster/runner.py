"""The composition root: ``run_audit`` builds the services (Ray executor, Ray shard
sweeper, the Serve generation app) and runs the one audit pipeline of ``audit.pipeline``.

``zoo-audit demo`` is ``zoo-audit run configs/audit/demo.toml --out runs/demo``; both land
here. Ray is connected once per run, and only when a stage has work for it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from audit.pipeline.config import AuditConfig, load_config
from audit.pipeline.inputs import RunInputs, Services, load_inputs
from audit.pipeline.runner import RunOutcome, StageFailed, run_pipeline
from audit.store import RunStore
from cluster.generate import check_backends


class _LazyRay:
    """Connects to Ray the first time a stage asks for parallel work; shuts down at the end."""

    def __init__(self, cfg: AuditConfig, address: str | None, verbose: bool, log_dir: str | None):
        self.cfg, self.address, self.verbose, self.log_dir = cfg, address, verbose, log_dir
        self.connected = self.owned = False

    def ensure(self) -> None:
        from cluster.runtime import connect

        if not self.connected:
            self.owned = connect(
                self.address,
                self.cfg.ray.num_cpus or None,
                verbose=self.verbose,
                log_dir=self.log_dir,
            )
            self.connected = True

    def close(self) -> None:
        if self.owned:
            from cluster.runtime import shutdown

            shutdown()


class _OnRay:
    """Wraps an executor / sweeper / generator so that Ray starts only when it is used."""

    def __init__(self, ray: _LazyRay, make: Callable[[], Any]):
        self._ray, self._make, self._obj = ray, make, None

    def _get(self):
        if self._obj is None:
            self._ray.ensure()
            self._obj = self._make()
        return self._obj

    @property
    def parallelism(self) -> int:
        return self._get().parallelism

    def map(self, *a, **k):
        return self._get().map(*a, **k)

    def run(self, *a, **k):
        return self._get().run(*a, **k)

    def request_sets(self, *a, **k):
        return self._get().request_sets(*a, **k)


def ray_services(
    cfg: AuditConfig,
    store: RunStore,
    world_dir: str | None,
    ray: _LazyRay,
    progress: bool,
    data=None,
) -> Services:
    """Ray's executor and sweeper, and the run's generator: the Serve app (through its handle,
    on Ray) for a world or configured diffusion weights, else the audit's retrieval (no Ray),
    or the service at ``[generate] url`` (see :func:`cluster.generate.choose_generator`).
    ``data``: the run's dataset, already loaded (retrieval draws its pool from it)."""
    from cluster.executor import RayExecutor
    from cluster.generate import ChosenGenerator, ServeSetGenerator, choose_generator
    from cluster.sweep import RaySweeper

    r = cfg.ray

    def sweeper():
        return RaySweeper(
            r.num_cpu_workers,
            r.threads_per_worker or None,
            r.gpus,
            r.max_restarts,
            progress=progress,
        )

    def on_serve(backend: str) -> _OnRay:
        # ray.owned is known once Ray is up: a run that owns its Ray leaves Serve to its shutdown
        return _OnRay(
            ray,
            lambda: ServeSetGenerator(backend, store.uri, world_dir, shutdown_serve=not ray.owned),
        )

    chosen: dict[str, ChosenGenerator] = {}

    def generator_for(backend: str) -> ChosenGenerator:
        if backend not in chosen:
            chosen[backend] = ChosenGenerator(
                lambda: choose_generator(cfg, store, world_dir, on_serve, data, backend)
            )
        return chosen[backend]

    return Services(
        executor=_OnRay(ray, RayExecutor),
        sweeper=_OnRay(ray, sweeper),
        generator=generator_for(cfg.generate.backend),
        generator_for=generator_for,
        progress=progress,
    )


def check_run_dir(store: RunStore, key: str, resume: bool) -> str:
    """``"new"``, ``"finished"`` or ``"resume"``; a run of another config needs ``--resume``."""
    m = store.manifest()
    if not m.get("stages"):
        return "new"
    if m.get("config_key") != key and not resume:
        raise ValueError(
            f"run directory {store.uri} holds a run of another config; rerun with --resume to reuse what "
            "still matches (only changed stages run), or choose a new --out"
        )
    return "finished" if m.get("status") == "done" and m.get("config_key") == key else "resume"


def check_out(out: str) -> str:
    """``--out`` must name a directory we can write (checked before any work starts)."""
    if not out or not out.strip():
        raise ValueError("--out is empty; name a run directory, e.g. --out runs/audit")
    if "://" in out:
        return check_uri(out)
    if os.path.isfile(out):
        raise ValueError(f"--out {out!r} is an existing file; name a directory")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(
            f"--out {out!r}: {parent} is a file, not a directory; choose another --out"
        )
    if not os.access(parent, os.W_OK):
        raise ValueError(
            f"--out {out!r}: {parent} is not writable; choose a directory you can write"
        )
    return out


_CREDENTIALS = {
    "s3": "AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and AWS_REGION",
    "gs": "Google credentials (GOOGLE_APPLICATION_CREDENTIALS=KEY.json)",
}


def check_uri(out: str, timeout_s: float | None = None) -> str:
    """An ``--out`` URI must take a write within ``timeout_s`` (``$ZOO_AUDIT_STORE_TIMEOUT_S``, 20 s):
    missing credentials or an unreachable store is one line before any work, not a hang."""
    import threading

    timeout_s = float(
        timeout_s if timeout_s is not None else os.environ.get("ZOO_AUDIT_STORE_TIMEOUT_S", 20)
    )
    scheme = out.split("://", 1)[0].lower()
    hint = f"check {_CREDENTIALS.get(scheme, 'its credentials')} and the network"
    result: dict[str, BaseException | None] = {}

    def probe() -> None:
        try:
            store = RunStore(out)
            rel = f".zoo-audit-probe-{os.getpid()}-{threading.get_ident()}"
            store.write_bytes(rel, b"")
            store.delete(rel)
            result["error"] = None
        except BaseException as e:  # noqa: BLE001 - reported below as one line
            result["error"] = e

    t = threading.Thread(
        target=probe, name="check-out-uri", daemon=True
    )  # a hung SDK call is abandoned
    t.start()
    t.join(timeout_s)
    if "error" not in result:
        raise ValueError(
            f"--out {out!r}: no answer from the store in {timeout_s:.0f}s; {hint} "
            "(or raise ZOO_AUDIT_STORE_TIMEOUT_S)"
        )
    if result["error"] is not None:
        e = result["error"]
        raise ValueError(
            f"--out {out!r}: cannot write there ({type(e).__name__}: {str(e).splitlines()[0][:300]}); {hint}"
        )
    return out


def check_ray_cpus(cfg: AuditConfig, address: str | None) -> None:
    """``[ray] num_cpus`` (embedded Ray only) may not exceed this machine's cores: Ray would start
    that many workers' worth of scheduling slots and thrash (checked before any work)."""
    n, have = cfg.ray.num_cpus, os.cpu_count() or 1
    joins = address or os.environ.get("RAY_ADDRESS")
    if n and not joins and n > have:
        raise ValueError(
            f"[ray] num_cpus = {n} in {cfg.source or 'the config'}, but this machine has {have} cores; "
            f"use 0 (all cores) or at most {have}"
        )


def _opening(cfg: AuditConfig, store: RunStore, state: str) -> str:
    rel = os.path.relpath(cfg.source)
    shown = cfg.source if rel.startswith("..") else rel
    note = {
        "new": "",
        "finished": " (finished before: only what changed runs)",
        "resume": " (resuming)",
    }
    return f"zoo-audit run {shown} -> {store.uri}{note[state]}"


def _record_inputs(store: RunStore, cfg: AuditConfig, key: str, inputs: RunInputs) -> str:
    """The run's config, versions, data and zoo in the manifest; returns the console's data line."""
    from audit import versions

    data, zoo = inputs.data, inputs.zoo
    store.update_manifest(
        kind="audit",
        config=cfg.model_dump(),
        config_key=key,
        versions=versions(),
        status="running",
        data={"source": cfg.data.path or cfg.data.world_spec, "world_dir": inputs.world_dir}
        | {"key": inputs.data_key, "n": len(data), "classes": data.classes},
        zoo={"name": zoo.name, "path": zoo.path, "models": zoo.names, "families": inputs.families},
    )
    splits = "/".join(sorted(set(data.column("split").tolist())))
    world = " (world)" if inputs.world_dir else ""
    return (
        f"  {'data':<11s} {len(data):,} images, {len(data.classes)} classes, splits {splits}{world}; "
        f"zoo {zoo.name!r}: {len(zoo)} models"
    )


def _closing(store: RunStore, outcome: RunOutcome, seconds: float) -> str:
    line = f"\nrun directory: {store.uri} (summary.txt, manifest.json)  total {seconds:.1f}s"
    if not outcome.failed and store.exists("report/index.html"):
        line += f"\nreport: {store.path('report/index.html')}"
    return line


def run_audit(
    config: str | AuditConfig,
    out: str,
    *,
    address: str | None = None,
    resume: bool = False,
    force: Sequence[str] = (),
    verbose: bool = False,
    overrides: dict | None = None,
    services: Services | None = None,
    console: Callable[[str], None] = print,
) -> tuple[RunStore, RunOutcome]:
    """Run the audit of ``config`` (a path, a shipped name, or a loaded config) into ``out``;
    returns the store and what happened.

    ``services`` replaces the Ray services (tests inject threads and in-process fakes).
    Raises :class:`StageFailed` after recording a failed stage (the CLI prints one line).
    """
    t0 = time.perf_counter()
    cfg = config if isinstance(config, AuditConfig) else load_config(config, overrides)
    check_ray_cpus(cfg, address)
    check_backends(cfg)
    store = RunStore(check_out(out))
    key = _config_key(cfg)
    console(_opening(cfg, store, check_run_dir(store, key, resume)))
    ray = _LazyRay(cfg, address, verbose, store.path("logs") if store.local else None)
    try:
        inputs = load_inputs(cfg)
        if services is None:
            services = ray_services(
                cfg, store, inputs.world_dir, ray, sys.stderr.isatty(), inputs.data
            )
        inputs = RunInputs(
            cfg, inputs.data, inputs.data_key, inputs.world_dir, inputs.zoo, services
        )
        console(_record_inputs(store, cfg, key, inputs))
        outcome = run_pipeline(store, inputs, force=force, console=console)
    finally:
        ray.close()
    if outcome.summary:
        console("\n" + outcome.summary)
    console(_closing(store, outcome, time.perf_counter() - t0))
    if outcome.failed:
        raise outcome.failed
    return store, outcome


def run_fix(
    run: str,
    zoo: str,
    *,
    models: Sequence[str] = (),
    reference: str | None = None,
    address: str | None = None,
    verbose: bool = False,
    services: Services | None = None,
    console: Callable[[str], None] = print,
):
    """``zoo-audit fix``: the new members of ``zoo`` fixed with the audited run's cluster sets
    (:func:`audit.transfer.fix_zoo`). ``reference``: a run directory for a full audit of the new
    members (their own per-model fix, for comparison); audited there first when it holds no
    finished run. Returns the :class:`audit.transfer.FixOutcome`."""
    from audit.transfer import fix_zoo
    from audit.transfer.fix import check_run, member_inputs
    from audit.view import RunView

    t0 = time.perf_counter()
    view = RunView.open(run)
    check_run(view)  # before any work: the run reached the stages a fix reuses
    cfg = view.config
    ref = None
    if reference:
        ref = reference_audit(
            view,
            zoo,
            models,
            reference,
            address=address,
            verbose=verbose,
            services=services,
            console=console,
        )
    ray = _LazyRay(cfg, address, verbose, view.store.path("logs") if view.store.local else None)
    try:
        console(f"zoo-audit fix {view.store.uri} --zoo {zoo}")
        if services is None:
            services = ray_services(cfg, view.store, view.world_dir, ray, sys.stderr.isatty())
        inputs = member_inputs(view, zoo, models, services)
        outcome = fix_zoo(view, inputs, ref, console=console)
    finally:
        ray.close()
    from audit.transfer.summary import fix_summary

    console(fix_summary(outcome))
    tail = f"\ntransfer.parquet in {view.store.uri}  total {time.perf_counter() - t0:.1f}s"
    if cfg.report.enabled:  # the report gains its page on the new members
        from audit.report import write_report

        res = write_report(RunView.open(run))
        tail += f"\nreport: {os.path.join(os.path.dirname(res.index), 'transfer.html')}"
    console(tail)
    return outcome


def reference_audit(
    view, zoo, models, out, *, address=None, verbose=False, services=None, console=print
):
    """The full audit of the new members of ``zoo`` (``models``: those, empty for every one)
    with the audited run's config into ``out`` (resumed when already there): what
    ``zoo-audit fix --reference`` compares each member's shared fix with."""
    from audit.view import RunView

    cfg = view.config
    over = {"manifest": zoo, "models": list(models)}
    ref_cfg = cfg.model_copy(update={"zoo": cfg.zoo.model_copy(update=over)})
    console(f"reference: a full audit of the new members -> {out}")
    run_audit(
        ref_cfg,
        out,
        address=address,
        resume=True,
        verbose=verbose,
        services=services,
        console=lambda s: console("  " + s) if s.strip() else None,
    )
    return RunView.open(out)


def _config_key(cfg: AuditConfig) -> str:
    """The key of a whole config: every section's result-changing fields."""
    from audit.cache import content_hash
    from audit.pipeline.config import SECTIONS

    return content_hash({n: cfg.section(n).key_fields() for n in SECTIONS})


__all__ = ["StageFailed", "run_audit", "run_fix"]
