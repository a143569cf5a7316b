"""The Ray layer and the composition root: shard actors and the sweep scheduler
(:mod:`.sweep`), the Ray executor (:mod:`.executor`), the Serve generation services
(:mod:`.generate`), the one runner ``run_audit`` (:mod:`.runner`), the CLI (:mod:`.cli`),
and the cluster manifests (``ray-cluster.yaml``, ``rayjob.yaml``).

Ray is imported inside functions, so importing this package is cheap.
"""
