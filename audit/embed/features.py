"""An image-only space: a zoo member's own penultimate features.

For data with neither captions nor attribute columns, and no CLIP weights, there is no joint
image/text space to name a failure in; failure directions still live in any image space
(Jain et al. use CLIP for its text side, not because the SVM needs it). ``features:MODEL``
embeds images with a zoo member's penultimate features (L2-normalised), so the audit finds
and shows failure modes there and reports them unnamed; it has no text side
(:attr:`has_text` is False), so nothing is captioned or generated from it.
"""

from __future__ import annotations

import numpy as np

from audit.embed.base import Embedder
from audit.store import content_hash


class ZooFeatures(Embedder):
    """``features:MODEL``: the penultimate features of one zoo member (``spec``, its weights)."""

    has_text = False

    def __init__(self, spec, classes, weights_path: str | None = None, device: str = "cpu"):
        from audit.pipeline.sweep import weights_key
        from audit.zoo.models import build_model

        self.loaded = build_model(spec, list(classes), weights_path, device)
        self.name, self.device = f"features:{spec.name}", device
        self.input_config = self.loaded.input_config
        self.key = content_hash("zoo-features/1", spec.to_dict(), weights_key(spec, weights_path))
        s = self.input_config.input_size
        self.dim = int(self._encode_images(np.zeros((1, s, s, 3), np.uint8)).shape[1])

    def _encode_images(self, images: np.ndarray) -> np.ndarray:
        from audit.zoo.inference import forward, preprocess

        x = preprocess(images, self.input_config, self.device)
        return forward(self.loaded.module, x, 256, self.device, with_features=True)["features"]

    def _encode_text(self, texts: list[str]) -> np.ndarray:
        raise ValueError(
            f"{self.name} is an image-only space: it has no text side to embed captions"
        )


def image_only_embedder(inputs, name: str | None = None) -> ZooFeatures:
    """``features:MODEL`` for the run (``name``), or its zoo's first member with weights."""
    model = (name or "").partition(":")[2]
    specs = [m for m in inputs.zoo if not model or m.name == model]
    if not specs:
        raise ValueError(
            f"embedder {name!r}: no zoo member {model!r}; the zoo has {inputs.zoo.names}"
        )
    weights = inputs.weights
    for spec in specs:
        if not spec.trained_here or spec.name in weights:
            return ZooFeatures(spec, inputs.data.classes, weights.get(spec.name))
    raise ValueError(
        f"embedder {name or 'features'}: no zoo member has weights yet (train the zoo first)"
    )
