"""The failure matrix: which model fails on which example, bit-packed (models x examples,
``np.packbits`` along examples, rows padded to whole 64-bit words), built from per-model
prediction tables. Pure numpy/Arrow: no I/O, no Ray."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class FailureMatrix:
    """Which model fails on which example, bit-packed.

    ``packed``: uint8 ``[M, 8 * ceil(N / 64)]``; bit ``j`` of row ``i`` (``np.packbits`` order)
    is 1 when model ``i`` misclassifies example ``j``. Padding bits are 0.
    """

    models: tuple[str, ...]
    example_ids: np.ndarray  # [N] str
    packed: np.ndarray
    n_dropped: int = 0  # examples left out because some model has no prediction for them

    @property
    def n_models(self) -> int:
        return len(self.models)

    @property
    def n_examples(self) -> int:
        return len(self.example_ids)

    @classmethod
    def from_dense(
        cls,
        fails: np.ndarray,
        models: Sequence[str],
        example_ids: Sequence | None = None,
        n_dropped: int = 0,
    ) -> FailureMatrix:
        """From a boolean ``[M, N]`` array (True = the model fails on the example)."""
        fails = np.asarray(fails)
        if fails.ndim != 2:
            raise ValueError(f"fails must be 2-D [models, examples], got shape {fails.shape}")
        if fails.dtype != bool:
            if not np.isin(fails, (0, 1)).all():
                raise ValueError(
                    "fails must be boolean (or 0/1): True where the model misclassifies"
                )
            fails = fails.astype(bool)
        models = tuple(str(m) for m in models)
        if len(models) != fails.shape[0]:
            raise ValueError(
                f"{len(models)} model names for a failure matrix with {fails.shape[0]} rows"
            )
        if len(set(models)) != len(models):
            raise ValueError(
                f"duplicate model names: {sorted({m for m in models if models.count(m) > 1})}"
            )
        n = fails.shape[1]
        ids = (
            np.arange(n).astype(str) if example_ids is None else np.asarray(example_ids).astype(str)
        )
        if len(ids) != n:
            raise ValueError(f"{len(ids)} example ids for a failure matrix with {n} columns")
        words = (n + 63) // 64
        packed = np.zeros((fails.shape[0], words * 8), np.uint8)
        packed[:, : (n + 7) // 8] = np.packbits(fails, axis=1)
        return cls(models, ids, packed, n_dropped)

    def dense(self) -> np.ndarray:
        """Boolean ``[M, N]``."""
        return np.unpackbits(self.packed, axis=1, count=self.n_examples).astype(bool)

    def select(self, models: Sequence[str]) -> FailureMatrix:
        idx = [self._index(m) for m in models]
        return FailureMatrix(tuple(models), self.example_ids, self.packed[idx], self.n_dropped)

    def _index(self, model: str) -> int:
        try:
            return self.models.index(model)
        except ValueError:
            raise KeyError(
                f"model {model!r} is not in the failure matrix; it has {list(self.models)}"
            ) from None

    def counts(self, block: int | None = None, executor=None) -> tuple[np.ndarray, np.ndarray]:
        """``(n_fail [M], n_both [M, M])``: failures per model and per pair (diagonal = n_fail),
        as blocked 0/1 matrix products (:func:`audit.stats_blocks.pair_counts`): memory stays
        ~M x block whatever N is; ``executor`` runs ranges of blocks in parallel."""
        from audit.stats_blocks import DEFAULT_BLOCK, pair_counts

        return pair_counts(self.packed, self.n_examples, block or DEFAULT_BLOCK, executor)


def failure_matrix(
    predictions: Mapping[str, pa.Table], example_ids: Sequence | None = None
) -> FailureMatrix:
    """Build the failure matrix from per-model prediction tables (``example_id``, ``correct``).

    Tables are aligned on ``example_id``. With ``example_ids`` given, that order is used and
    every model must predict every one of them; otherwise the examples that all models
    predicted are used, in the first model's order (``n_dropped`` counts the rest).
    """
    if not predictions:
        raise ValueError(
            "no prediction tables given; run the sweep first (zoo-audit run CONFIG --out RUN)"
        )
    names = list(predictions)
    for name in names:
        missing = {"example_id", "correct"} - set(predictions[name].column_names)
        if missing:
            raise ValueError(f"predictions of model {name!r} lack column(s) {sorted(missing)}")
    first = predictions[names[0]]["example_id"].cast(pa.string())
    if example_ids is not None:
        ref = pa.array(np.asarray(example_ids).astype(str), pa.string())
        keep = None
    else:
        all_ids = [first.combine_chunks()]
        mask = np.ones(len(first), bool)
        for name in names[1:]:
            mask &= pc.is_in(
                first, value_set=predictions[name]["example_id"].cast(pa.string()).combine_chunks()
            ).to_numpy(zero_copy_only=False)
        ref = pc.filter(all_ids[0], pa.array(mask))
        keep = int((~mask).sum())
    if pc.count_distinct(ref).as_py() != len(ref):
        raise ValueError("example_id values must be unique")
    fails = np.zeros((len(names), len(ref)), bool)
    for i, name in enumerate(names):
        t = predictions[name]
        ids = t["example_id"].cast(pa.string()).combine_chunks()
        if pc.count_distinct(ids).as_py() != len(ids):
            raise ValueError(f"predictions of model {name!r} repeat example ids")
        pos = pc.index_in(ref, value_set=ids)
        if pos.null_count:
            raise ValueError(
                f"model {name!r} has no prediction for {pos.null_count} of the {len(ref)} requested examples; "
                "rerun the sweep for it or leave example_ids unset to use the common examples"
            )
        correct = t["correct"].combine_chunks().to_numpy(zero_copy_only=False).astype(bool)
        fails[i] = ~correct[pos.to_numpy(zero_copy_only=False)]
    n_dropped = 0 if keep is None else keep
    return FailureMatrix.from_dense(fails, names, ref.to_numpy(zero_copy_only=False), n_dropped)
