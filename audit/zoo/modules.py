"""Zoo members as torch modules: one base, one subclass per kind of model.

Every member maps a normalised batch ``x [B, 3, S, S]`` to ``(logits [B, C], features
[B, D])`` and says whether its logits are a linear map of its features
(:meth:`ZooModel.linear_head`), which is what head retraining needs. This module imports
torch at the top; :mod:`audit.zoo.models` imports it only inside the builders.
"""

from __future__ import annotations

import numpy as np
import torch


class ZooModel(torch.nn.Module):
    """Base of every zoo member: ``forward(x) -> (logits [B, C], features [B, D])``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def linear_head(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(W [C, D], b [C])`` float64 with ``features @ W.T + b == logits``, or None when
        the logits are not a linear map of the features this model returns."""
        return None


class TimmClassifier(ZooModel):
    """A timm model; features are its pre-logits (``forward_head(..., pre_logits=True)``).

    ``head``: an optional separate linear-probe ``torch.nn.Linear`` for a headless backbone;
    without it the logits come from the model's own classifier.
    """

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def classifier(self) -> torch.nn.Module:
        return self.backbone.get_classifier() if self.head is None else self.head

    def forward(self, x):
        f = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        return self.classifier(f), f

    def linear_head(self):
        lin = self.classifier
        if not isinstance(lin, torch.nn.Linear):  # Identity (headless), conv or distilled heads
            return None
        w = lin.weight.detach().double().cpu().numpy()
        if lin.bias is None:
            return w, np.zeros(len(w))
        return w, lin.bias.detach().double().cpu().numpy()


class ClipZeroShot(ZooModel):
    """open_clip zero-shot: features are the unit image embeddings ``[B, D]``; logits are
    ``logit_scale.exp() * features @ head``, ``head [D, C]`` the class text embeddings."""

    def __init__(self, backbone: torch.nn.Module, head: torch.Tensor):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("head", head)

    def forward(self, x):
        f = self.backbone.encode_image(x)
        f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return self.backbone.logit_scale.exp() * f @ self.head, f

    def linear_head(self):
        scale = float(self.backbone.logit_scale.detach().exp())
        w = scale * self.head.detach().double().cpu().numpy().T
        return w, np.zeros(len(w))


class TorchScriptModel(ZooModel):
    """A TorchScript classifier: its outputs are both the logits and the features, so it has
    no linear head on its features."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        f = self.backbone(x)
        return f, f
