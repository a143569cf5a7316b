"""How the world encoder trains: its inputs (decoded images, the caption vocabulary through
the frozen MiniLM), its augmentation and its contrastive loss, and the loop that fits the
towers (:func:`audit.embed.world_encoder.train_world_encoder` caches the result)."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from audit.data.table import ImageTable
from audit.embed.vocab import CaptionVocab
from audit.embed.world_model import input_config_for

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """What the towers train on: the decodable images and, per granularity level, the
    MiniLM features of its vocabulary and each image's target in it."""

    vocab: CaptionVocab
    images: np.ndarray  # [N, H, W, 3] uint8, the decodable training images
    level_feats: list  # per level: tensor [T, V, text_dim] (templates x vocabulary)
    level_targets: list  # per level: LongTensor [N], each image's index in the vocabulary
    text_dim: int
    n_strings: int  # distinct strings MiniLM embedded
    timings: dict  # seconds per phase so far: decode, text


def training_data(
    rows: ImageTable, templates, device: str, progress: bool, t0: float
) -> TrainingData:
    """Decode ``rows`` and embed every distinct caption string once with the frozen MiniLM.

    Raises ValueError when fewer than 2 images decode; ``t0`` is when training started."""
    import torch

    from audit.embed.text import load_minilm

    vocab = CaptionVocab.build(rows, templates)
    timings = {}
    images, ok, errors = rows.decode()
    timings["decode"] = time.perf_counter() - t0
    if errors:
        log.warning("%d training images could not be decoded and are skipped", len(errors))
    if len(ok) < 2:
        raise ValueError(
            f"the world encoder needs at least 2 decodable training images; got {len(ok)}"
        )
    minilm = load_minilm(device)
    strings = vocab.all_texts()
    text_feats = _minilm_features(minilm, strings, progress)
    timings["text"] = time.perf_counter() - t0 - sum(timings.values())
    level_feats = [
        torch.as_tensor(np.stack([[text_feats[s] for s in tpl] for tpl in lvl])).to(device)
        for lvl in vocab.texts
    ]  # [T, V, 384]
    level_targets = [torch.as_tensor(t[ok]).to(device) for t in vocab.targets]
    return TrainingData(
        vocab, images, level_feats, level_targets, minilm.dim, len(strings), timings
    )


def _minilm_features(minilm, strings: list[str], progress: bool, chunk: int = 256) -> dict:
    """``{string: MiniLM vector [text_dim]}``, embedding ``chunk`` strings at a time."""
    from tqdm.auto import tqdm

    feats = {}
    for i in tqdm(
        range(0, len(strings), chunk), desc="MiniLM captions", disable=not progress, leave=False
    ):
        batch = strings[i : i + chunk]
        for s, e in zip(batch, minilm.encode(batch), strict=True):
            feats[s] = e
    return feats


def fit_towers(towers, data: TrainingData, hp: Mapping, device: str, progress: bool) -> int:
    """Train ``towers`` on ``data`` with ``hp``'s schedule; returns the number of images."""
    import torch

    from audit.zoo.loop import channels_last, train_loop
    from audit.zoo.models import preprocess

    images = data.images
    cfg = input_config_for(int(images.shape[1]))
    x_all = torch.cat(
        [preprocess(images[i : i + 2048], cfg, "cpu") for i in range(0, len(images), 2048)]
    )
    channels_last(towers["image"])
    step = functools.partial(_step_loss, towers=towers, x_all=x_all, data=data, device=device)
    towers.train()
    train_loop(
        towers.parameters(),
        step,
        n=len(x_all),
        batch_size=int(hp["batch_size"]),
        epochs=int(hp["epochs"]),
        lr=float(hp["lr"]),
        weight_decay=float(hp["weight_decay"]),
        pct_start=0.1,
        seed=int(hp["seed"]),
        drop_last=True,
        progress=progress,
        desc="train world encoder",
    )
    towers.eval()
    return len(x_all)


def _step_loss(idx, gen, *, towers, x_all, data: TrainingData, device: str):
    """The batch ``idx``'s loss, averaged over granularity levels; one random template a level."""
    import torch
    import torch.nn.functional as F

    from audit.zoo.loop import channels_last

    xb = channels_last(augment(x_all[idx], gen).to(device))
    img = F.normalize(towers["image"](xb), dim=-1)
    scale = towers.logit_scale.clamp(max=np.log(100.0)).exp()
    n_tpl = len(data.vocab.templates)
    loss = 0.0
    for feats, targets in zip(data.level_feats, data.level_targets, strict=True):
        t = int(torch.randint(n_tpl, (1,), generator=gen))
        txt = F.normalize(towers["text"](feats[t]), dim=-1)  # [V, D]
        loss = loss + contrastive_loss(img, txt, targets[idx.to(device)], scale)
    return loss / len(data.level_feats)


def contrastive_loss(img, txt, y, scale):
    """CLIP's symmetric loss for one level: ``img [B, D]`` against the level's whole
    vocabulary ``txt [V, D]`` (image side), each caption in the batch against the batch's
    images with every image of that caption a positive (text side); ``y [B]`` the targets."""
    import torch
    import torch.nn.functional as F

    logits = scale * img @ txt.T  # [B, V]: the whole level's vocabulary as negatives
    uniq, inv = torch.unique(y, return_inverse=True)
    pos = inv.unsqueeze(0) == torch.arange(len(uniq), device=y.device).unsqueeze(1)  # [U, B]
    t2i = logits[:, uniq].T  # [U, B]: each caption in the batch against the batch's images
    t2i_loss = -(torch.logsumexp(t2i.masked_fill(~pos, -1e4), 1) - torch.logsumexp(t2i, 1)).mean()
    return 0.5 * (F.cross_entropy(logits, y) + t2i_loss)


def augment(x, gen):
    """Random 2-pixel shift (reflect padding) per batch and horizontal flip per image."""
    import torch
    import torch.nn.functional as F

    p = 2
    dy, dx = (int(v) for v in torch.randint(0, 2 * p + 1, (2,), generator=gen))
    h, w = x.shape[-2:]
    x = F.pad(x, (p, p, p, p), mode="reflect")[..., dy : dy + h, dx : dx + w]
    flip = (torch.rand(len(x), generator=gen) < 0.5).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)
