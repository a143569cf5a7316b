"""The world encoder's model: its two towers, its input config, the trained encoder as an
:class:`Embedder` and its zero-shot accuracy (:mod:`audit.embed.world_encoder` trains it)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np

from audit.data.table import ImageTable
from audit.embed.base import Embedder
from audit.embed.vocab import CaptionVocab, omittable_attributes


def build_towers(hp: Mapping, text_dim: int):
    """``ModuleDict(image=CNN [B,3,H,W] -> [B,dim], text=Projection [B,text_dim] -> [B,dim])``
    plus the ``logit_scale`` parameter; ``hp`` gives ``width``, ``dim`` and ``proj_hidden``."""
    import torch
    from torch import nn

    w, d = int(hp["width"]), int(hp["dim"])

    def block(cin, cout):
        return [
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]

    image = nn.Sequential(
        *block(3, w),
        nn.MaxPool2d(2),
        *block(w, 2 * w),
        *block(2 * w, 2 * w),
        nn.MaxPool2d(2),
        *block(2 * w, 4 * w),
        *block(4 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * w, d),
    )

    class Projection(nn.Module):
        """Linear map plus a small residual MLP: stays close to MiniLM's geometry for new text."""

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(text_dim, d)
            self.mlp = nn.Sequential(
                nn.Linear(text_dim, int(hp["proj_hidden"])),
                nn.GELU(),
                nn.Linear(int(hp["proj_hidden"]), d),
            )

        def forward(self, x):
            return self.linear(x) + self.mlp(x)

    towers = nn.ModuleDict({"image": image, "text": Projection()})
    towers.register_parameter("logit_scale", nn.Parameter(torch.tensor(float(np.log(1 / 0.07)))))
    return towers


def input_config_for(size: int):
    from audit.zoo.spec import InputConfig

    return InputConfig(
        input_size=int(size),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        interpolation="bilinear",
        crop_pct=1.0,
    )


def read_metadata(path: str) -> dict:
    """The ``world_encoder`` metadata (hparams, key, image size, metrics...) of a checkpoint."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return json.loads((f.metadata() or {}).get("world_encoder", "{}"))


def state_digest(state: Mapping) -> str:
    """A short content hash of a state dict's tensors (names, shapes, bytes)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


class WorldEncoder(Embedder):
    """The trained world encoder as an :class:`Embedder` (``name`` is ``world`` by default)."""

    def __init__(self, state: Mapping, meta: Mapping, device: str = "cpu", name: str = "world"):
        from audit.embed.text import load_minilm

        self.meta = dict(meta)
        self.towers = build_towers(meta["hparams"], int(meta["text_dim"]))
        self.towers.load_state_dict(dict(state))
        self.towers.eval().to(device)
        self.device = device
        self.name = name
        self.dim = int(meta["hparams"]["dim"])
        # the weights' digest too: an encoder trained again (a cleared cache) may differ in
        # its last bits, and embeddings stored by the other one must not be mixed with its text
        self.key = f"{meta['key']}-{state_digest(state)}"
        self.input_config = input_config_for(int(meta["image_size"]))
        self.minilm = load_minilm(device)

    @classmethod
    def load(cls, path: str, device: str = "cpu", name: str = "world") -> WorldEncoder:
        from safetensors.torch import load_file

        return cls(load_file(path), read_metadata(path), device=device, name=name)

    def _encode_images(self, images: np.ndarray) -> np.ndarray:
        import torch

        from audit.zoo.models import preprocess

        with torch.inference_mode():
            return (
                self.towers["image"](preprocess(images, self.input_config, self.device))
                .float()
                .cpu()
                .numpy()
            )

    def _encode_text(self, texts: list[str]) -> np.ndarray:
        import torch

        feats = torch.as_tensor(self.minilm.encode(texts)).to(self.device)
        with torch.inference_mode():
            return self.towers["text"](feats).float().cpu().numpy()


def zero_shot_accuracy(
    embedder: Embedder,
    table: ImageTable,
    attributes: Sequence[str] | None = None,
    template: str = "a photo of {}",
    batch_size: int = 512,
) -> dict[str, float]:
    """Zero-shot accuracy per attribute on ``table`` (e.g. the world's debug split).

    For the label, the prompts are the captions with every attribute omitted ("a photo of a
    pullover"); for an attribute, the captions keeping only the label and that attribute
    ("a photo of a blue pullover"), and the predicted value is that of the most similar
    prompt. ``full_caption`` is the accuracy of picking the exact caption among all of them.
    Returns ``{"label": acc, "<attribute>": acc, ..., "full_caption": acc}``.
    """
    attrs = list(omittable_attributes(table) if attributes is None else attributes)
    vocab = CaptionVocab.build(table, [template], attrs)
    images, ok, _ = table.decode()
    img = embedder.encode_images(images, batch_size=batch_size)
    out = {}
    for omit, keys, texts, target in zip(
        vocab.levels, vocab.keys, vocab.texts, vocab.targets, strict=True
    ):
        kept = [a for a in attrs if a not in omit]
        if len(kept) > 1:
            continue
        pred = (img @ embedder.encode_text(texts[0]).T).argmax(1)
        true = target[ok]
        col = 0 if not kept else 1  # keys are (label, kept value) or (label,)/(label, caption)
        out["label" if not kept else kept[0]] = float(
            np.mean([keys[p][col] == keys[t][col] for p, t in zip(pred, true, strict=True)])
        )
    full = vocab.levels.index(())
    pred = (img @ embedder.encode_text(vocab.texts[full][0]).T).argmax(1)
    out["full_caption"] = float(np.mean(pred == vocab.targets[full][ok]))
    return out
