"""RunView, the one reader of a run: the run's own typed config (its thresholds, not a
reader's copy), tables read once, and clear errors for what is not a run."""

from __future__ import annotations

import logging

import pyarrow as pa
import pytest

from audit.pipeline.config import AuditConfig
from audit.store import RunStore
from audit.view import RunView, config_from_manifest


def _run(tmp_path, min_gap: float, extra_config: dict | None = None) -> RunStore:
    store = RunStore(str(tmp_path / "run"))
    cfg = AuditConfig(data={"path": "unused"}, stats={"min_gap": min_gap}).model_dump()
    for section, values in (extra_config or {}).items():
        cfg[section] = {**cfg[section], **values}
    store.update_manifest(config=cfg, zoo={"models": ["a", "b"], "families": {"a": "f", "b": "f"}})
    # one planted group, 20 points below its class in model a, 10 in model b
    base = {"class": "bag", "attribute": "group", "value": "bag:color=green", "n": 10}
    base |= {"ci_low": 0.0, "ci_high": 1.0, "class_accuracy": 0.8}
    rows = [{**base, "model": m, "accuracy": acc} for m, acc in (("a", 0.6), ("b", 0.7))]
    rows += [{**rows[0], "model": m, "class": "*", "attribute": "*", "value": "*"} for m in "ab"]
    store.write_table("accuracy.parquet", pa.Table.from_pylist(rows))
    return store


@pytest.mark.parametrize(("min_gap", "shows"), [(0.15, "1/2"), (0.05, "2/2")])
def test_the_summary_reads_the_runs_own_threshold(tmp_path, min_gap, shows):
    from audit.pipeline.summary import format_accuracy

    view = RunView.open(_run(tmp_path, min_gap))
    assert view.min_gap == min_gap and view.fit_split == "debug"
    text = format_accuracy(view)
    assert f"{round(100 * min_gap)} points or more below its class" in text
    assert text.splitlines()[-1].split()[-1] == shows


def test_tables_are_read_once_and_missing_ones_are_none(tmp_path):
    view = RunView.open(_run(tmp_path, 0.15))
    assert view.table("accuracy.parquet") is view.table("accuracy.parquet")
    assert view.table("mitigation.parquet") is None and not view.has("mitigation.parquet")
    assert view.table("accuracy.parquet", ["model", "nope"]).column_names == ["model"]
    assert view.models == ["a", "b"] and view.families == {"a": "f", "b": "f"}


def test_a_config_key_this_version_does_not_know_is_dropped_with_a_warning(tmp_path, caplog):
    store = _run(tmp_path, 0.2, {"mitigate": {"min_gap": 0.3}})  # where min_gap used to be
    with caplog.at_level(logging.WARNING, logger="audit.view"):
        view = RunView.open(store)
    assert view.min_gap == 0.2 and "min_gap" in caplog.text
    with pytest.raises(ValueError, match="no config"):
        config_from_manifest({})


def test_what_is_not_a_run_is_an_error_and_nothing_is_created(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RunView.open(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        RunView.open(tmp_path / "empty")
