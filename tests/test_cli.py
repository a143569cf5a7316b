"""The command line: subcommands run, and callers' mistakes exit 2 with a clear message."""

from __future__ import annotations

import os

from audit.cli import main


def test_world_build_and_zoo_list(tmp_path, tiny_spec_path, fake_fmnist, tiny_zoo_path, capsys):
    out = tmp_path / "w"
    assert main(["world", "build", "--spec", tiny_spec_path, "--out", str(out), "--fashion-mnist", fake_fmnist]) == 0
    assert os.path.exists(out / "examples.parquet") and "840 examples" in capsys.readouterr().out
    assert main(["zoo", "list", "--zoo", tiny_zoo_path]) == 0
    listing = capsys.readouterr().out
    assert "tiny-resnet" in listing and "2/2 models have weights available here" in listing


def test_mistakes_exit_2_with_the_fix(tmp_path, tiny_zoo_path, tiny_world, capsys):
    assert main(["zoo", "list", "--zoo", str(tmp_path / "nope.toml")]) == 2
    assert "zoo manifest" in capsys.readouterr().err
    assert main(["zoo", "train", "--zoo", tiny_zoo_path, "--data", tiny_world, "--models", "tiny-resnt"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'tiny-resnt'" in err and "tiny-resnet" in err
