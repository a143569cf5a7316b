"""The Ray executor that stages receive in production: one Ray task per item, the shared
inputs put in the object store once."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any


class RayExecutor:
    """``map(fn, items, shared=...)`` as Ray tasks (Ray must be initialised)."""

    @property
    def parallelism(self) -> int:
        import ray

        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    def map(
        self,
        fn: Callable[..., Any],
        items: Sequence[Any],
        *,
        shared: Mapping[str, Any] | None = None,
        cpus: float = 1,
    ) -> list[Any]:
        import ray

        items = list(items)
        if not items:
            return []
        refs = {k: ray.put(v) for k, v in (shared or {}).items()}
        task = ray.remote(num_cpus=cpus)(_call)
        return ray.get([task.remote(fn, item, refs) for item in items])


def _call(fn, item, shared_refs):
    import ray

    # refs nested in a dict are not resolved by Ray, so fetch them here (zero-copy for arrays)
    shared = {k: ray.get(v) for k, v in shared_refs.items()}
    return fn(item, **shared)
