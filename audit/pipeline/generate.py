"""The generate stage: synthetic sets for the failure modes.

As in arXiv 2312.05464's collective debugging, the models of a cluster share their
failures, so one set made from the cluster's hard captions (``k`` images each) serves the
whole cluster. When the run mitigates, every model also gets a set of its own hard
captions, and one *probe* set holds the easy and counterfactual captions that confirm a
failure by generation (:mod:`audit.pipeline.confirm`). The stage decides *what* to ask
for; the injected :class:`SetGenerator` (``cluster.generate``: the Ray Serve app over
HTTP, in-process or at a URL) makes the images and stores them in
``RUN/synthetic/SET_ID/``. Writes ``synthetic_sets.parquet`` (scope, set_id, captions,
n_images, generator, purpose: ``hard`` or ``probe``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

import pyarrow as pa

from audit.store import RunStore

log = logging.getLogger(__name__)

SETS_SCHEMA = pa.schema(
    [
        ("scope", pa.string()),
        ("set_id", pa.string()),
        ("captions", pa.list_(pa.string())),
        ("n_images", pa.int64()),
        ("generator", pa.string()),
        ("slot_precision", pa.string()),
    ]
)
PROBE = "probe"


class SetGenerator(Protocol):
    def request_sets(
        self,
        wanted: Mapping[str, list[str]],
        set_ids: Mapping[str, str],
        k: int | Mapping[str, int],
        seed: int,
    ) -> pa.Table:
        """Make (or find) one set per scope, ``k`` (or ``k[scope]``) images per caption;
        returns rows of :data:`SETS_SCHEMA`."""


def cluster_hard_captions(named) -> dict[str, list[str]]:
    """``{cluster scope: [the named caption of each class]}`` (``named``: NamedMode list)."""
    out: dict[str, list[str]] = {}
    for m in named:
        if m.scope.startswith("cluster:"):
            out.setdefault(m.scope, []).append(m.caption)
    return {s: sorted(set(c)) for s, c in sorted(out.items())}


def set_id_for(scope: str, key: str) -> str:
    """A set id the service accepts (letters, digits, ``_.-``), unique per scope and content."""
    import re

    kind = "" if scope == PROBE else "-hard"
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', scope).strip('-')[:60]}{kind}-{key[:8]}"


def wanted_sets(store: RunStore, inputs) -> dict[str, list[str]]:
    """``{scope: captions}``: each cluster's named captions, the probe set (named, easy and
    counterfactual captions: the confirmation's sample) and, with mitigation, each model's.
    Only named modes are generated: an unnamed one has no caption that fails."""
    from audit.pipeline.confirm import probe_captions
    from audit.pipeline.name import load_named, pairs_of

    named = load_named(store)
    wanted = cluster_hard_captions(named)
    pairs = pairs_of(named)
    if inputs.config.mitigate.enabled:  # each model's own hard set, for its own fix
        for (scope, _, _), (hard, _) in pairs.items():
            if not scope.startswith("cluster:"):
                wanted.setdefault(scope, []).append(hard)
    wanted = {s: sorted(set(c)) for s, c in wanted.items()}
    if pairs:  # hard, easy and counterfactual captions, more images each: the confirmation's sample
        probe = probe_captions(pairs, inputs.data)
        wanted[PROBE] = sorted(set(probe.values()) | {h for h, _ in pairs.values()})
    return wanted


#: in every set id: bump when what a set holds changes for the same request (v2: named captions,
#: retrieval reranked by the caption's slots)
SETS_VERSION = 2


def generator_of(services, backend: str, primary: str):
    """The SetGenerator for ``backend``: the composition root's ``generator_for`` when it gives
    one, else the run's one ``generator`` (for the primary backend only)."""
    if services.generator_for is not None:
        return services.generator_for(backend)
    if backend != primary:
        raise RuntimeError(
            f"[generate] compare names {backend!r}, but this run was given one generator"
        )
    if services.generator is None:
        raise RuntimeError("no generation service was given to this run")
    return services.generator


def _request(inputs, cfg, wanted: dict, backend: str) -> pa.Table:
    from audit.cache import content_hash

    k_of = {s: cfg.probe_k if s == PROBE else cfg.k for s in wanted}
    ids = {
        s: set_id_for(s, content_hash(c, k_of[s], cfg.seed, backend, SETS_VERSION))
        for s, c in wanted.items()
    }
    gen = generator_of(inputs.services, backend, cfg.backend)
    return gen.request_sets(wanted, ids, k_of, cfg.seed)


def generate_stage(store: RunStore, inputs, cfg) -> str:
    """Stage: request the sets (``[generate]`` section) from the backend and from every
    generator it is compared with (``compare``); one set per scope and generator (a backend
    that resolves to a generator already asked adds nothing). A set's id hashes what it holds
    (captions, k, seed, backend), so asking again finds the stored set."""
    wanted = wanted_sets(store, inputs)
    tables = (
        [_request(inputs, cfg, wanted, b) for b in dict.fromkeys([cfg.backend, *cfg.compare])]
        if wanted
        else []
    )
    table = pa.concat_tables(tables) if tables else SETS_SCHEMA.empty_table()
    seen, keep = set(), []
    for i, r in enumerate(table.select(["scope", "generator"]).to_pylist()):
        if (r["scope"], r["generator"]) not in seen:
            seen.add((r["scope"], r["generator"]))
            keep.append(i)
    table = table.take(pa.array(keep, pa.int64()))
    store.write_table("synthetic_sets.parquet", table)
    if not table.num_rows:
        return "no named failure mode: no set requested"
    gens = sorted(set(table["generator"].to_pylist()))
    n_clusters = sum(s.startswith("cluster:") for s in table["scope"].to_pylist())
    n_images = sum(table["n_images"].to_pylist())
    return f"{table.num_rows} sets ({n_clusters} shared by clusters), {n_images:,} images ({', '.join(gens)})"
