"""The run's generated images as one indexed set, and the zoo's outputs on them.

Every image of every synthetic set once (deduplicated by prompt and seed), numbered in the
order of ``synthetic_sets.parquet``: ``synthetic_images.parquet`` holds each image's id
(``syn-N``), prompt, seed, rank among its prompt's images, class label (the class its
caption names) and the sets it belongs to. The classify stage stores each model's
predictions and penultimate features on them under ``synthetic_predictions/`` and
``synthetic_features/`` in the layout of the real ones; head retraining and confirmation by
generation read them back here.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from audit.evaluate import align_ids, feature_path, prediction_path
from audit.store import RunStore

IMAGES = "synthetic_images.parquet"
PREDICTIONS, FEATURES = "synthetic_predictions", "synthetic_features"


def syn_prediction_path(model: str) -> str:
    return prediction_path(model, root=PREDICTIONS)


def syn_feature_path(model: str) -> str:
    return feature_path(model, root=FEATURES)


@dataclass
class SyntheticIndex:
    """The run's generated images (rows), without their pixels."""

    prompts: np.ndarray  # [N] str
    seeds: np.ndarray  # [N] int
    generators: np.ndarray  # [N] str: what made the image
    rank: np.ndarray  # [N] int: the image's index among its prompt's images
    labels: np.ndarray  # [N] int: the class the prompt names (-1: none)
    sets: dict[str, np.ndarray] = field(default_factory=dict)  # set_id -> rows

    @property
    def example_ids(self) -> np.ndarray:
        return np.asarray([f"syn-{i}" for i in range(len(self.prompts))])

    def of(self, set_id: str, k: int | None = None) -> np.ndarray:
        """Rows of a set (its first ``k`` images per prompt when ``k`` is given)."""
        idx = self.sets.get(set_id, np.zeros(0, np.int64))
        return idx if k is None else idx[self.rank[idx] < k]

    def take(self, rows: np.ndarray) -> SyntheticIndex:
        """Only ``rows`` (sorted), every set's rows renumbered."""
        keep = np.zeros(len(self.prompts), bool)
        keep[rows] = True
        new = np.cumsum(keep) - 1
        sets = {s: new[idx[keep[idx]]] for s, idx in self.sets.items()}
        cols = (self.prompts, self.seeds, self.generators, self.rank, self.labels)
        return SyntheticIndex(*(c[keep] for c in cols), sets)

    def table(self) -> pa.Table:
        member = [[] for _ in range(len(self.prompts))]
        for s, rows in self.sets.items():
            for r in rows.tolist():
                member[r].append(s)
        return pa.table(
            {
                "example_id": pa.array(self.example_ids.tolist(), pa.string()),
                "prompt": pa.array(self.prompts.tolist(), pa.string()),
                "seed": pa.array(self.seeds.astype(np.int64)),
                "generator": pa.array(self.generators.tolist(), pa.string()),
                "rank": pa.array(self.rank.astype(np.int32)),
                "label": pa.array(self.labels.astype(np.int32)),
                "sets": pa.array(member, pa.list_(pa.string())),
            }
        )

    @classmethod
    def from_table(cls, t: pa.Table, set_ids: list[str]) -> SyntheticIndex:
        """Read back; each set's rows in the order its images were made (row order)."""
        member = t["sets"].to_pylist()
        sets = {
            s: np.asarray([i for i, m in enumerate(member) if s in m], np.int64) for s in set_ids
        }
        names = ("prompt", "seed", "generator", "rank", "label")
        col = {c: t[c].to_numpy(zero_copy_only=False) for c in names}
        gens = col["generator"].astype(str)
        return cls(col["prompt"].astype(str), col["seed"], gens, col["rank"], col["label"], sets)


def index_sets(
    store: RunStore, sets: pa.Table, labels_of: dict[str, int]
) -> tuple[SyntheticIndex, list[bytes]]:
    """Every image of ``sets`` (rows of ``synthetic_sets.parquet``) once (by generator, prompt
    and seed), with its PNG bytes; ``labels_of`` maps a prompt to its class (others get -1)."""
    key_to_row: dict[tuple[str, str, int], int] = {}
    pngs, cols, by_set = [], {"prompt": [], "seed": [], "generator": [], "rank": []}, {}
    for r in sets.to_pylist():
        t = store.read_table(f"synthetic/{r['set_id']}", columns=["png", "prompt", "seed"])
        rows, seen = [], {}
        for png, prompt, seed in zip(
            *(t[c].to_pylist() for c in ("png", "prompt", "seed")), strict=True
        ):
            rank = seen[prompt] = (
                seen.get(prompt, -1) + 1
            )  # its index among its prompt's (row order)
            key = (r["generator"], prompt, int(seed))
            if key not in key_to_row:
                key_to_row[key] = len(pngs)
                pngs.append(png)
                for c, v in zip(cols, (prompt, int(seed), r["generator"], int(rank)), strict=True):
                    cols[c].append(v)
            rows.append(key_to_row[key])
        by_set[r["set_id"]] = np.asarray(rows, np.int64)
    labels = np.asarray([labels_of.get(p, -1) for p in cols["prompt"]], np.int64)
    arrays = [
        np.asarray(cols[c], t)
        for c, t in (("prompt", str), ("seed", np.int64), ("generator", str), ("rank", np.int64))
    ]
    return SyntheticIndex(*arrays, labels, by_set), pngs


def decode_pngs(pngs: list[bytes]) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` of PNG bytes."""
    from PIL import Image

    if not pngs:
        return np.zeros((0, 1, 1, 3), np.uint8)
    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in pngs])


def load_index(store: RunStore) -> SyntheticIndex:
    sets = store.read_table("synthetic_sets.parquet")["set_id"].to_pylist()
    return SyntheticIndex.from_table(store.read_table(IMAGES), sets)


def syn_features(store: RunStore, model: str, index: SyntheticIndex) -> np.ndarray | None:
    """``[N, D]`` float64 features of ``model`` on the index's rows (None when not stored)."""
    rel = syn_feature_path(model)
    if not store.exists(rel):
        return None
    t = store.read_table(rel)
    vec = np.asarray(t["vector"].combine_chunks().flatten().to_numpy(), np.float64)
    idx = align_ids(t["example_id"].to_numpy(zero_copy_only=False), index.example_ids)
    return vec.reshape(t.num_rows, -1)[idx]


def syn_correct(store: RunStore, model: str, index: SyntheticIndex) -> np.ndarray | None:
    """``[N]`` bool: ``model`` classifies the image as the class its caption names."""
    rel = syn_prediction_path(model)
    if not store.exists(rel):
        return None
    t = store.read_table(rel, columns=["example_id", "correct"])
    idx = align_ids(t["example_id"].to_numpy(zero_copy_only=False), index.example_ids)
    return t["correct"].to_numpy(zero_copy_only=False)[idx]
