"""The one audit: the stages of :data:`audit.pipeline.stages.STAGES` in order, each skipped
when the key of what it reads is unchanged.

A stage is a plain function ``(store, inputs, section) -> line`` (its one console line).
Its *key* hashes its name, its code version and every input it declares in ``reads``
(config sections, the data and zoo keys, the output keys of upstream stages); it is
skipped when the manifest holds that key with status ``done`` and its ``writes`` are in the
run directory. Its *output key* (what downstream stages read) is its key, or, for a stage
that says what it produced (``result``), the key of that. ``force`` redoes a stage and,
through a new output key, every stage that reads it. A failing stage is recorded (manifest
``status = failed`` with the reason, and a row in ``errors.parquet``), every earlier output
stays, and :class:`StageFailed` says what to do; the next run resumes from there. Parallel
work and services reach stages through ``inputs.services`` (injected by
``cluster.runner``: Ray; by tests: threads).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from audit.cache import content_hash
from audit.pipeline.inputs import RunInputs
from audit.pipeline.interrupt import Interrupted, signal_of
from audit.pipeline.stages import STAGES, Stage, check_table, read_value
from audit.store import RunStore

log = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    def __init__(self, stage: str, reason: str):
        super().__init__(f"stage {stage!r} failed: {reason}")
        self.stage, self.reason = stage, reason


@dataclass
class RunOutcome:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: StageFailed | None = None
    summary: str = ""
    seconds: float = 0.0


def _fmt_seconds(s: float) -> str:
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"


def stage_key(st: Stage, inputs: RunInputs, out_keys: dict[str, str | None]) -> str:
    """The key of ``st``: its name, version and the value of everything it reads."""
    return content_hash(st.name, st.version, {r: read_value(r, inputs, out_keys) for r in st.reads})


def _is_current(st: Stage, key: str, store: RunStore, inputs: RunInputs) -> tuple[bool, str]:
    """Whether ``st`` may be skipped, and when its outputs are what stops it, which one."""
    rec = store.manifest().get("stages", {}).get(st.name, {})
    if rec.get("status") != "done" or rec.get("key") != key:
        return False, ""
    # what the stage wrote must be there with the checksum recorded when it finished
    damaged = store.damaged({**{p: {} for p in st.writes}, **(rec.get("outputs") or {})})
    if damaged:
        return False, damaged
    current = st.resolve("current")
    return current is None or bool(current(store, inputs)), ""


def _failure_reason(e: BaseException) -> str:
    plain = isinstance(e, ValueError | FileNotFoundError)  # callers' mistakes: the message says it
    reason = (str(e) if plain else f"{type(e).__name__}: {e}").strip()
    return reason.splitlines()[0] if reason else type(e).__name__


def _record_failure(store: RunStore, st: Stage, key: str, e: BaseException, seconds: float) -> str:
    """Record the stage failed (manifest and an errors.parquet row); best effort, so a disk
    that is full still ends in the one line that names the stage, not in another error."""
    reason = _failure_reason(e)
    log.debug("stage %s failed:\n%s", st.name, traceback.format_exc())
    detail = f"{reason}\n{traceback.format_exc(limit=-4)}"
    try:
        store.set_stage(st.name, "failed", key=key, reason=reason, seconds=round(seconds, 1))
        store.record_errors([{"stage": st.name, "item": f"stage {st.name}", "reason": detail}])
    except OSError as again:
        log.warning("stage %s failed; recording it failed too: %s", st.name, again)
    return reason


def _record_interrupt(store: RunStore, st: Stage, key: str, signum: int, seconds: float) -> None:
    name = signal.Signals(signum).name
    log.debug("stage %s interrupted by %s", st.name, name)
    store.set_stage(st.name, "interrupted", key=key, signal=name, seconds=round(seconds, 1))


def _run_stage(st: Stage, key: str, store: RunStore, inputs: RunInputs, forced: bool) -> tuple:
    """Run one stage: ``(line, output key, seconds)``; raises what the stage raised."""
    section = inputs.config.section(st.section) if st.section else None
    store.set_stage(st.name, "running", key=key)
    t0 = time.perf_counter()
    line = st.resolve("fn")(store, inputs, section)
    seconds = time.perf_counter() - t0
    result = st.resolve("result")
    produced = result(store, inputs) if result else None
    outputs = {p: store.fingerprint(p) for p in st.writes if store.exists(p)}
    # a forced stage gets a new output key, so the stages that read it run again too
    out_key = content_hash(key, produced, time.time_ns() if forced else None)
    info = {"out_key": out_key, "line": line, "seconds": round(seconds, 1), "outputs": outputs}
    store.set_stage(st.name, "done", key=key, **info)
    return line, out_key, seconds


def run_pipeline(
    store: RunStore,
    inputs: RunInputs,
    *,
    force: Sequence[str] = (),
    stages: Sequence[Stage] | None = None,
    console: Callable[[str], None] = print,
) -> RunOutcome:
    """Run every enabled stage in order, skipping current ones; stops at the first failure."""
    from audit.pipeline.summary import run_summary
    from audit.view import RunView

    stages = list(stages or STAGES)
    check_table(stages)
    names = [s.name for s in stages]
    unknown = sorted(set(force) - set(names))
    if unknown:
        raise ValueError(f"--force names unknown stage(s) {unknown}; stages: {', '.join(names)}")
    t_run = time.perf_counter()
    outcome = RunOutcome()
    try:
        _run_stages(stages, store, inputs, force, console, outcome)
        outcome.summary = run_summary(RunView(store, inputs.config, data=inputs.data))
        _write_summary(store, outcome)
    except BaseException as e:
        # the stage (if one was running) is recorded already; the run as a whole is too
        status = "interrupted" if signal_of(e) is not None else "failed"
        with contextlib.suppress(OSError):
            store.update_manifest(status=status)
        raise
    outcome.seconds = time.perf_counter() - t_run
    status = "failed" if outcome.failed else "done"
    store.update_manifest(status=status, seconds=round(outcome.seconds, 1))
    return outcome


def _write_summary(store: RunStore, outcome: RunOutcome) -> None:
    """``summary.txt``; after a failed stage a write that fails too (a full disk) is logged,
    so the line names the stage that failed, not the summary."""
    try:
        store.write_bytes("summary.txt", (outcome.summary + "\n").encode())
    except OSError as e:
        if outcome.failed is None:
            raise
        log.warning("summary.txt not written: %s", e)


def _run_stages(stages, store: RunStore, inputs: RunInputs, force, console, outcome) -> None:
    """The stage loop of :func:`run_pipeline`: fills ``outcome`` (ran, skipped, failed)."""
    out_keys: dict[str, str | None] = {}
    for st in stages:
        if not st.enabled(inputs.config):
            out_keys[st.name] = None
            console(f"  {st.name:<11s} off in the config")
            continue
        key = stage_key(st, inputs, out_keys)
        current, damaged = _is_current(st, key, store, inputs)
        if damaged and st.name not in force:
            console(f"  {st.name:<11s} {damaged}: redoing the stage")
        if st.name not in force and current:
            rec = store.manifest()["stages"][st.name]
            out_keys[st.name] = rec.get("out_key", key)
            outcome.skipped.append(st.name)
            console(f"  {st.name:<11s} {rec.get('line', '')} (current)")
            continue
        t0 = time.perf_counter()
        try:
            line, out_keys[st.name], seconds = _run_stage(st, key, store, inputs, st.name in force)
        except BaseException as e:  # noqa: BLE001 - a failing stage costs the rest of the run, not what is done
            if (signum := signal_of(e)) is not None:
                _record_interrupt(store, st, key, signum, time.perf_counter() - t0)
                raise e if isinstance(e, Interrupted) else Interrupted(signum) from e
            if not isinstance(e, Exception):
                raise
            reason = _record_failure(store, st, key, e, time.perf_counter() - t0)
            console(f"  {st.name:<11s} FAILED: {reason}")
            outcome.failed = StageFailed(st.name, reason)
            return
        outcome.ran.append(st.name)
        console(f"  {st.name:<11s} {line} ({_fmt_seconds(seconds)})")
