"""Which captions a cluster's shared synthetic set is made from."""

from __future__ import annotations

import pyarrow as pa

from cluster.generate_stage import cluster_hard_captions, set_id_for
from serve.config import check_set_id


def test_cluster_hard_captions_take_the_top_hard_caption_of_significant_directions():
    dirs = pa.Table.from_pylist([
        {"scope": "cluster:0", "class": "bag", "mode": 0, "status": "ok"},
        {"scope": "cluster:0", "class": "dress", "mode": 0, "status": "not_significant"},
        {"scope": "m1", "class": "bag", "mode": 0, "status": "ok"},
    ])  # fmt: skip
    caps = pa.Table.from_pylist([
        {"scope": "cluster:0", "class": "bag", "mode": 0, "polarity": "hard", "rank": 1, "caption": "a photo of a green bag"},
        {"scope": "cluster:0", "class": "bag", "mode": 0, "polarity": "hard", "rank": 2, "caption": "a photo of a red bag"},
        {"scope": "cluster:0", "class": "bag", "mode": 0, "polarity": "easy", "rank": 1, "caption": "a photo of a bag"},
        {"scope": "cluster:0", "class": "dress", "mode": 0, "polarity": "hard", "rank": 1, "caption": "a photo of a dress"},
        {"scope": "m1", "class": "bag", "mode": 0, "polarity": "hard", "rank": 1, "caption": "a photo of a blue bag"},
    ])  # fmt: skip
    assert cluster_hard_captions(caps, dirs) == {"cluster:0": ["a photo of a green bag"]}
    assert check_set_id(set_id_for("cluster:0", "0123456789abcdef")) == "cluster-0-hard-01234567"
