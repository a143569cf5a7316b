"""The one audit: stages in order, each skipped when the keys of its inputs are unchanged.

A stage is a plain function ``(store, inputs, section) -> line`` (its one console line).
Its *key* hashes its version, the section fields that change its results, the data and
zoo it reads, and the output keys of the stages it reads from; it is skipped when the
manifest holds that key with status ``done`` and its outputs are in the run directory.
``force`` redoes a stage and, through its new output key, every stage that reads it.
A failing stage is recorded (manifest ``status = failed`` with the reason, and a row in
``errors.parquet``), every earlier output stays, and :class:`StageFailed` says what to do;
the next run resumes from there. Parallel work and services reach stages through
``inputs.services`` (injected by ``cluster.runner``: Ray; by tests: threads).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from audit.cache import content_hash
from audit.pipeline.config import AuditConfig
from audit.pipeline.inputs import RunInputs
from audit.store import RunStore

log = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    def __init__(self, stage: str, reason: str):
        super().__init__(f"stage {stage!r} failed: {reason}")
        self.stage, self.reason = stage, reason


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[..., Any]
    section: str | None = None  # the config section handed to ``fn`` (and hashed into the key)
    after: tuple[str, ...] = ()  # stages whose outputs this one reads
    outputs: tuple[str, ...] = ()  # run-directory paths that must exist for a skip
    version: int = 1
    enabled: Callable[[AuditConfig], bool] = lambda cfg: True
    extra_key: Callable[[RunInputs], Any] = lambda inputs: None  # what else it reads (data, zoo)
    current: Callable[[RunStore, RunInputs], bool] = lambda store, inputs: True  # beyond `outputs`
    result_key: Callable[[RunStore, RunInputs], Any] = lambda store, inputs: (
        None
    )  # what it produced


def _train_key(inputs: RunInputs):
    return [m.to_dict() for m in inputs.zoo], inputs.data_key


def _train_current(store, inputs):
    from audit.zoo.train import pending_members

    return not inputs.config.zoo.train or not pending_members(
        inputs.zoo, inputs.data, inputs.config.zoo.cache or None
    )


def _sweep_current(store, inputs):
    from audit.pipeline.sweep import swept_models

    return len(swept_models(store, inputs.zoo)) == len(inputs.zoo)


def _sweep_result(store, inputs):
    from audit.pipeline.sweep import sweep_records

    rec = sweep_records(store)
    return sorted(
        (m.name, rec.get(m.name, {}).get("key"), rec.get(m.name, {}).get("status"))
        for m in inputs.zoo
    )


def _embed_key(inputs: RunInputs):
    from audit.pipeline.directions import embed_splits

    return inputs.config.directions.embedder, inputs.data_key, embed_splits(inputs)


def _sweep(store, inputs, cfg):
    from audit.pipeline.sweep import sweep_stage

    line, _ = sweep_stage(store, inputs, cfg)
    return line


def _mitigating(cfg: AuditConfig) -> bool:
    return cfg.mitigate.enabled and cfg.generate.enabled and cfg.directions.enabled


def default_stages() -> list[Stage]:
    from audit.pipeline.directions import directions_stage, embed_stage
    from audit.pipeline.generate import generate_stage
    from audit.pipeline.mitigate import mitigate_stage
    from audit.pipeline.stats import accuracy_stage, stats_stage
    from audit.pipeline.train import train_pending
    from audit.report import report_stage

    directions_on = lambda cfg: cfg.directions.enabled  # noqa: E731
    return [
        Stage("train", train_pending, "zoo", extra_key=_train_key, current=_train_current),
        Stage(
            "sweep",
            _sweep,
            "ray",
            ("train",),
            extra_key=lambda i: (i.data_key, i.sweep_splits(), i.config.data.limit),
            current=_sweep_current,
            result_key=_sweep_result,
        ),
        Stage(
            "accuracy",
            accuracy_stage,
            None,
            ("sweep",),
            ("accuracy.parquet",),
            extra_key=lambda i: i.fit_split,
        ),
        Stage(
            "stats",
            stats_stage,
            "stats",
            ("sweep",),
            ("overlap.parquet", "clusters.parquet", "family_similarity.parquet"),
            extra_key=lambda i: (i.fit_ids()[:1], len(i.fit_ids()), i.families),
        ),
        Stage("embed", embed_stage, None, (), enabled=directions_on, extra_key=_embed_key),
        Stage(
            "directions",
            directions_stage,
            "directions",
            ("sweep", "stats", "embed", "accuracy"),
            (
                "directions.parquet",
                "captions.parquet",
                "subpopulations.parquet",
                "direction_similarity.parquet",
            ),
            enabled=directions_on,
            extra_key=lambda i: (i.fit_split, i.eval_split, i.world_dir is not None),
        ),
        Stage(
            "generate",
            generate_stage,
            "generate",
            ("directions",),
            ("synthetic_sets.parquet",),
            enabled=lambda cfg: cfg.directions.enabled and cfg.generate.enabled,
            extra_key=lambda i: i.mitigating(),
        ),
        Stage(
            "mitigate",
            mitigate_stage,
            "mitigate",
            ("sweep", "accuracy", "stats", "embed", "directions", "generate"),
            ("mitigation.parquet", "confirmations.parquet"),
            enabled=lambda cfg: _mitigating(cfg),
            extra_key=lambda i: (i.fit_split, i.eval_split, i.config.generate.k),
        ),
        Stage(
            "report",
            report_stage,
            "report",
            ("accuracy", "stats", "directions", "generate", "mitigate"),
            ("report/index.html",),
            enabled=lambda cfg: cfg.report.enabled,
        ),
    ]


@dataclass
class RunOutcome:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: StageFailed | None = None
    summary: str = ""
    seconds: float = 0.0


def _fmt_seconds(s: float) -> str:
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"


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

    stages = list(stages or default_stages())
    names = [s.name for s in stages]
    unknown = sorted(set(force) - set(names))
    if unknown:
        raise ValueError(f"--force names unknown stage(s) {unknown}; stages: {', '.join(names)}")
    t_run = time.perf_counter()
    cfg = inputs.config
    out_keys: dict[str, str] = {}
    outcome = RunOutcome()
    for st in stages:
        if not st.enabled(cfg):
            console(f"  {st.name:<11s} off in the config")
            continue
        section = cfg.section(st.section) if st.section else None
        key = content_hash(
            st.name,
            st.version,
            section.key_fields() if section else None,
            st.extra_key(inputs),
            [out_keys.get(a) for a in st.after],
        )
        rec = store.manifest().get("stages", {}).get(st.name, {})
        if (
            st.name not in force
            and rec.get("status") == "done"
            and rec.get("key") == key
            and all(store.exists(p) for p in st.outputs)
            and st.current(store, inputs)
        ):
            out_keys[st.name] = rec.get("out_key", key)
            outcome.skipped.append(st.name)
            console(f"  {st.name:<11s} {rec.get('line', '')} (current)")
            continue
        store.set_stage(st.name, "running", key=key)
        t0 = time.perf_counter()
        try:
            line = st.fn(store, inputs, section)
        except Exception as e:  # noqa: BLE001 - a failing stage costs the rest of the run, not what is done
            reason = (
                f"{type(e).__name__}: {e}"
                if not isinstance(e, ValueError | FileNotFoundError)
                else str(e)
            )
            reason = reason.strip().splitlines()[0] if reason.strip() else type(e).__name__
            log.debug("stage %s failed:\n%s", st.name, traceback.format_exc())
            store.set_stage(
                st.name,
                "failed",
                key=key,
                reason=reason,
                seconds=round(time.perf_counter() - t0, 1),
            )
            store.record_errors(
                [
                    {
                        "stage": st.name,
                        "item": f"stage {st.name}",
                        "reason": f"{reason}\n{traceback.format_exc(limit=-4)}",
                    }
                ]
            )
            console(f"  {st.name:<11s} FAILED: {reason}")
            outcome.failed = StageFailed(st.name, reason)
            break
        seconds = time.perf_counter() - t0
        # a forced stage gets a new output key, so the stages that read it run again too
        out_key = content_hash(
            key, st.result_key(store, inputs), time.time_ns() if st.name in force else None
        )
        out_keys[st.name] = out_key
        store.set_stage(
            st.name, "done", key=key, out_key=out_key, line=line, seconds=round(seconds, 1)
        )
        outcome.ran.append(st.name)
        console(f"  {st.name:<11s} {line} ({_fmt_seconds(seconds)})")
    outcome.summary = run_summary(store, inputs)
    store.write_bytes("summary.txt", (outcome.summary + "\n").encode())
    outcome.seconds = time.perf_counter() - t_run
    store.update_manifest(
        status="failed" if outcome.failed else "done", seconds=round(outcome.seconds, 1)
    )
    return outcome
