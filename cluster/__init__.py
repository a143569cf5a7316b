"""Everything that imports Ray outside Serve: the ZooShard actors, the distributed zoo sweep,
the ``zoo-audit run`` pipeline, and cluster manifests (``ray-cluster.yaml``, ``rayjob.yaml``).

Ray is imported inside functions, so importing this package is cheap.
"""

from __future__ import annotations

__all__ = ["run_audit", "stats_stage", "sweep_stage"]


def __getattr__(name: str):
    if name in __all__:
        from cluster import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'cluster' has no attribute {name!r}")
