"""Training zoo members from scratch (the demo zoo), cached by content hash.

A checkpoint's key hashes the model spec and its training hyper-parameters, the training
data, this code's declared version (:data:`TRAIN_VERSION`) and the torch/timm versions, so
changing any of them retrains exactly the affected models and a second run trains nothing.
Weights are stored as safetensors under ``$ZOO_AUDIT_CACHE/zoo/``.

:func:`train_zoo` trains the members in turn, each through :func:`train_member`; a runner that
trains them in parallel workers asks :func:`pending_members` what is left and dispatches
:func:`train_member` calls itself (``threads=1`` per worker).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from audit.cache import atomic_write, cache_dir, code_version, content_hash
from audit.data.table import ImageTable
from audit.zoo.spec import ModelSpec, ZooSpec

log = logging.getLogger(__name__)

#: models built on several Python threads (an in-process executor) draw their seeded initial
#: weights one at a time from torch's process-wide generator
_INIT_LOCK = threading.Lock()

# Bump when what a checkpoint holds changes for the same spec and data: this module, the
# training loop (audit/zoo/loop.py), or the builders and preprocessing in audit/zoo/models.py.
TRAIN_VERSION = 1

TRAIN_DEFAULTS = {
    "epochs": 4,
    "batch_size": 128,
    "lr": 2e-3,
    "weight_decay": 0.05,
    "seed": 0,
    "label_smoothing": 0.0,
}


_HASHED: dict[
    int, tuple[object, str]
] = {}  # id(arrow table) -> (the table, its hash): a few recent


def data_hash(table: ImageTable) -> str:
    """Hash of the examples a model trains on (ids, labels, image bytes).

    Remembered for the few tables hashed last (by identity: an Arrow table never changes), so
    a run that asks for the same split's hash in several stages reads its bytes once."""
    hit = _HASHED.get(id(table.table))
    if hit is not None and hit[0] is table.table:
        return hit[1]
    h = hashlib.sha256()
    h.update(",".join(table.classes).encode())
    for col in ("example_id", "label"):
        h.update(np.asarray(table.column(col)).astype(str).tobytes())
    if "image" in table.columns:
        for chunk in table.table["image"].chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    h.update(memoryview(buf))
    out = h.hexdigest()[:16]
    while len(_HASHED) >= 8:
        _HASHED.pop(next(iter(_HASHED)))
    _HASHED[id(table.table)] = (table.table, out)
    return out


def train_hash(data: ImageTable | str) -> str:
    """The train split's :func:`data_hash` (``data`` a dataset, or that hash already)."""
    return data if isinstance(data, str) else data_hash(data.split("train"))


def resolve_train_hparams(spec: ModelSpec) -> dict:
    """The training hyper-parameters of ``spec``: :data:`TRAIN_DEFAULTS` overridden by ``spec.train``."""
    return {**TRAIN_DEFAULTS, **spec.train}


def checkpoint_key(spec: ModelSpec, dhash: str) -> str:
    """Key of ``spec``'s checkpoint: its spec and resolved hyper-parameters, the data hash, the
    training code's version and the torch/timm versions."""
    code = code_version("zoo.train", TRAIN_VERSION, torch_stack=True)
    return content_hash(spec.to_dict(), resolve_train_hparams(spec), dhash, code)


def checkpoint_path(spec: ModelSpec, dhash: str, cache: str | None = None) -> str:
    root = cache or cache_dir("zoo")
    os.makedirs(root, exist_ok=True)
    return os.path.join(root, f"{spec.name}-{checkpoint_key(spec, dhash)}.safetensors")


@dataclass
class TrainResult:
    name: str
    path: str
    trained: bool  # False when it came from the cache
    seconds: float
    train_accuracy: float | None = None


def train_model(
    spec: ModelSpec,
    images: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    device: str = "cpu",
    progress: bool = True,
    threads: int | None = None,
) -> dict:
    """Train ``spec`` from scratch on uint8 images ``[N, H, W, 3]`` with int labels ``[N]``;
    returns its state dict (CPU tensors). ``threads``: torch intra-op threads to train with
    (None: leave the process's setting as is), restored afterwards."""
    import torch

    from audit.zoo.loop import channels_last, torch_threads, train_loop
    from audit.zoo.models import _timm_input_config, create_timm, preprocess

    if not spec.trained_here:
        raise ValueError(
            f"model {spec.name!r} is not trained here (builder={spec.builder}, weights={spec.weights})"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"images [N, H, W, 3] and labels [N] disagree on N: {len(images)} vs {len(labels)}"
        )
    hp = resolve_train_hparams(spec)
    with torch_threads(threads):
        with _INIT_LOCK:  # the seeded initial weights: torch's generator is the process's
            torch.manual_seed(int(hp["seed"]))
            model = channels_last(create_timm(spec, len(classes)).to(device))
        cfg = _timm_input_config(model, spec)
        x_all = torch.cat(
            [preprocess(images[i : i + 1024], cfg, "cpu") for i in range(0, len(images), 1024)]
        )
        y_all = torch.as_tensor(labels, dtype=torch.long)
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=float(hp["label_smoothing"]))

        def step_loss(idx, gen):
            xb, yb = x_all[idx].to(device), y_all[idx].to(device)
            flip = torch.rand(len(idx), generator=gen) < 0.5  # horizontal flip per image
            xb = torch.where(flip.view(-1, 1, 1, 1).to(device), xb.flip(-1), xb)
            return loss_fn(model(channels_last(xb)), yb)

        model.train()
        train_loop(
            model.parameters(),
            step_loss,
            n=len(x_all),
            batch_size=int(hp["batch_size"]),
            epochs=int(hp["epochs"]),
            lr=float(hp["lr"]),
            weight_decay=float(hp["weight_decay"]),
            pct_start=0.15,
            seed=int(hp["seed"]),
            progress=progress,
            desc=f"train {spec.name}",
        )
        model.eval()
        return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class TrainSet:
    """A decoded train split: uint8 ``images [N, H, W, 3]``, int ``labels [N]``, the class
    names and the split's :func:`data_hash` (recorded in each checkpoint's metadata)."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    dhash: str

    @classmethod
    def decode(cls, train: ImageTable) -> TrainSet:
        """Decode ``train`` once; undecodable rows are left out with a warning."""
        images, ok, errors = train.decode()
        if errors:
            log.warning("%d training images could not be decoded and are skipped", len(errors))
        return cls(images, train.labels[ok], list(train.classes), data_hash(train))


def trainable_members(zoo: ZooSpec, names: list[str] | None = None) -> list[ModelSpec]:
    """The members of ``zoo`` (or of its ``names``) that this module trains (``weights = "train"``)."""
    return [m for m in zoo.select(names) if m.trained_here]


def member_checkpoints(
    zoo: ZooSpec, data: ImageTable | str, cache: str | None = None, names: list[str] | None = None
) -> list[tuple[ModelSpec, str]]:
    """``(spec, checkpoint path)`` of every trainable member for ``data``'s train split
    (``data``: the dataset, or its train split's :func:`data_hash`)."""
    dhash = train_hash(data)
    return [(spec, checkpoint_path(spec, dhash, cache)) for spec in trainable_members(zoo, names)]


def pending_members(
    zoo: ZooSpec, data: ImageTable | str, cache: str | None = None, names: list[str] | None = None
) -> list[tuple[ModelSpec, str]]:
    """``(spec, checkpoint path)`` of the trainable members whose checkpoint does not exist yet."""
    return [
        (spec, path)
        for spec, path in member_checkpoints(zoo, data, cache, names)
        if not os.path.exists(path)
    ]


def train_member(
    spec: ModelSpec,
    train: ImageTable | TrainSet,
    path: str,
    device: str = "cpu",
    threads: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``spec`` on the train split ``train`` (a table, decoded here, or a decoded
    :class:`TrainSet`) and write its checkpoint to ``path`` atomically."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    data = train if isinstance(train, TrainSet) else TrainSet.decode(train)
    state = train_model(
        spec,
        data.images,
        data.labels,
        data.classes,
        device=device,
        progress=progress,
        threads=threads,
    )
    with atomic_write(path) as tmp:
        save_file(state, tmp, metadata={"model": spec.name, "data": data.dhash})
    seconds = time.perf_counter() - t0
    log.info("trained %s in %.1fs", spec.name, seconds)
    return TrainResult(spec.name, path, True, seconds)


def train_zoo(
    zoo: ZooSpec,
    data: ImageTable,
    device: str = "cpu",
    cache: str | None = None,
    progress: bool = True,
    names: list[str] | None = None,
    threads: int | None = None,
) -> list[TrainResult]:
    """Train every ``weights = "train"`` member of ``zoo`` on ``data``'s train split, in turn.

    Members whose checkpoint for this (spec, data, code version) exists come from the cache.
    ``threads``: torch intra-op threads per member (None: all of the machine's cores).
    """
    threads = threads if threads is not None else max(1, os.cpu_count() or 1)
    train = data.split("train")
    decoded = None  # decoded once, and only when a member needs training
    results = []
    for spec, path in member_checkpoints(zoo, data, cache, names):
        if os.path.exists(path):
            results.append(TrainResult(spec.name, path, False, 0.0))
            continue
        if decoded is None:
            decoded = TrainSet.decode(train)
        results.append(
            train_member(spec, decoded, path, device=device, threads=threads, progress=progress)
        )
    return results


def trained_weights(
    zoo: ZooSpec, data: ImageTable | str, cache: str | None = None
) -> dict[str, str]:
    """``{model name: checkpoint path}`` for trained members whose checkpoint exists
    (``data``: the dataset, or its train split's :func:`data_hash`)."""
    return {
        spec.name: path
        for spec, path in member_checkpoints(zoo, data, cache)
        if os.path.exists(path)
    }
