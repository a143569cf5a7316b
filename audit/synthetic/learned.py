"""``learned``: a generator learned from the audited data, for data without diffusion weights.

A small conditional diffusion model built from diffusers' parts (``UNet2DModel`` and the
DDPM/DDIM schedulers), conditioned on the class and on the caption's slots (the data's
attribute columns, :class:`audit.slots.SlotGrammar`), each a learnt embedding summed into
the UNet's time embedding, with condition dropout for classifier-free guidance. It trains on
the train split only (never the evaluation split), and is cached by content hash.

It *edits* real images rather than drawing from noise (SDEdit): a train image of the
caption's class is noised to ``strength`` of the schedule and denoised towards the caption,
guided by the caption's slots against the class alone. Its point is composition: a
combination that is rare in the training data (a colour seldom seen on that class) from a
class it knows and a value it has seen on other classes. On a CPU it trains for minutes (the
default ``steps``); on a GPU, raise ``steps`` (``[generate] learned = {steps = ...}``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass

import numpy as np

from audit.cache import atomic_write, cache_dir, content_hash

log = logging.getLogger(__name__)

VERSION = 1
HPARAMS = {
    "steps": 400,  # optimiser steps (a CPU budget of minutes; a GPU takes thousands)
    "batch_size": 64,
    "lr": 2e-3,
    "channels": [32, 64, 64],
    "p_drop": 0.15,  # condition dropout (classifier-free guidance)
    "strength": 0.6,  # how far a real image is noised before it is edited (0: kept, 1: redrawn)
    "ddim_steps": 20,
    "guidance": 3.0,
    "bank": 256,  # real train images kept per class as sources to edit
    "seed": 0,
    "device": "auto",  # "auto": CUDA when there is one, else the CPU
}


def resolve_hparams(overrides) -> dict:
    hp = {**HPARAMS, **dict(overrides or {})}
    unknown = sorted(set(hp) - set(HPARAMS))
    if unknown:
        raise ValueError(
            f"[generate] learned: unknown hyper-parameter(s) {unknown}; known: {sorted(HPARAMS)}"
        )
    return hp


@dataclass
class Vocab:
    """What the model is conditioned on: the classes and each slot's values (index 0 = none)."""

    classes: list[str]
    values: dict[str, list[str]]

    def indices(self, cls: int, slots: dict[str, str]) -> list[int]:
        """``[class + 1, value + 1 per slot attribute (0 = unset)]``."""
        out = [cls + 1]
        for a, vals in self.values.items():
            v = slots.get(a)
            out.append(vals.index(v) + 1 if v in vals else 0)
        return out


def _build(vocab: Vocab, size: int, hp: dict):
    import torch
    from diffusers import UNet2DModel

    ch = tuple(int(c) for c in hp["channels"])
    blocks = {
        "down_block_types": ("DownBlock2D",) * len(ch),
        "up_block_types": ("UpBlock2D",) * len(ch),
    }
    unet = UNet2DModel(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        block_out_channels=ch,
        layers_per_block=1,
        class_embed_type="identity",
        norm_num_groups=8,
        **blocks,
    )
    dim = ch[0] * 4
    sizes = [len(vocab.classes) + 1, *(len(v) + 1 for v in vocab.values.values())]
    cond = torch.nn.ModuleList(torch.nn.Embedding(n, dim) for n in sizes)
    return unet, cond


def _embed(cond, idx):
    """Summed condition embeddings of ``idx [B, 1 + attributes]`` (0 = none)."""
    return sum(e(idx[:, i]) for i, e in enumerate(cond))


def _training_set(data, grammar, hp: dict):
    """``(images float [N, 3, S, S] in [-1, 1], condition indices [N, 1 + A], vocab, bank)``
    from the train split only; raises ValueError naming what is missing."""
    train = data.split("train")
    images, ok, _ = train.decode()
    if len(ok) < 8 * len(data.classes):
        raise ValueError(
            f"the learned generator needs at least 8 decodable train images per class; the train "
            f"split has {len(ok)} for {len(data.classes)} classes"
        )
    labels = train.labels[ok]
    vocab = Vocab(
        list(data.classes), {a: list(v) for a, v in grammar.values.items() if a in train.columns}
    )
    cols = {a: np.asarray(train.table[a].to_pylist(), dtype=object)[ok] for a in vocab.values}
    idx = np.asarray(
        [vocab.indices(int(y), {a: cols[a][i] for a in cols}) for i, y in enumerate(labels)],
        np.int64,
    )
    bank = {c: images[labels == c][: int(hp["bank"])] for c in range(len(data.classes))}
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    return x, idx, vocab, bank


def device_of(hp: dict) -> str:
    import torch

    d = str(hp.get("device", "auto"))
    return ("cuda" if torch.cuda.is_available() else "cpu") if d == "auto" else d


def _train_loop(unet, cond, x: np.ndarray, idx: np.ndarray, hp: dict) -> list[float]:
    """Noise prediction (DDPM) with condition dropout; returns the loss of each step. Random
    draws on the CPU (the same steps on any device); the model and batches on ``device``."""
    import torch
    from diffusers import DDPMScheduler

    dev = device_of(hp)
    unet.to(dev)
    cond.to(dev)
    g = torch.Generator().manual_seed(int(hp["seed"]))
    sched = DDPMScheduler(num_train_timesteps=1000)
    params = [*unet.parameters(), *cond.parameters()]
    opt = torch.optim.AdamW(params, lr=float(hp["lr"]), weight_decay=0.0)
    X, C = torch.from_numpy(x), torch.from_numpy(idx)
    losses = []
    for _ in range(int(hp["steps"])):
        b = torch.randint(0, len(X), (int(hp["batch_size"]),), generator=g)
        ci = C[b].clone()
        ci[torch.rand(ci.shape, generator=g) < float(hp["p_drop"])] = 0
        noise = torch.randn(X[b].shape, generator=g).to(dev)
        t = torch.randint(0, 1000, (len(b),), generator=g).to(dev)
        x0, ci = X[b].to(dev), ci.to(dev)
        pred = unet(sched.add_noise(x0, noise, t), t, class_labels=_embed(cond, ci)).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        if not torch.isfinite(loss):
            raise ValueError(
                f"the learned generator's loss is not finite at step {len(losses)}: lower lr"
            )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def model_key(data, grammar, hp: dict) -> str:
    """What the model depends on: the train split (images, labels), its attribute values, the
    hyper-parameters and this code's version."""
    from audit.zoo.train import data_hash

    train = data.split("train")
    attrs = [
        np.asarray(train.table[a].to_pylist(), dtype=object).astype(str).tobytes()
        for a in sorted(grammar.values)
        if a in train.columns
    ]
    return content_hash("learned", VERSION, data_hash(train), *attrs, hp)


def train_learned(data, grammar, overrides=None, cache: str | None = None) -> str:
    """Train (or find in the cache) the generator of ``data``; returns its directory."""
    import torch
    from safetensors.torch import save_file

    hp = resolve_hparams(overrides)
    root = os.path.join(cache or cache_dir("learned"), model_key(data, grammar, hp))
    if os.path.exists(os.path.join(root, "model.json")):
        return root
    t0 = time.perf_counter()
    x, idx, vocab, bank = _training_set(data, grammar, hp)
    torch.manual_seed(int(hp["seed"]))
    unet, cond = _build(vocab, x.shape[-1], hp)
    losses = _train_loop(unet, cond, x, idx, hp)
    os.makedirs(root, exist_ok=True)
    state = {f"unet.{k}": v.cpu() for k, v in unet.state_dict().items()} | {
        f"cond.{k}": v.cpu() for k, v in cond.state_dict().items()
    }
    with atomic_write(os.path.join(root, "weights.safetensors")) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    np.savez_compressed(os.path.join(root, "bank.npz"), **{str(c): b for c, b in bank.items()})
    meta = {
        "hparams": hp,
        "classes": vocab.classes,
        "values": vocab.values,
        "size": int(x.shape[-1]),
    }
    meta |= {
        "seconds": round(time.perf_counter() - t0, 1),
        "loss_first": losses[0],
        "loss_last": float(np.mean(losses[-20:])),
    }
    with atomic_write(os.path.join(root, "model.json")) as tmp, open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    log.info(
        "learned generator trained in %.0fs (%d steps, loss %.3f -> %.3f)",
        meta["seconds"],
        hp["steps"],
        losses[0],
        meta["loss_last"],
    )
    return root


class LearnedModel:
    """A trained generator (:func:`train_learned`'s directory): ``generate(captions, seeds)``."""

    def __init__(self, root: str):
        import torch
        from safetensors.torch import load_file

        with open(os.path.join(root, "model.json")) as f:
            self.meta = json.load(f)
        self.hp, self.size = self.meta["hparams"], int(self.meta["size"])
        self.vocab = Vocab(self.meta["classes"], self.meta["values"])
        self.unet, self.cond = _build(self.vocab, self.size, self.hp)
        state = load_file(os.path.join(root, "weights.safetensors"))
        self.unet.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
        self.cond.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("cond.")})
        self.unet.eval()
        bank = np.load(os.path.join(root, "bank.npz"))
        self.bank = {int(c): bank[c] for c in bank.files}
        self._torch = torch
        names = sorted(enumerate(self.vocab.classes), key=lambda t: -len(t[1]))
        self._class_res = [
            (re.compile(rf"(?<![\w-]){re.escape(c.lower())}(?![\w-])"), i) for i, c in names
        ]

    def parse(self, caption: str) -> tuple[int, dict[str, str]]:
        """``(class, slots)`` a caption names; raises ValueError when it names no class."""
        text = caption.lower()
        cls = next((i for rx, i in self._class_res if rx.search(text)), None)
        if cls is None or not len(self.bank.get(cls, ())):
            raise ValueError(f"caption {caption!r} names none of the classes {self.vocab.classes}")
        slots = {}
        for a, vals in self.vocab.values.items():
            hits = [
                v for v in vals if re.search(rf"(?<![\w-]){re.escape(v.lower())}(?![\w-])", text)
            ]
            if len(hits) == 1:
                slots[a] = hits[0]
        return cls, slots

    def generate(
        self, captions: list[str], seeds: list[int], steps: int | None = None, guidance=None
    ) -> np.ndarray:
        """uint8 ``[N, S, S, 3]``: for each (caption, seed), a train image of its class chosen
        by the seed, noised to ``strength`` and denoised towards the caption (DDIM), the
        caption's slots guided against its class alone. Batched; each image depends only on
        its own (caption, seed)."""
        out = [
            self._batch(captions[i : i + 64], seeds[i : i + 64], steps, guidance)
            for i in range(0, len(captions), 64)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.size, self.size, 3), np.uint8)

    def _batch(self, captions, seeds, steps, guidance) -> np.ndarray:
        torch = self._torch
        from diffusers import DDIMScheduler

        sched = DDIMScheduler(num_train_timesteps=1000)
        sched.set_timesteps(int(steps or self.hp["ddim_steps"]))
        ts = [t for t in sched.timesteps if t <= int(self.hp["strength"] * 1000)]
        w = float(self.hp["guidance"] if guidance is None else guidance)
        parsed = [self.parse(c) for c in captions]
        src = np.stack(
            [
                self.bank[c][int(s) % len(self.bank[c])]
                for (c, _), s in zip(parsed, seeds, strict=True)
            ]
        )
        if not ts:  # strength 0: the source images as they are
            return src
        x0 = torch.from_numpy(src.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
        noise = torch.cat(
            [
                torch.randn(
                    (1, *x0.shape[1:]), generator=torch.Generator().manual_seed(int(s) % (2**63))
                )
                for s in seeds
            ]
        )
        x = sched.add_noise(x0, noise, torch.tensor([int(ts[0])]))
        full = [self.vocab.indices(c, slots) for c, slots in parsed]
        bare = [self.vocab.indices(c, {}) for c, _ in parsed]
        n = len(captions)
        with torch.inference_mode():
            emb = _embed(self.cond, torch.tensor(full + bare))
            for t in ts:
                eps = self.unet(x.repeat(2, 1, 1, 1), t, class_labels=emb).sample
                x = sched.step(eps[n:] + w * (eps[:n] - eps[n:]), t, x).prev_sample
        return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
