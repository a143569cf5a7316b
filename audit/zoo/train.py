"""Training zoo members from scratch (the demo zoo), cached by content hash.

A checkpoint's key hashes the model spec, the training data and this training code, so
changing any of them retrains exactly the affected models and a second run trains nothing.
Weights are stored as safetensors under ``$ZOO_AUDIT_CACHE/zoo/``.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from audit.data.table import ImageTable
from audit.paths import cache_dir
from audit.store import content_hash
from audit.zoo.spec import ModelSpec, ZooSpec

log = logging.getLogger(__name__)

TRAIN_DEFAULTS = {"epochs": 4, "batch_size": 128, "lr": 2e-3, "weight_decay": 0.05, "seed": 0, "label_smoothing": 0.0}


def data_hash(table: ImageTable) -> str:
    """Hash of the examples a model trains on (ids, labels, image bytes)."""
    h = hashlib.sha256()
    h.update(",".join(table.classes).encode())
    for col in ("example_id", "label"):
        h.update(np.asarray(table.column(col)).astype(str).tobytes())
    if "image" in table.columns:
        for chunk in table.table["image"].chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    h.update(memoryview(buf))
    return h.hexdigest()[:16]


def _code_hash() -> str:
    import timm
    import torch

    from audit.zoo import models

    src = inspect.getsource(inspect.getmodule(_code_hash)) + inspect.getsource(models)
    return content_hash(src, timm.__version__, torch.__version__.split("+")[0])


def checkpoint_key(spec: ModelSpec, dhash: str) -> str:
    return content_hash(spec.to_dict(), dhash, _code_hash())


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


def train_model(spec: ModelSpec, images: np.ndarray, labels: np.ndarray, classes: list[str],
                device: str = "cpu", progress: bool = True) -> dict:  # fmt: skip
    """Train ``spec`` from scratch on uint8 images ``[N, H, W, 3]``; returns its state dict."""
    import torch
    from tqdm.auto import tqdm

    from audit.zoo.models import _timm_input_config, create_timm, preprocess

    if spec.builder != "timm" or spec.weights != "train":
        raise ValueError(f"model {spec.name!r} is not trained here (builder={spec.builder}, weights={spec.weights})")
    hp = {**TRAIN_DEFAULTS, **spec.train}
    torch.manual_seed(int(hp["seed"]))
    model = create_timm(spec, len(classes)).to(device)
    cfg = _timm_input_config(model, spec)
    x_all = torch.cat([preprocess(images[i : i + 1024], cfg, "cpu") for i in range(0, len(images), 1024)])
    y_all = torch.as_tensor(labels, dtype=torch.long)
    n, bs, epochs = len(x_all), int(hp["batch_size"]), int(hp["epochs"])
    steps = epochs * ((n + bs - 1) // bs)
    opt = torch.optim.AdamW(model.parameters(), lr=float(hp["lr"]), weight_decay=float(hp["weight_decay"]))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(hp["lr"]), total_steps=steps, pct_start=0.15)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=float(hp["label_smoothing"]))
    gen = torch.Generator().manual_seed(int(hp["seed"]))
    model.train()
    bar = tqdm(total=steps, desc=f"train {spec.name}", disable=not progress, leave=False)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            xb, yb = x_all[idx].to(device), y_all[idx].to(device)
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1).to(device), xb.flip(-1), xb)
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def train_zoo(zoo: ZooSpec, data: ImageTable, device: str = "cpu", cache: str | None = None,
              progress: bool = True, names: list[str] | None = None) -> list[TrainResult]:  # fmt: skip
    """Train every ``weights = "train"`` member of ``zoo`` on ``data``'s train split.

    Members whose checkpoint for this (spec, data, code) exists are loaded from the cache.
    """
    import torch
    from safetensors.torch import save_file

    train = data.split("train")
    dhash = data_hash(train)
    todo = [m for m in zoo.select(names) if m.builder == "timm" and m.weights == "train"]
    results, images, labels = [], None, None
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for spec in todo:
        path = checkpoint_path(spec, dhash, cache)
        if os.path.exists(path):
            results.append(TrainResult(spec.name, path, False, 0.0))
            continue
        if images is None:
            images, ok, errors = train.decode()
            if errors:
                log.warning("%d training images could not be decoded and are skipped", len(errors))
            labels = train.labels[ok]
        t0 = time.perf_counter()
        state = train_model(spec, images, labels, data.classes, device=device, progress=progress)
        tmp = path + f".tmp-{os.getpid()}"
        save_file(state, tmp, metadata={"model": spec.name, "data": dhash})
        os.replace(tmp, path)
        results.append(TrainResult(spec.name, path, True, time.perf_counter() - t0))
        log.info("trained %s in %.1fs", spec.name, results[-1].seconds)
    return results


def trained_weights(zoo: ZooSpec, data: ImageTable, cache: str | None = None) -> dict[str, str]:
    """``{model name: checkpoint path}`` for trained members whose checkpoint exists."""
    dhash = data_hash(data.split("train"))
    out = {}
    for spec in zoo:
        if spec.builder == "timm" and spec.weights == "train":
            p = checkpoint_path(spec, dhash, cache)
            if os.path.exists(p):
                out[spec.name] = p
    return out
