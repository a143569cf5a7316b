"""How a stage's parallel work is run: an injected executor.

Stages are plain functions in ``audit`` and never import Ray; when a stage has
independent items (one model to train, one model's directions to fit) it hands them to
``executor.map``. Production injects Ray tasks (``cluster.executor.RayExecutor``); tests
and single-process runs use :class:`ThreadExecutor` or :class:`SerialExecutor`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol


class Executor(Protocol):
    """Runs ``fn(item, **shared)`` for every item; returns the results in item order.

    ``shared`` holds large read-only inputs (embeddings, decoded images) that a
    distributed executor sends once, not once per item; ``cpus`` is what one call needs.
    An exception in any call propagates (stages that must survive a bad item catch it
    inside ``fn``).
    """

    def map(
        self,
        fn: Callable[..., Any],
        items: Sequence[Any],
        *,
        shared: Mapping[str, Any] | None = None,
        cpus: float = 1,
    ) -> list[Any]: ...

    @property
    def parallelism(self) -> int: ...


class SerialExecutor:
    """Everything in this thread, in order (the plain baseline)."""

    parallelism = 1

    def map(self, fn, items, *, shared=None, cpus=1):
        return [fn(item, **(shared or {})) for item in items]


class ThreadExecutor:
    """A thread pool in this process (tests; numpy/torch release the GIL in their kernels)."""

    def __init__(self, workers: int = 2):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = int(workers)

    @property
    def parallelism(self) -> int:
        return self.workers

    def map(self, fn, items, *, shared=None, cpus=1):
        items = list(items)
        if len(items) <= 1 or self.workers == 1:
            return SerialExecutor().map(fn, items, shared=shared)
        with ThreadPoolExecutor(max_workers=min(self.workers, len(items))) as pool:
            return list(pool.map(lambda it: fn(it, **(shared or {})), items))
