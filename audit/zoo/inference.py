"""The one forward loop: preprocessing from the model's own input config, batched
inference in ``torch.inference_mode`` (fp16 autocast on CUDA), and an out-of-memory retry
at half the batch. Used by the shard actors, the embedders and the trainers alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from audit.zoo.loop import channels_last
from audit.zoo.spec import InputConfig

log = logging.getLogger(__name__)


def preprocess(images, cfg: InputConfig, device: str = "cpu"):
    """uint8 ``[B, H, W, 3]`` (numpy or tensor) -> float ``[B, 3, S, S]`` normalised per ``cfg``.

    Resize so the short side is ``S / crop_pct``, centre-crop ``S``, normalise: the same
    order as timm's eval transform, done on the batch (on ``device``) instead of per image.
    """
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    s = cfg.input_size
    scaled = int(round(s / cfg.crop_pct)) if cfg.crop_pct < 1.0 else s
    if x.shape[-1] != scaled or x.shape[-2] != scaled:
        mode = "bicubic" if cfg.interpolation == "bicubic" else "bilinear"
        x = F.interpolate(x, size=(scaled, scaled), mode=mode, align_corners=False, antialias=True)
    if scaled != s:
        o = (scaled - s) // 2
        x = x[..., o : o + s, o : o + s]
    mean = torch.tensor(cfg.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def forward(
    module, x, batch_size: int, device: str = "cpu", with_features: bool = False
) -> dict[str, np.ndarray]:
    """Run a zoo module (``x -> (logits, features)``) on a preprocessed batch ``x [N, 3, S, S]``
    in chunks of ``batch_size``. Returns ``{"logits": [N, C]}`` (+ ``"features": [N, D]``), float32."""
    import torch

    logits, feats = [], []
    amp = str(device).startswith("cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=amp):
        for i in range(0, len(x), batch_size):
            out, f = module(channels_last(x[i : i + batch_size]))
            logits.append(out.float().cpu().numpy())
            if with_features:
                feats.append(f.float().cpu().numpy())
    res = {"logits": np.concatenate(logits) if logits else np.zeros((0, 0), np.float32)}
    if with_features:
        res["features"] = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
    return res


def predict_arrays(
    model,
    images: np.ndarray,
    batch_size: int = 256,
    device: str = "cpu",
    with_features: bool = False,
) -> dict[str, np.ndarray]:
    """Run a :class:`~audit.zoo.models.LoadedModel` on uint8 images ``[N, H, W, 3]``, preprocessing
    batch by batch (bounded memory). Same outputs as :func:`forward`."""
    parts = [
        forward(
            model.module,
            preprocess(images[i : i + batch_size], model.input_config, device),
            batch_size,
            device,
            with_features,
        )
        for i in range(0, len(images), batch_size)
    ]
    if not parts:
        out = {"logits": np.zeros((0, model.num_classes), np.float32)}
        if with_features:
            out["features"] = np.zeros((0, 0), np.float32)
        return out
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def is_oom(e: BaseException) -> bool:
    import torch

    return (
        isinstance(e, torch.cuda.OutOfMemoryError | MemoryError)
        or "out of memory" in str(e).lower()
    )


def predict_with_retry(
    predict: Callable[[int], dict], batch_size: int, min_batch: int = 1
) -> tuple[dict, int]:
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
