"""``zoo-audit fix``: a new member of an audited family, never audited, is fixed by its family's
shared set (on the test bed, whose planted failure the tiny models really learn: blue
t-shirts taken for trousers); members that cannot be fixed are rows naming why."""

from __future__ import annotations

import os

import pytest
from testbed import TESTBED_ZOO

#: the test bed's zoo with cnn-b replaced by a new member of its family (cnn-c, another seed),
#: cnn-a kept (already audited: its own fix is in mitigation.parquet), a Mixer built for
#: 8-pixel images while the data is 16 (an input the data does not fit) and a CNN with a head
#: of 5 classes (the data has 3)
NEW_ZOO = TESTBED_ZOO.replace('name = "testbed"', 'name = "testbed-new"').replace(
    'name = "cnn-b"', 'name = "cnn-c"'
).replace("train = { seed = 1 }", "train = { seed = 2 }") + (
    """
[[models]]
name = "mixer-8px"
family = "mixer"
arch = "timm.models.mlp_mixer.MlpMixer"
kwargs = { img_size = 8, patch_size = 4, num_blocks = 1, embed_dim = 16 }
train = { epochs = 1 }

[[models]]
name = "cnn-5way"
family = "resnet"
arch = "resnet18"
kwargs = { layers = [1, 1, 1, 1], channels = [8, 16, 16, 16], stem_width = 8, num_classes = 5 }
"""
)


@pytest.fixture(scope="module")
def fixed(mitigated, tmp_path_factory):
    """The test bed's new members fixed through the CLI on in-process services."""
    from test_runner import threads

    import cluster.runner
    from cluster.cli import main

    store, _ = mitigated
    zoo = tmp_path_factory.mktemp("newzoo") / "new.toml"
    zoo.write_text(NEW_ZOO)
    mp = pytest.MonkeyPatch()
    mp.setattr(cluster.runner, "ray_services", lambda *a, **k: threads())
    try:
        code = main(["fix", store.uri, "--zoo", str(zoo)])
        again = cluster.runner.run_fix(store.uri, str(zoo), console=lambda s: None)
    finally:
        mp.undo()
    return store, code, again, str(zoo)


def test_a_new_member_is_fixed_by_its_familys_shared_set(fixed):
    """The new member fails like its family (blue t-shirts), is assigned the family's cluster,
    and that cluster's shared set, chosen on the fit split, fixes most of the group on the eval
    split, far beyond the control, without costing overall accuracy."""
    store, code, _, _ = fixed
    assert code == 0
    assign = store.read_table("transfer_assign.parquet").to_pylist()
    mine = [r for r in assign if r["model"] == "cnn-c"]
    assert [r["cluster"] for r in mine if r["assigned"]] == ["cluster:0"]
    assert mine[0]["similarity"] > 0.2 and mine[0]["n_examples"] > 100
    rows = [r for r in store.read_table("transfer.parquet").to_pylist() if r["model"] == "cnn-c"]
    assert {r["method"] for r in rows} == {"family_set", "control"}  # one cluster: no other set
    planted = {r["method"]: r for r in rows if r["eval"] == "planted"}
    fam, ctl = planted["family_set"], planted["control"]
    assert fam["target"] == "t-shirt:color=blue" and fam["n_hard"] >= 10
    assert fam["hard_before"] <= 0.7  # the new member really fails there
    assert fam["gain"] >= 0.3 and fam["gain_ci_low"] > ctl["gain"]
    assert fam["overall_after"] - fam["overall_before"] >= -0.02
    assert fam["set_scope"] == "cluster:0" and fam["generator"] and fam["oracle"]
    assert fam["family_in_cluster"] and fam["cluster_families"] == "resnet x2"
    assert "chose lambda=" in fam["choice"] and " on debug" in fam["choice"]
    assert os.path.exists(os.path.join(store.uri, "transfer", "features", "model=cnn-c"))


def test_members_that_cannot_be_fixed_are_rows_naming_why(fixed):
    store, _, again, _ = fixed
    rows = [r for r in store.read_table("transfer.parquet").to_pylist() if r["error"]]
    errors = {r["model"]: r["error"] for r in rows}
    assert {r["model"]: r["family"] for r in rows}["cnn-5way"] == "resnet"
    assert set(errors) == {"mixer-8px", "cnn-a", "cnn-5way"}
    assert "already audited" in errors["cnn-a"]
    assert (
        errors["mixer-8px"].startswith("train:")
        and "doesn't match model (8)" in errors["mixer-8px"]
    )
    assert "its head has 5 classes" in errors["cnn-5way"] and "data 3" in errors["cnn-5way"]
    logged = store.read_table("errors.parquet").to_pylist()
    assert any(r["stage"] == "fix" and r["item"] == "model mixer-8px" for r in logged)
    # the audited run is untouched: the new members' outputs are under transfer/
    assert not store.exists("predictions/model=cnn-c/part-00000.parquet")
    assert again.errors.keys() == errors.keys()


def test_a_second_fix_reuses_the_members_outputs(fixed):
    _, _, again, _ = fixed
    assert "0 run, 1 current" in again.lines[1]  # the sweep: cnn-c stored, not run again
    assert "0 run, 1 current" in again.lines[2]  # its outputs on the generated images too


def test_the_console_shows_the_cluster_and_the_gains(fixed, capsys):
    from audit.transfer import fix_summary

    _, _, again, _ = fixed
    text = fix_summary(again)
    assert "cnn-c" in text and "-> cluster:0 (resnet x2" in text
    assert "oracle: the data's own generator" in text and "family_set +" in text
    assert "mixer-8px:" in text


def test_own_rows_copy_the_members_own_fix_from_a_reference_audit(mitigated):
    """``--reference``: the member's own per-model fix (method ``synthetic`` of a full audit)
    is joined as ``own`` rows, with the member's cluster beside it."""
    from audit.transfer.members import own_rows
    from audit.view import RunView

    store, _ = mitigated
    info = {
        "cnn-b": {"family": "resnet", "cluster": "cluster:0", "cluster_families": "resnet"}
        | {"family_in_cluster": True, "similarity": 0.5}
    }
    rows = own_rows(RunView.open(store.uri), info)
    mit = [
        r
        for r in store.read_table("mitigation.parquet").to_pylist()
        if r["model"] == "cnn-b" and r["method"] == "synthetic"
    ]
    assert len(rows) == len(mit) > 0
    assert {r["method"] for r in rows} == {"own"} and {r["cluster"] for r in rows} == {"cluster:0"}
    assert sorted(r["gain"] for r in rows) == sorted(r["gain"] for r in mit)


def test_fix_refuses_a_run_that_did_not_reach_the_sets(tmp_path, capsys):
    """One line naming the missing table and the stage, exit 2, before any work."""
    import pyarrow as pa

    from audit.store import RunStore
    from cluster.cli import main

    run = RunStore(str(tmp_path / "run"))
    run.update_manifest(config={"data": {"path": str(tmp_path)}}, status="done")
    run.write_table("clusters.parquet", pa.table({"model": ["a"]}))
    assert main(["fix", run.uri, "--zoo", "demo_heldout"]) == 2
    err = capsys.readouterr().err
    assert "no directions.parquet" in err and "'directions' stage" in err
    assert main(["fix", str(tmp_path / "nope"), "--zoo", "demo_heldout"]) == 2
    assert "not a run directory" in capsys.readouterr().err
