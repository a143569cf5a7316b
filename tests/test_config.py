"""The typed audit config: shipped configs load, mistakes name the file, key and fix."""

from __future__ import annotations

import os

import pytest

from audit.pipeline.config import load_config


def test_shipped_demo_config_loads_resolved_and_frozen():
    cfg = load_config("demo")  # configs/audit/demo.toml
    assert (
        cfg.data.split == "debug"
        and cfg.data.eval_split == "test"
        and os.path.isabs(cfg.data.world_spec)
    )
    assert os.path.exists(cfg.data.world_spec) and cfg.ray.num_cpu_workers >= 1
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        cfg.ray.num_cpus = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[data]\npath = 'x'\n[ray]\nnum_cpu_worker = 2\n",
            ["[ray] num_cpu_worker", "did you mean 'num_cpu_workers'", "known keys:"],
        ),
        (
            "[data]\npath = 'x'\n[ray]\nnum_cpu_workers = 'two'\n",
            ["[ray] num_cpu_workers", "valid integer", "'two'"],
        ),
        (
            "[data]\npath = 'x'\n[ray]\nnum_cpu_workers = 0\n",
            ["[ray] num_cpu_workers", "greater than or equal to 1"],
        ),
        (
            "[data]\npath = 'x'\n[stat]\nn_boot = 3\n",
            ["[stat]", "did you mean 'stats'", "known sections"],
        ),
        ("[data]\nsplit = 'debug'\n", ["needs a 'path'"]),
        (
            "[data]\npath = 'x'\n[stats]\nsimilarity = 'cosine'\n",
            ["[stats] similarity", "'jaccard'"],
        ),
        ("[data\npath = 'x'\n", ["not valid TOML"]),
    ],
)
def test_mistakes_name_the_file_key_and_fix(tmp_path, text, expected):
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(ValueError) as e:
        load_config(str(bad))
    msg = str(e.value)
    assert str(bad) in msg
    for part in expected:
        assert part in msg, (part, msg)


def test_paths_resolve_next_to_the_config(tmp_path, monkeypatch):
    (tmp_path / "spec.toml").write_text("x")
    (tmp_path / "audit.toml").write_text("[data]\nworld_spec = 'spec.toml'\n")
    monkeypatch.chdir("/")
    cfg = load_config(str(tmp_path / "audit.toml"))
    assert cfg.data.world_spec == str(tmp_path / "spec.toml")
    assert cfg.ray.key_fields() == {"with_features": True}  # placement does not change results


def test_a_run_directory_named_like_a_shipped_zoo_does_not_hide_it(tmp_path, monkeypatch):
    from audit.zoo.spec import ZooSpec

    (tmp_path / "demo").mkdir()  # e.g. an earlier `--out demo` next to the config and in the cwd
    (tmp_path / "audit.toml").write_text(
        "[data]\nworld_spec = 'w.toml'\n[zoo]\nmanifest = 'demo'\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(tmp_path / "audit.toml"))
    assert cfg.zoo.manifest == "demo"
    assert ZooSpec.from_toml(cfg.zoo.manifest).name == "demo"
