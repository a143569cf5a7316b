"""The generate stage: one shared synthetic set per cluster of models.

As in arXiv 2312.05464's collective debugging, the models of a cluster share their
failures, so one set made from the cluster's hard captions (``k`` images each) serves the
whole cluster. The stage decides *what* to ask for; the injected :class:`SetGenerator`
(``cluster.generate``: the Ray Serve app over HTTP, in-process or at a URL) makes the
images and stores them in ``RUN/synthetic/SET_ID/``. Writes ``synthetic_sets.parquet``
(scope, set_id, captions, n_images, generator).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

import pyarrow as pa

from audit.store import RunStore

log = logging.getLogger(__name__)

SETS_SCHEMA = pa.schema([("scope", pa.string()), ("set_id", pa.string()), ("captions", pa.list_(pa.string())),
                         ("n_images", pa.int64()), ("generator", pa.string())])  # fmt: skip


class SetGenerator(Protocol):
    def request_sets(self, wanted: Mapping[str, list[str]], set_ids: Mapping[str, str], k: int, seed: int) -> pa.Table:
        """Make (or find) one set per scope; returns rows of :data:`SETS_SCHEMA`."""


def cluster_hard_captions(captions: pa.Table, directions: pa.Table) -> dict[str, list[str]]:
    """``{cluster scope: [top-1 hard caption of each class whose mode-0 direction is ok]}``."""
    ok = {(r["scope"], r["class"]) for r in directions.to_pylist() if r["mode"] == 0 and r["status"] == "ok"}
    out: dict[str, list[str]] = {}
    for r in captions.to_pylist():
        if (r["scope"].startswith("cluster:") and r["mode"] == 0 and r["polarity"] == "hard" and r["rank"] == 1
                and (r["scope"], r["class"]) in ok):  # fmt: skip
            out.setdefault(r["scope"], []).append(r["caption"])
    return {s: sorted(set(c)) for s, c in sorted(out.items())}


def set_id_for(scope: str, key: str) -> str:
    return f"{scope.replace(':', '-')}-hard-{key[:8]}"


def generate_stage(store: RunStore, inputs, cfg) -> str:
    """Stage: request the clusters' sets (``[generate]`` section). A set's id hashes what it
    holds (captions, k, seed, backend), so asking again finds the stored set."""
    from audit.cache import content_hash

    wanted = cluster_hard_captions(store.read_table("captions.parquet"), store.read_table("directions.parquet"))
    if not wanted:
        table = SETS_SCHEMA.empty_table()
    else:
        if inputs.services.generator is None:
            raise RuntimeError("no generation service was given to this run")
        table = inputs.services.generator.request_sets(wanted, {s: set_id_for(s, content_hash(c, cfg.k, cfg.seed, cfg.backend)) for s, c in wanted.items()}, cfg.k, cfg.seed)
    store.write_table("synthetic_sets.parquet", table)
    if not table.num_rows:
        return "no cluster has a significant failure direction: no set requested"
    gens = sorted(set(table["generator"].to_pylist()))
    return f"{table.num_rows} sets, {sum(table['n_images'].to_pylist())} images ({', '.join(gens)})"
