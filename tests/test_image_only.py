"""A plain ImageFolder (class folders, no caption, no attribute column) and no CLIP weights:
the failure modes are found in a zoo member's own features, reported unnamed with their
hardest images, nothing is generated, and the run finishes with its report."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


def _imagefolder(world: str, root) -> str:
    """The test bed as ROOT/SPLIT/CLASS/*.png: what a user's folder of images looks like."""
    from audit.data.readers import read_dataset

    t = read_dataset(world)
    for eid, split, label, png in zip(
        t.example_ids, t.column("split"), t.labels, t.table["image"].to_pylist(), strict=True
    ):
        d = os.path.join(root, split, t.classes[label])
        os.makedirs(d, exist_ok=True)
        Image.open(io.BytesIO(png)).save(os.path.join(d, f"{eid}.png"))
    return str(root)


def test_an_imagefolder_without_captions_or_clip_is_audited_and_its_modes_reported_unnamed(
    tmp_path, testbed
):
    from test_runner import threads
    from testbed import testbed_config

    from audit.pipeline import runner
    from audit.pipeline.config import load_config
    from audit.pipeline.inputs import load_inputs
    from audit.report import write_report
    from audit.store import RunStore
    from audit.view import RunView

    world, zoo = testbed
    folder = _imagefolder(world, tmp_path / "images")
    cfg = load_config(testbed_config(tmp_path / "audit.toml", folder, zoo))
    store = RunStore(str(tmp_path / "run"))
    inputs = load_inputs(cfg, threads())
    lines: list[str] = []
    out = runner.run_pipeline(store, inputs, console=lines.append)
    assert out.failed is None, out.failed
    assert "image-only space" in next(
        line for line in lines if line.lstrip().startswith("directions")
    )
    modes = store.read_table("modes.parquet").to_pylist()
    assert modes and not any(m["named"] for m in modes) and all(m["caption"] is None for m in modes)
    shirts = [m for m in modes if m["class"] == "t-shirt" and m["scope"] in ("cnn-a", "cnn-b")]
    assert shirts, "the planted failure (blue t-shirts) is found without any text"
    assert all(m["accuracy_on_nearest"] < m["class_accuracy"] for m in shirts)
    assert (
        store.read_table("synthetic_sets.parquet").num_rows == 0
    )  # nothing named: nothing generated
    mit = store.read_table("mitigation.parquet").to_pylist()
    assert {"pool_direction", "upweight"} <= {r["method"] for r in mit}
    assert {r["eval"] for r in mit} == {"direction"}
    index = write_report(RunView(store, cfg, data=inputs.data)).index
    card = open(os.path.join(os.path.dirname(index), "models", "cnn-a.html")).read()
    assert "Unnamed" in card and "img/x/" in card  # the mode's hardest real images are shown
    assert np.isfinite([m["gap"] for m in shirts]).all()
