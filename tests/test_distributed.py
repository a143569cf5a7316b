"""The sweep on a Ray cluster of several nodes, on this one machine: a head and two worker
nodes (``ray.cluster_utils.Cluster``), each worker advertising the custom resource
``zoo_shard``; shards are placed on those nodes (soft node affinity, round robin), and a
worker node is removed in the middle of a sweep.

Why a subprocess: a multi-node ``Cluster`` cannot join a process that already has Ray
initialised, and the rest of the suite shares one embedded 2-CPU Ray (``ray_session``).
Making that session Ray the multi-node cluster would slow every Ray test (three raylets
on two cores, Serve's tests included) and would make the node-loss test remove a node
that later tests rely on. So this module runs its scenario once, in one child process
(``python tests/test_distributed.py OUT``): it starts the cluster, runs the sweeps into
run directories under OUT, removes a node, shuts everything down and exits; the tests
below only read what it left (run directories and ``result.json``). One cluster start
for the whole module keeps it to well under a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
RESOURCE = "zoo_shard"


# -- the scenario (runs in the child process) ------------------------------------------------
def scenario(out: str) -> dict:
    """Start head + 2 workers, run a one-node reference, a spread sweep and a sweep that
    loses a worker node; returns what the tests check (the run directories stay in ``out``)."""
    import ray
    from ray.cluster_utils import Cluster
    from test_cluster import BATCH, CLASSES, broken_specs, random_images, random_weights, tiny_zoo

    import audit.pipeline.sweep as sweep_mod
    from audit.pipeline.sweep import sweep_arrays
    from audit.store import RunStore
    from audit.zoo.shard import LocalSweeper
    from cluster.sweep import RaySweeper

    zoo = tiny_zoo(out)
    specs = [*zoo, *broken_specs(out)]
    weights = random_weights(list(zoo), os.path.join(out, "w"))
    images, ids, labels = random_images()

    writes: dict[str, list[str]] = {}
    store_result = sweep_mod.store_result

    def counting_store_result(store, result, **kw):  # every write of a model's outputs, per run
        writes.setdefault(store.root, []).append(result.name)
        return store_result(store, result, **kw)

    sweep_mod.store_result = counting_store_result

    def run(name: str, sweeper) -> dict:
        store = RunStore(os.path.join(out, name))
        res = sweep_arrays(
            store,
            images,
            ids,
            labels,
            CLASSES,
            specs,
            weights,
            sweeper,
            data_key="random-80",
            split="debug",
            batch_size=BATCH,
            with_features=True,
        )
        return {
            "done": sorted(res.done),
            "failed": sorted(res.failed),
            "info": res.info,
            "root": store.root,
            "reasons": {k: v[:300] for k, v in res.failed.items()},
        }

    out_json: dict = {"one_node": run("one-node", LocalSweeper(threads=1))}
    # failure detection tuned so that a lost node is noticed in seconds, not the default ~30 s
    system = {
        "health_check_initial_delay_ms": 0,
        "health_check_period_ms": 1000,
        "health_check_failure_threshold": 5,
    }
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": system},
    )
    try:
        workers = [cluster.add_node(num_cpus=2, resources={RESOURCE: 2}) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        node_of = {w.node_id: w for w in workers}
        out_json["head"] = cluster.head_node.node_id
        out_json["workers"] = sorted(node_of)
        out_json["spread"] = run(
            "spread", RaySweeper(2, threads_per_worker=1, shard_resource=RESOURCE)
        )

        removed: list[str] = []

        def remove_a_node(event):
            if (
                event["finished"] == 1 and not removed
            ):  # the first batch is back, the rest in flight
                node = event["nodes"][0]
                removed.append(node)
                cluster.remove_node(node_of[node], allow_graceful=False)

        out_json["lost"] = run(
            "lost-node",
            RaySweeper(2, threads_per_worker=1, shard_resource=RESOURCE, on_batch=remove_a_node),
        )
        out_json["removed"] = removed
        out_json["alive_after"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    finally:
        ray.shutdown()
        cluster.shutdown()
    out_json["writes"] = writes
    return out_json


# -- the tests (read what the child left) ----------------------------------------------------
@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory) -> dict:
    pytest.importorskip("ray")
    out = str(tmp_path_factory.mktemp("multinode"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    p = subprocess.run(
        [sys.executable, os.path.abspath(__file__), out],
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    with open(os.path.join(out, "result.json")) as f:
        return json.load(f)


def _read(root: str, name: str) -> dict:
    from test_cluster import read_model

    from audit.store import RunStore

    return read_model(RunStore(root), name)


GOOD = ["res-a", "res-b", "vit-a"]


@pytest.mark.ray
def test_shards_are_spread_over_both_worker_nodes(cluster_run):
    spread = cluster_run["spread"]
    assert spread["done"] == GOOD and spread["failed"] == ["no-weights", "raises"]
    assert len(spread["info"]["shards"]) == 2
    # one shard on each worker node (the nodes the actors reported), none on the head
    assert sorted(spread["info"]["nodes"]) == cluster_run["workers"]
    assert cluster_run["head"] not in spread["info"]["nodes"]
    assert spread["info"]["restarts"] == []


@pytest.mark.ray
def test_two_nodes_give_the_predictions_of_one(cluster_run):
    one, spread = cluster_run["one_node"], cluster_run["spread"]
    assert one["done"] == spread["done"] and one["failed"] == spread["failed"]
    for name in GOOD:
        got, want = _read(spread["root"], name), _read(one["root"], name)
        assert got["predictions"]["pred"] == want["predictions"]["pred"], name
        assert got["predictions"]["example_id"] == want["predictions"]["example_id"], name
        np.testing.assert_allclose(
            got["predictions"]["confidence"], want["predictions"]["confidence"], rtol=1e-4
        )
        np.testing.assert_allclose(
            np.asarray(got["features"]["vector"]),
            np.asarray(want["features"]["vector"]),
            rtol=1e-4,
            atol=1e-5,
        )


@pytest.mark.ray
def test_a_lost_node_is_survived_with_identical_predictions_recorded_and_written_once(cluster_run):
    from audit.store import RunStore

    lost, spread = cluster_run["lost"], cluster_run["spread"]
    (removed,) = cluster_run["removed"]
    (survivor,) = set(cluster_run["workers"]) - {removed}
    assert removed not in cluster_run["alive_after"]
    assert lost["done"] == GOOD and lost["failed"] == ["no-weights", "raises"]
    # the run finished on the remaining worker node
    assert set(lost["info"]["nodes"]) == {survivor}
    for name in GOOD:
        assert _read(lost["root"], name) == _read(spread["root"], name), name
    # the manifest records the restart of the shard that was on the removed node
    restarts = RunStore(lost["root"]).manifest()["sweep"]["restarts"]
    assert [(r["from_node"], r["to_node"]) for r in restarts] == [(removed, survivor)]
    assert restarts[0]["shard"] == 0 and restarts[0]["split"] == "debug"
    assert sorted(restarts[0]["models"]) == sorted(lost["info"]["shards"][0])
    # nothing written twice: one write of each model's outputs, one file per model
    assert sorted(cluster_run["writes"][lost["root"]]) == GOOD
    for name in GOOD:
        files = os.listdir(os.path.join(lost["root"], "predictions", f"model={name}"))
        assert len(files) == 1, files


if (
    __name__ == "__main__"
):  # the child process of the `cluster_run` fixture (its directory is on sys.path)
    result = scenario(sys.argv[1])
    with open(os.path.join(sys.argv[1], "result.json"), "w") as f:
        json.dump(result, f)
