"""Where a model's predictions and features live in the run directory, and reading them back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from audit.store import RunStore


def prediction_path(model: str, root: str = "predictions") -> str:
    return f"{root}/model={model}/part-00000.parquet"


def feature_path(model: str, root: str = "features") -> str:
    return f"{root}/model={model}/part-00000.parquet"


def align_ids(have, want) -> np.ndarray:
    """Index into ``have`` of every id of ``want`` (-1 where absent); ids compared as strings."""
    pos = {str(e): i for i, e in enumerate(np.asarray(have).tolist())}
    return np.fromiter(
        (pos.get(str(e), -1) for e in np.asarray(want).tolist()), np.int64, len(want)
    )


@dataclass
class ModelResult:
    name: str
    predictions: pa.Table | None
    features: np.ndarray | None
    error: str | None
    batch_size: int = 0


def features_table(example_ids: np.ndarray, features: np.ndarray) -> pa.Table:
    feats = np.asarray(features, np.float32)
    return pa.table(
        {
            "example_id": pa.array(np.asarray(example_ids).astype(str)),
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(feats.reshape(-1)), feats.shape[1]
            ),
        }
    )


def store_result(store: RunStore, result: ModelResult, stage: str = "predict") -> bool:
    """Write a model's predictions (and features), or its error row. True when stored."""
    if result.error is not None:
        store.record_errors(
            [{"stage": stage, "item": f"model {result.name}", "reason": result.error}]
        )
        return False
    if result.features is not None:
        ids = result.predictions["example_id"].to_numpy(zero_copy_only=False)
        store.write_table(feature_path(result.name), features_table(ids, result.features))
    store.write_table(prediction_path(result.name), result.predictions)
    return True


def load_predictions(store: RunStore, models: Sequence[str] | None = None) -> dict[str, pa.Table]:
    """``{model: predictions table}`` for every model with predictions in the run."""
    names = models or [
        d.split("=", 1)[1] for d in store.listdir("predictions") if d.startswith("model=")
    ]
    return {
        m: store.read_table(f"predictions/model={m}")
        for m in names
        if store.exists(f"predictions/model={m}")
    }
