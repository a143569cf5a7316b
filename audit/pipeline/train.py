"""The train stage: members with ``weights = "train"`` whose checkpoint is not cached yet
are trained on the train split, in parallel through the injected executor (one model per
worker, one torch thread each: small models on few cores scale better across processes
than across intra-op threads)."""

from __future__ import annotations

import logging

from audit.store import RunStore

log = logging.getLogger(__name__)


def _train_one(item, *, train, device: str, threads: int, progress: bool):
    from audit.zoo.train import train_member

    spec, path = item
    try:
        return train_member(spec, train, path, device=device, threads=threads, progress=progress)
    except Exception as e:  # noqa: BLE001 - a member that cannot train costs that member only
        return (spec.name, f"{type(e).__name__}: {e}")


def train_pending(store: RunStore, inputs, cfg) -> str:
    """Stage: train what is missing. ``cfg``: the ``[zoo]`` section. Returns the stage's line."""
    return train_members(store, inputs, cfg)[0]


def train_members(store: RunStore, inputs, cfg) -> tuple[str, dict[str, str]]:
    """:func:`train_pending`'s work: ``(its line, {member: why it could not be trained})``."""
    from audit.zoo.train import TrainSet, member_checkpoints, pending_members

    all_members = member_checkpoints(inputs.zoo, inputs.train_key, cfg.cache or None)
    todo = pending_members(inputs.zoo, inputs.train_key, cfg.cache or None)
    if not cfg.train or not todo:
        missing = f", {len(todo)} not trained ([zoo] train = false)" if todo else ""
        line = f"{len(all_members)} trainable models: {len(all_members) - len(todo)} from cache"
        return line + missing, {}
    ex = inputs.services.executor
    train = TrainSet.decode(inputs.data.split("train"))
    # one thread per model when models run side by side; all of them when one runs alone
    threads = 1 if ex.parallelism > 1 and len(todo) > 1 else None
    results = ex.map(
        _train_one,
        todo,
        shared={
            "train": train,
            "device": cfg.device,
            "threads": threads,
            "progress": inputs.services.progress,
        },
    )
    failed = [r for r in results if isinstance(r, tuple)]
    if failed:
        store.record_errors(
            {"stage": "train", "item": f"model {name}", "reason": reason} for name, reason in failed
        )
    seconds = sum(r.seconds for r in results if not isinstance(r, tuple))
    line = (
        f"{len(all_members)} trainable models: {len(todo) - len(failed)} trained, "
        f"{len(all_members) - len(todo)} from cache, {len(failed)} failed ({seconds:.0f} model-seconds)"
    )
    return line + "".join(f"; {name}: {reason[:100]}" for name, reason in failed), dict(failed)


def checkpoints_current(store: RunStore, inputs) -> bool:
    """The train stage's outputs live in the checkpoint cache: current when none is missing
    (or when nothing may be trained here)."""
    from audit.zoo.train import pending_members

    cache = inputs.config.zoo.cache or None
    return not inputs.config.zoo.train or not pending_members(inputs.zoo, inputs.train_key, cache)
