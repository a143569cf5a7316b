"""Hostile and careless input, round 3 (issue 20): every value that can be checked before any
work is checked then, in one line naming the key, row, model or file and the fix; a bad image
is an error row, never a silently black one.

Nothing here starts Ray: the checks are called directly, the config mistakes go through the
CLI (they exit 2 before the run directory gets a manifest), and the placement check runs
with Ray's resource queries replaced.
"""

from __future__ import annotations

import io
import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from audit.pipeline.config import load_config


def _png(value: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _manifest(path, labels: list, splits: list[str] | None = None, meta: bytes | None = None):
    n = len(labels)
    t = pa.table(
        {
            "example_id": [f"ex-{i}" for i in range(n)],
            "split": splits or ["debug"] * n,
            "label": pa.array(labels, pa.int64()),
            "image": pa.array([_png()] * n, pa.binary()),
        }
    )
    if meta is not None:
        t = t.replace_schema_metadata({b"classes": meta})
    pq.write_table(t, str(path))
    return str(path)


# -- 1. labels are checked before a class list is built from them ------------------------------
@pytest.mark.parametrize(
    ("label", "expected"),
    [
        (2**62, ["row 2", "'ex-2'", str(2**62), "class names"]),
        (-1, ["row 2", "'ex-2'", "-1", "non-negative"]),
        (None, ["row 2", "'ex-2'", "no label"]),
    ],
)
def test_a_huge_negative_or_missing_label_is_refused_before_the_class_list(
    tmp_path, label, expected
):
    """A single label of 2**62 grew the driver to 16.6 GB (``max(label) + 1`` class names)."""
    from audit.data.readers import read_dataset

    path = _manifest(tmp_path / "m.parquet", [0, 1, label])
    with pytest.raises(ValueError) as e:
        read_dataset(path)
    msg = str(e.value)
    assert path in msg
    for part in expected:
        assert part in msg, (part, msg)


def test_a_label_beyond_the_given_classes_is_refused_before_the_cast(tmp_path):
    from audit.data.readers import read_dataset

    path = _manifest(tmp_path / "m.parquet", [0, 2**40, 1], meta=b'["a", "b"]')
    with pytest.raises(ValueError, match=r"row 1 \(example_id='ex-1'\) has label 1099511627776"):
        read_dataset(path)
    assert len(read_dataset(_manifest(tmp_path / "ok.parquet", [0, 1, 1]))) == 3


# -- 2. threads per worker beyond the cluster's cores -----------------------------------------
def test_threads_per_worker_beyond_the_cores_is_clamped_with_one_warning(monkeypatch, caplog):
    """``[ray] threads_per_worker = 3`` on 2 cores hung forever: shards asked for 3 CPUs."""
    import ray

    import cluster.sweep as cs
    from audit.zoo.spec import ModelSpec

    specs = [ModelSpec(name=f"m{i}", family="f", arch="resnet18") for i in range(3)]
    job = cs.SweepJob(
        np.zeros((1, 8, 8, 3), np.uint8), np.array(["a"]), np.array([0]), ["c"], specs, {}
    )
    monkeypatch.setattr(cs, "model_profiles", lambda s, n: ({m.name: 1.0 for m in s},) * 2)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    for workers, asked, want in ((1, 3, (1, 2)), (2, 3, (2, 1)), (2, 2, (2, 1)), (3, 0, (2, 1))):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cluster.sweep"):
            plan, opts, _, threads = cs.RaySweeper(workers, asked or None)._placement(job)
        assert (len(plan), threads) == want and opts["num_cpus"] == threads, (workers, asked)
        warned = [r.getMessage() for r in caplog.records]
        assert len(warned) == 1, warned
        assert "[ray]" in warned[0] and "2 CPUs" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cluster.sweep"):
        plan, opts, _, threads = cs.RaySweeper(2, None)._placement(job)
    assert (len(plan), threads) == (2, 1) and not caplog.records  # what fits: no warning


# -- 5 and strict types: every key's range and type, before any work ----------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[stats]\nn_boot = 1180591620717411303424", ["[stats] n_boot", "less than or equal"]),
        ("[stats]\nn_boot = 1000000000", ["[stats] n_boot", "less than or equal"]),
        ("[stats]\nseed = -1", ["[stats] seed", "greater than or equal to 0"]),
        ("[generate]\nseed = -1", ["[generate] seed", "greater than or equal to 0"]),
        ("[mitigate]\nn_boot = 1000000000", ["[mitigate] n_boot", "less than or equal"]),
        ("[stats]\nthreshold = nan", ["[stats] threshold", "finite"]),
        ("[mitigate]\nupweight = inf", ["[mitigate] upweight", "finite"]),
        ("[data]\nlimit = 1180591620717411303424", ["[data] limit", "less than or equal"]),
        ('[ray]\nbatch_size = "256"', ["[ray] batch_size", "valid integer", "'256'"]),
        ('[ray]\nwith_features = "yes"', ["[ray] with_features", "valid boolean", "'yes'"]),
        ("[ray]\nthreads_per_worker = 100000", ["[ray] threads_per_worker", "less than"]),
        ('[data]\neval_split = "tset"', ["[data] eval_split", "'test'"]),
        ("[mitigate]\nenabled = false\nlambdas = [1.5]", ["[mitigate] lambdas.0", "less than 1"]),
        ("[mitigate]\nlambdas = []", ["[mitigate] lambdas", "at least 1"]),
        ("[stats]\nthreshold = 0.5\nn_clusters = 2", ["[stats]", "threshold", "n_clusters"]),
        (
            '[directions]\nenabled = false\nembedder = "open_clp:ViT-B-32"',
            ["[directions] embedder", "unknown embedder", "open_clip"],
        ),
    ],
)
def test_config_ranges_and_types_name_the_key(tmp_path, text, expected):
    bad = tmp_path / "bad.toml"
    bad.write_text(f"[data]\npath = 'x'\n{text}\n".replace("[data]\npath = 'x'\n[data]", "[data]"))
    with pytest.raises(ValueError) as e:
        load_config(str(bad))
    msg = str(e.value)
    assert str(bad) in msg and len(msg.splitlines()) == 1, msg
    for part in expected:
        assert part in msg, (part, msg)


def test_toml_ints_stay_floats_and_shipped_configs_load(tmp_path):
    ok = tmp_path / "ok.toml"
    ok.write_text(
        "[data]\npath = 'x'\n[stats]\nthreshold = 0\n[mitigate]\nupweight = 5\n"
        "lambdas = [0, 0.5]\nalpha = 0\n"
    )
    cfg = load_config(str(ok))
    assert cfg.mitigate.upweight == 5.0 and cfg.mitigate.lambdas == [0.0, 0.5]
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in os.listdir(os.path.join(here, "configs", "audit")):
        assert load_config(os.path.join(here, "configs", "audit", name)).data.split


def _cli_one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    ("section", "want"),
    [
        ("[stats]\nn_boot = 1000000000", "[stats] n_boot"),
        ("[stats]\nseed = -1", "[stats] seed"),
        ('[generate]\nenabled = false\nbackend = "stable-diffusion"', "[generate] backend"),
        ('[generate]\ncompare = ["retrieval", "bogus"]', "[generate] compare"),
    ],
)
def test_cli_config_mistakes_exit_2_before_any_work(tmp_path, capsys, section, want):
    from cluster.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\npath = "{tmp_path / "nowhere.parquet"}"\n{section}\n')
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 2
    line = _cli_one_line(capsys)
    assert want in line and str(cfg) in line, line
    assert not os.path.exists(out / "manifest.json")


# -- errors found late: now found when the data and the zoo are loaded --------------------------
def _config(tmp_path, data: str, zoo: str, extra: str = "") -> str:
    p = tmp_path / "audit.toml"
    p.write_text(
        f'[data]\npath = "{data}"\n[zoo]\nmanifest = "{zoo}"\n[directions]\nenabled = false\n'
        f"[generate]\nenabled = false\n{extra}\n"
    )
    return str(p)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("[stats]\nn_clusters = 3", ["[stats] n_clusters = 3", "2 models"]),
        ('[data]\nattributes = ["colour"]', ["[data] attributes", "'colour'", "color"]),
        (
            '[directions]\nembedder = "features:tiny-resnt"',
            ["[directions] embedder", "'tiny-resnt'", "tiny-resnet"],
        ),
    ],
)
def test_keys_checked_against_the_data_and_zoo_when_loaded(
    tmp_path, tiny_world, tiny_zoo_path, extra, expected
):
    """``n_clusters`` out of range failed after the sweep; unknown attributes were accepted
    while directions were off; ``features:MODEL`` of no member failed in the embed stage."""
    from audit.pipeline.inputs import load_inputs

    text = _config(tmp_path, tiny_world, tiny_zoo_path)
    section = extra.split("\n", 1)[0]
    body = open(text).read()
    if section in body:  # a key of a section the base config has
        body = body.replace(section + "\n", extra + "\n", 1)
    else:
        body += extra + "\n"
    open(text, "w").write(body)
    with pytest.raises(ValueError) as e:
        load_inputs(load_config(text))
    msg = str(e.value)
    for part in expected:
        assert part in msg, (part, msg)


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "a\\b"])
def test_a_zoo_model_name_that_escapes_the_run_directory_is_refused_at_load(tmp_path, name):
    """A member named "../x" or "a/b" failed the whole sweep after it ran."""
    from audit.zoo.spec import ZooSpec

    zoo = tmp_path / "zoo.toml"
    toml_name = json.dumps(name)  # a TOML basic string
    zoo.write_text(f'name = "z"\n[[models]]\nname = {toml_name}\nfamily = "f"\narch = "resnet18"\n')
    with pytest.raises(ValueError) as e:
        ZooSpec.from_toml(str(zoo))
    msg = str(e.value)
    assert str(zoo) in msg and repr(name) in msg and "letters, digits" in msg, msg


def test_no_train_split_with_members_trained_here_is_one_line_before_training(
    tmp_path, tiny_zoo_path
):
    """Every model failed with ``torch.cat(): expected a non-empty list of Tensors``."""
    from audit.pipeline.inputs import load_inputs

    data = _manifest(tmp_path / "m.parquet", [0, 1, 0, 1], meta=b'["a", "b"]')
    with pytest.raises(ValueError) as e:
        load_inputs(load_config(_config(tmp_path, data, tiny_zoo_path)))
    msg = str(e.value)
    assert "no train split" in msg and data in msg and "tiny-resnet" in msg
    assert 'weights = "train"' in msg and "split = 'train'" in msg


def test_only_timm_members_with_weights_train_count_as_trained_here():
    """An open_clip or package member leaves ``weights`` at its default: it brings its own
    weights, so the shipped 40-model zoo needs no train split (CLIP members counted as trained)."""
    from audit.zoo.spec import ZooSpec

    zoo = ZooSpec.from_toml("imagenet40")
    kinds = {m.builder: m.trained_here for m in zoo}
    assert kinds.get("open_clip") is False and kinds.get("efficientnet_lite_pkg") is False
    assert not [m.name for m in zoo if m.trained_here]
    assert all(m.trained_here for m in ZooSpec.from_toml("demo"))


# -- files that do not parse name themselves ----------------------------------------------------
def test_parquet_and_json_errors_name_the_file(tmp_path):
    from audit.data.readers import read_dataset
    from audit.data.table import ImageTable

    good = _manifest(tmp_path / "good.parquet", [0, 1, 1])
    blob = open(good, "rb").read()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(blob[: len(blob) // 3] + blob[-8:])
    meta = _manifest(tmp_path / "meta.parquet", [0, 1], meta=b'["a", "b"')
    for path in (str(cut), meta):
        for read in (read_dataset, ImageTable.from_parquet):
            with pytest.raises(ValueError) as e:
                read(path)
            assert path in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="classes"):
        read_dataset(meta)


# -- a NaN image is an error row, not a black one ------------------------------------------------
def _float_tiff(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.float32), mode="F").save(buf, format="TIFF")
    return buf.getvalue()


def test_a_nan_float_image_is_an_error_row(tmp_path):
    from audit.data.table import ImageTable

    good = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    nan = good.copy()
    nan[2, 3] = np.nan
    inf = good.copy()
    inf[0, 0] = np.inf
    blobs = [_float_tiff(good), _float_tiff(nan), _float_tiff(inf), _png()]
    t = pa.table(
        {
            "example_id": ["good", "nan", "inf", "png"],
            "split": ["debug"] * 4,
            "label": pa.array([0] * 4, pa.int32()),
            "image": pa.array(blobs, pa.binary()),
        }
    )
    images, ok, errors = ImageTable(t, ["a"]).decode()
    assert ok.tolist() == [0, 3] and images.shape == (2, 8, 8, 3)
    assert [e.item for e in errors] == ["nan", "inf"]
    assert all("NaN or infinite" in e.reason for e in errors), errors
    assert images[0].max() == 255 and images[0].min() == 0  # the finite float image still reads
