"""The demo end to end on the tiny world and tiny zoo (Ray embedded, 2 CPUs)."""

from __future__ import annotations

import pytest

from audit.demo import DemoConfig
from audit.store import RunStore


@pytest.mark.ray
def test_demo_end_to_end_and_rerun(tmp_path, tiny_world, tiny_spec_path, tiny_zoo_path, capsys):
    from cluster.demo import run_demo

    cfg = DemoConfig(out=str(tmp_path / "run"), world_spec=tiny_spec_path, world_dir=tiny_world, zoo=tiny_zoo_path, progress=False)
    store = run_demo(cfg)
    for name in ("manifest.json", "accuracy.parquet", "overlap.parquet", "clusters.parquet", "directions.parquet",
                 "captions.parquet", "subpopulations.parquet", "synthetic_sets.parquet"):  # fmt: skip
        assert store.exists(name), name
    m = store.manifest()
    assert m["data"]["world_dir"] == tiny_world
    assert {s for s, v in m["stages"].items() if v["status"] == "done"} >= {"train", "sweep", "accuracy", "stats", "directions"}
    acc = store.read_table("accuracy.parquet").to_pylist()
    assert {r["model"] for r in acc} == {"tiny-resnet", "tiny-vit"}
    assert any(r["attribute"] == "group" and r["value"] == "t-shirt:color=blue" for r in acc)
    # predictions cover debug and test; the failure statistics use debug only
    preds = store.read_table("predictions/model=tiny-resnet")
    assert preds.num_rows == 180
    assert store.read_table("overlap.parquet").num_rows == 2
    dirs = store.read_table("directions.parquet")
    assert set(dirs["scope"].to_pylist()) >= {"tiny-resnet", "tiny-vit"}
    caps = store.read_table("captions.parquet")
    assert caps.num_rows > 0 and set(caps["polarity"].to_pylist()) <= {"hard", "easy"}
    # every cluster with a significant direction got a shared synthetic set over HTTP
    from cluster.generate_stage import cluster_hard_captions
    from serve.sets import load_set

    sets = store.read_table("synthetic_sets.parquet")
    assert sets.num_rows == len(cluster_hard_captions(caps, dirs))  # one set per cluster with a significant direction
    for r in sets.to_pylist():
        images, table = load_set(store, r["set_id"])
        assert len(images) == r["n_images"] == 3 * len(r["captions"])
        assert sorted(set(table["prompt"].to_pylist())) == sorted(r["captions"])
    out = capsys.readouterr().out
    assert "Planted failure modes" in out and "Within- vs between-family" in out

    # a second run trains nothing and sweeps nothing
    run_demo(cfg)
    out = capsys.readouterr().out
    assert "0 trained now" in out and "0 run, 2 up to date" in out
    assert RunStore(cfg.out).errors().num_rows == 0
