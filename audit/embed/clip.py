"""``open_clip:ARCH[:PRETRAINED]``: CLIP image and text towers through open_clip.

``PRETRAINED`` is an open_clip tag resolved in the Hugging Face cache (offline), a local
checkpoint file, or ``random`` for a randomly initialised model (tests: the same code path
with a small registered config). The default is ``ViT-B-32`` with OpenAI's weights, the
paper's embedding (Jain et al., Appendix A.3).
"""

from __future__ import annotations

import numpy as np

from audit.embed.base import Embedder, register_embedder
from audit.store import content_hash

DEFAULT_ARCH = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"
RANDOM = ("", "random", "none")


def parse_name(args: str) -> tuple[str, str]:
    """``"ARCH[:PRETRAINED]"`` -> (arch, pretrained); hf-hub:/local-dir: archs are kept whole."""
    if args.startswith(("hf-hub:", "local-dir:")):
        return args, ""
    arch, sep, pretrained = args.partition(":")
    arch = arch or DEFAULT_ARCH
    if not sep:
        pretrained = DEFAULT_PRETRAINED
    return arch, pretrained


class OpenClipEmbedder(Embedder):
    def __init__(
        self, arch: str = DEFAULT_ARCH, pretrained: str = DEFAULT_PRETRAINED, device: str = "cpu"
    ):
        import torch

        from audit.extras import require
        from audit.zoo.models import open_clip_model

        open_clip = require("open_clip", "clip")

        if not arch.startswith(("hf-hub:", "local-dir:")) and arch not in open_clip.list_models():
            import difflib

            close = difflib.get_close_matches(arch, open_clip.list_models(), n=5)
            raise ValueError(
                f"open_clip has no architecture {arch!r}; close matches: {close}. "
                "Register a custom config with open_clip.add_model_config(path)"
            )
        random_init = pretrained.lower() in RANDOM
        if random_init:
            torch.manual_seed(0)  # a random test model is still reproducible
        model, tokenizer, cfg = open_clip_model(arch, None if random_init else pretrained)
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.input_config = cfg
        self.device = device
        self.name = f"open_clip:{arch}:{pretrained or 'random'}"
        with torch.inference_mode():
            probe = self.model.encode_text(tokenizer(["a"]).to(device))
        self.dim = int(probe.shape[-1])
        # weights identity: the tag/file for real weights, a hash of the tensors for random ones
        if random_init:
            h = content_hash(
                *[
                    t.detach().cpu().numpy().tobytes()[:4096]
                    for t in list(self.model.state_dict().values())[:8]
                ]
            )
        else:
            h = content_hash(arch, pretrained, open_clip.__version__)
        self.key = content_hash(self.name, h)

    def _encode_images(self, images: np.ndarray) -> np.ndarray:
        import torch

        from audit.zoo.models import preprocess

        with torch.inference_mode():
            x = preprocess(images, self.input_config, self.device)
            return self.model.encode_image(x).float().cpu().numpy()

    def _encode_text(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return (
                self.model.encode_text(self.tokenizer(texts).to(self.device)).float().cpu().numpy()
            )


@register_embedder(
    "open_clip",
    examples=[
        "open_clip:ViT-B-32:openai",
        "open_clip:ViT-B-16:openai",
        "open_clip:ViT-L-14:openai",
    ],
)
def _create_open_clip(args: str, device: str = "cpu", **kwargs) -> OpenClipEmbedder:
    if kwargs:
        raise TypeError(f"open_clip embedders take no options besides device; got {sorted(kwargs)}")
    arch, pretrained = parse_name(args)
    return OpenClipEmbedder(arch, pretrained, device=device)
