"""Which captions a cluster's shared synthetic set is made from."""

from __future__ import annotations

import pyarrow as pa
import pytest

from audit.pipeline.generate import cluster_hard_captions, set_id_for
from serve.config import check_set_id


def test_cluster_hard_captions_take_the_top_hard_caption_of_significant_directions():
    dirs = pa.Table.from_pylist(
        [
            {"scope": "cluster:0", "class": "bag", "mode": 0, "status": "ok"},
            {"scope": "cluster:0", "class": "dress", "mode": 0, "status": "not_significant"},
            {"scope": "m1", "class": "bag", "mode": 0, "status": "ok"},
        ]
    )
    caps = pa.Table.from_pylist(
        [
            {
                "scope": "cluster:0",
                "class": "bag",
                "mode": 0,
                "polarity": "hard",
                "rank": 1,
                "caption": "a photo of a green bag",
            },
            {
                "scope": "cluster:0",
                "class": "bag",
                "mode": 0,
                "polarity": "hard",
                "rank": 2,
                "caption": "a photo of a red bag",
            },
            {
                "scope": "cluster:0",
                "class": "bag",
                "mode": 0,
                "polarity": "easy",
                "rank": 1,
                "caption": "a photo of a bag",
            },
            {
                "scope": "cluster:0",
                "class": "dress",
                "mode": 0,
                "polarity": "hard",
                "rank": 1,
                "caption": "a photo of a dress",
            },
            {
                "scope": "m1",
                "class": "bag",
                "mode": 0,
                "polarity": "hard",
                "rank": 1,
                "caption": "a photo of a blue bag",
            },
        ]
    )
    assert cluster_hard_captions(caps, dirs) == {"cluster:0": ["a photo of a green bag"]}
    assert check_set_id(set_id_for("cluster:0", "0123456789abcdef")) == "cluster-0-hard-01234567"


@pytest.mark.ray
def test_serve_generator_makes_one_set_per_cluster_in_the_run(ray_session, tiny_world, tmp_path):
    """The in-process Serve app (world renderer) stores k images per caption under RUN/synthetic/."""
    from audit.store import RunStore
    from cluster.generate import ServeSetGenerator
    from serve.sets import load_set

    store = RunStore(str(tmp_path / "run"))
    wanted = {
        "cluster:0": ["a photo of a blue t-shirt", "a photo of a sandal on brick"],
        "cluster:1": ["a photo of a red trouser"],
    }
    ids = {s: set_id_for(s, "feedbeef00") for s in wanted}
    table = ServeSetGenerator("world", store.uri, tiny_world).request_sets(wanted, ids, 3, 0)
    assert table["scope"].to_pylist() == ["cluster:0", "cluster:1"]
    for r in table.to_pylist():
        images, meta = load_set(store, r["set_id"])
        assert len(images) == r["n_images"] == 3 * len(wanted[r["scope"]])
        assert sorted(set(meta["prompt"].to_pylist())) == sorted(wanted[r["scope"]])
    with pytest.raises(ValueError, match="not a world"):
        ServeSetGenerator("world", store.uri, None).request_sets(wanted, ids, 3, 0)
