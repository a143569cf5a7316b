"""Running zoo members over a decoded dataset and storing their predictions.

:func:`run_model` is the unit of work shared by the plain single-process loop
(:func:`evaluate_zoo`, used by the demo without Ray and as the benchmark baseline) and
the Ray shards in ``cluster/``: load, predict with an out-of-memory retry at half the
batch, and turn failures into error rows instead of exceptions.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from audit.predictions import predictions_table
from audit.store import RunStore
from audit.zoo.spec import ModelSpec, ZooSpec

log = logging.getLogger(__name__)


def prediction_path(model: str) -> str:
    return f"predictions/model={model}/part-00000.parquet"


def feature_path(model: str) -> str:
    return f"features/model={model}/part-00000.parquet"


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError | MemoryError) or "out of memory" in str(e).lower()


def predict_with_retry(predict: Callable[[int], dict], batch_size: int, min_batch: int = 1) -> tuple[dict, int]:
    """Call ``predict(batch_size)``, halving the batch on out-of-memory until ``min_batch``."""
    while True:
        try:
            return predict(batch_size), batch_size
        except Exception as e:  # noqa: BLE001
            if not is_oom(e) or batch_size <= min_batch:
                raise
            log.warning("out of memory at batch %d; retrying at %d", batch_size, batch_size // 2)
            try:
                import torch

                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001
                pass
            batch_size //= 2


@dataclass
class ModelResult:
    name: str
    predictions: pa.Table | None
    features: np.ndarray | None
    error: str | None
    batch_size: int = 0


def run_model(spec: ModelSpec, classes: Sequence[str], images: np.ndarray, example_ids: np.ndarray,
              labels: np.ndarray, weights_path: str | None = None, device: str = "cpu",
              batch_size: int = 256, with_features: bool = False) -> ModelResult:  # fmt: skip
    """Load ``spec`` and predict on uint8 ``images [N, H, W, 3]``; never raises for model faults."""
    from audit.zoo.models import build_model, predict_arrays

    try:
        model = build_model(spec, classes, weights_path, device)
        out, bs = predict_with_retry(lambda b: predict_arrays(model, images, b, device, with_features), batch_size)
        if out["logits"].shape[1] != len(classes):
            raise ValueError(
                f"model outputs {out['logits'].shape[1]} classes but the dataset has {len(classes)}; "
                "give the spec a label map or use a dataset in the model's label space"
            )
        table = predictions_table(example_ids, labels, out["logits"])
        return ModelResult(spec.name, table, out.get("features"), None, bs)
    except Exception as e:  # noqa: BLE001 - one bad member costs that member, not the sweep
        log.warning("model %s failed: %s", spec.name, e)
        return ModelResult(spec.name, None, None, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")


def features_table(example_ids: np.ndarray, features: np.ndarray) -> pa.Table:
    feats = np.asarray(features, np.float32)
    return pa.table(
        {
            "example_id": pa.array(np.asarray(example_ids).astype(str)),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), feats.shape[1]),
        }
    )


def store_result(store: RunStore, result: ModelResult, stage: str = "predict") -> bool:
    """Write a model's predictions (and features), or its error row. True when stored."""
    if result.error is not None:
        store.record_errors([{"stage": stage, "item": f"model {result.name}", "reason": result.error}])
        return False
    if result.features is not None:
        store.write_table(feature_path(result.name), features_table(result.predictions["example_id"].to_numpy(zero_copy_only=False), result.features))
    store.write_table(prediction_path(result.name), result.predictions)
    return True


def evaluate_zoo(zoo: ZooSpec, classes: Sequence[str], images: np.ndarray, example_ids: np.ndarray,
                 labels: np.ndarray, store: RunStore, weights: dict[str, str], device: str = "cpu",
                 batch_size: int = 256, with_features: bool = False, progress: bool = True) -> list[str]:  # fmt: skip
    """The plain loop: every model in turn in this process. Returns the models stored."""
    from tqdm.auto import tqdm

    done = []
    for spec in tqdm(list(zoo), desc="evaluate zoo", disable=not progress):
        r = run_model(spec, classes, images, example_ids, labels, weights.get(spec.name), device, batch_size, with_features)
        if store_result(store, r):
            done.append(spec.name)
    return done


def load_predictions(store: RunStore, models: Sequence[str] | None = None) -> dict[str, pa.Table]:
    """``{model: predictions table}`` for every model with predictions in the run."""
    names = models or [d.split("=", 1)[1] for d in store.listdir("predictions") if d.startswith("model=")]
    return {m: store.read_table(f"predictions/model={m}") for m in names if store.exists(f"predictions/model={m}")}
