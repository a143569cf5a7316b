"""A tiny randomly initialised CLIP of open_clip's own class, registered under a name of its
own so that tests run the real open_clip code path offline (no weights to download)."""

from __future__ import annotations

import json
from pathlib import Path


def register_tiny_clip(folder: Path, name: str, image_size: int = 16, patch_size: int = 8) -> dict:
    """Write the model config ``name`` into ``folder``, register it with open_clip and return it."""
    import open_clip

    cfg = {
        "embed_dim": 24,
        "vision_cfg": {
            "image_size": image_size,
            "layers": 1,
            "width": 32,
            "head_width": 16,
            "patch_size": patch_size,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    path = Path(folder) / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return cfg
