"""Targeted data for the failure modes: one shared synthetic set per cluster of models.

As in arXiv 2312.05464's collective debugging, the models of a cluster share their
failures, so one set made from the cluster's hard captions (``k`` images each) serves the
whole cluster. Sets are requested over HTTP from the Ray Serve generation app
(``zoo-audit serve``) with :class:`serve.client.GenerationClient`; with no URL given, the
demo starts the app in-process (the offline world renderer) with the run directory as its
store, so the sets land in ``RUN/synthetic/SET_ID/``. Also writes ``synthetic_sets.parquet``
(scope, set_id, captions, n_images).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import pyarrow as pa

from audit.store import RunStore

log = logging.getLogger(__name__)


SETS_SCHEMA = pa.schema([("scope", pa.string()), ("set_id", pa.string()), ("captions", pa.list_(pa.string())),
                         ("n_images", pa.int64()), ("generator", pa.string())])  # fmt: skip


@dataclass
class GenerateConfig:
    enabled: bool = True
    url: str = ""  # a running `zoo-audit serve`; "" = start one in-process with `backend`
    backend: str = "world"  # used in-process only: "world[:DIR]" or "diffusers:MODEL"
    k: int = 3  # images per hard caption
    seed: int = 0


def cluster_hard_captions(captions: pa.Table, directions: pa.Table) -> dict[str, list[str]]:
    """``{cluster scope: [top-1 hard caption of each class whose mode-0 direction is ok]}``."""
    ok = {(r["scope"], r["class"]) for r in directions.to_pylist() if r["mode"] == 0 and r["status"] == "ok"}
    out: dict[str, list[str]] = {}
    for r in captions.to_pylist():
        if (r["scope"].startswith("cluster:") and r["mode"] == 0 and r["polarity"] == "hard" and r["rank"] == 1
                and (r["scope"], r["class"]) in ok):  # fmt: skip
            out.setdefault(r["scope"], []).append(r["caption"])
    return {s: sorted(set(c)) for s, c in sorted(out.items())}


def set_id_for(scope: str, run_key: str) -> str:
    return f"{scope.replace(':', '-')}-hard-{run_key[:8]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_sets(url: str, wanted: Mapping[str, list[str]], run_key: str, k: int = 3, seed: int = 0,
                 token: str | None = None) -> pa.Table:  # fmt: skip
    """Ask the generation service for one set per scope; returns the ``synthetic_sets`` table."""
    from serve.client import GenerationClient

    rows = []
    with GenerationClient(url, token=token) as client:
        for scope, caps in wanted.items():
            s = client.request_set(caps, k=k, seed=seed, set_id=set_id_for(scope, run_key))
            rows.append({"scope": scope, "set_id": s.set_id, "captions": caps, "n_images": len(s.image_ids),
                         "generator": s.generator})  # fmt: skip
    return pa.Table.from_pylist(rows, schema=SETS_SCHEMA)


def generate_stage(store: RunStore, captions: pa.Table, directions: pa.Table, run_key: str,
                   cfg: GenerateConfig | None = None) -> pa.Table:  # fmt: skip
    """One shared synthetic set per cluster from its hard captions, stored in the run."""
    cfg = cfg or GenerateConfig()
    wanted = cluster_hard_captions(captions, directions)
    if not wanted:
        log.warning("no cluster has a significant failure direction; no synthetic set requested")
        table = SETS_SCHEMA.empty_table()
    elif cfg.url:
        table = request_sets(cfg.url, wanted, run_key, cfg.k, cfg.seed)
    else:
        from ray import serve

        from serve.app import build_app
        from serve.config import ServeAppConfig

        port = _free_port()
        app = build_app(ServeAppConfig(backend=cfg.backend, store=store.uri))
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            serve.run(app, name="zoo-audit-generate", route_prefix="/")
            table = request_sets(f"http://127.0.0.1:{port}", wanted, run_key, cfg.k, cfg.seed)
        finally:
            serve.shutdown()
    store.write_table("synthetic_sets.parquet", table)
    store.set_stage("generate", "done", sets=table["set_id"].to_pylist())
    return table


def format_sets(table: pa.Table) -> str:
    lines = ["Shared synthetic sets (one per cluster, k images per hard caption):"]
    for r in table.to_pylist():
        lines.append(f"  {r['scope']:10s} {r['set_id']:28s} {r['n_images']:3d} images  {r['captions']}")
    return "\n".join(lines)
