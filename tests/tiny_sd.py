"""A tiny randomly initialised Stable Diffusion pipeline for tests (offline, seconds).

Same classes as Stable Diffusion 1.x at toy sizes, saved as a diffusers directory, so
``diffusers:DIR`` runs the product's real loading and sampling path. Also a script, for a
benchmark or a GPU check that needs such a directory (nothing imports tests)::

    python tests/tiny_sd.py OUT_DIR      # prints OUT_DIR
    python benchmarks/bench_serve.py --backend diffusers:OUT_DIR
"""

from __future__ import annotations

import os
import sys


def _byte_chars() -> list[str]:
    """The 256 printable characters that byte-level BPE (GPT-2, CLIP) uses for the 256 bytes."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [b for b in range(256) if b not in keep]
    mapping = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [mapping[b] for b in range(256)]


def _tiny_tokenizer(out_dir: str):
    """A byte-level CLIP tokenizer without merges: every character is a token (no download)."""
    import json

    from transformers import CLIPTokenizer

    tok_dir = os.path.join(out_dir, "_tok_src")
    os.makedirs(tok_dir, exist_ok=True)
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(tok_dir, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(tok_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)


def _tiny_models():
    """(unet, vae, text encoder) of Stable Diffusion 1.x's classes at toy sizes, random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=16,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        block_out_channels=[16, 32],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=16,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=600,
            max_position_embeddings=77,
            layer_norm_eps=1e-5,
        )
    )
    return unet, vae, text


def build_tiny_sd_pipeline(out_dir: str, seed: int = 0) -> str:
    """Save a tiny randomly initialised StableDiffusionPipeline to ``out_dir`` (offline).

    Same classes as Stable Diffusion 1.x (UNet2DConditionModel, AutoencoderKL, CLIP text
    encoder and tokenizer, PNDM scheduler) at toy sizes, so ``diffusers:OUT_DIR`` exercises
    the real loading and sampling path. Images are 32x32 by default. Returns ``out_dir``.
    """
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    if os.path.exists(os.path.join(out_dir, "model_index.json")):
        return out_dir
    torch.manual_seed(seed)
    unet, vae, text = _tiny_models()
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=_tiny_tokenizer(out_dir),
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/tiny_sd.py OUT_DIR")
    print(build_tiny_sd_pipeline(sys.argv[1]))
