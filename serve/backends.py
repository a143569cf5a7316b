"""Text-to-image generator backends, named by string and built through a registry.

``create_backend("world")`` renders captions with the world renderer (offline, images
that really show the caption); ``create_backend("diffusers:MODEL")`` runs Stable
Diffusion through diffusers from the Hugging Face cache (no downloads) or a local
directory; ``create_backend("null")`` returns a constant image and exists to measure the
service's own overhead and to inject faults in tests. (Retrieval of real images, for data
that is neither a world nor has diffusion weights, is no backend here: it is the audit's
own :class:`audit.synthetic.RetrievalSetGenerator`.)

Every backend takes one parameter group at a time::

    backend.generate(prompts: list[str], seeds: list[int], steps, guidance, size=(H, W))
        -> uint8 [N, H, W, 3]      # one image per (prompt, seed) pair

and the output for a given (prompt, seed, steps, guidance, size) does not depend on
what else is in the batch (per-image seeds, CPU random generators).
"""

from __future__ import annotations

import difflib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_REGISTRY: dict[str, Callable[..., Backend]] = {}


def register_backend(name: str) -> Callable:
    """Decorator: register a factory ``f(arg: str | None, **options) -> Backend`` as ``name``."""

    def deco(factory: Callable[..., Backend]) -> Callable[..., Backend]:
        _REGISTRY[name] = factory
        return factory

    return deco


def list_backends() -> list[str]:
    return sorted(_REGISTRY)


def parse_backend(spec: str) -> tuple[str, str | None]:
    """``"diffusers:runwayml/stable-diffusion-v1-5"`` -> ("diffusers", "runwayml/...")."""
    if not isinstance(spec, str) or not spec.strip():
        raise TypeError(
            f"backend must be a non-empty string like 'world' or 'diffusers:MODEL', got {spec!r}"
        )
    name, _, arg = spec.strip().partition(":")
    return name, (arg or None)


def create_backend(spec: str, **options: Any) -> Backend:
    """Build the backend named by ``spec`` (``world``, ``null``, ``diffusers:MODEL``)."""
    name, arg = parse_backend(spec)
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(
            f"unknown generator backend {name!r}{hint} Known backends: {list_backends()} (diffusers takes 'diffusers:MODEL_ID_OR_DIR')"
        )
    return _REGISTRY[name](arg, **options)


def _resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if images.shape[1:3] == tuple(size):
        return images
    from PIL import Image

    h, w = size
    return np.stack(
        [np.asarray(Image.fromarray(im).resize((w, h), Image.BICUBIC)) for im in images]
    )


class Backend:
    """Base class: ``name`` (the spec it was built from), ``max_batch``, ``defaults()``, ``generate``."""

    name: str = "backend"
    max_batch: int = 64

    def defaults(self) -> dict:
        """Request parameters used when a request leaves them out: steps, guidance, size [H, W]."""
        raise NotImplementedError

    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        steps: int,
        guidance: float,
        size: tuple[int, int],
    ) -> np.ndarray:
        raise NotImplementedError

    def check_prompt(self, prompt: str) -> None:
        """Raise ValueError when the backend cannot render ``prompt`` (checked before generation)."""

    def info(self) -> dict:
        return {"backend": self.name, "defaults": self.defaults(), "max_batch": self.max_batch}


class WorldBackend(Backend):
    """The world renderer: grammar captions -> composited Fashion-MNIST images (offline)."""

    max_batch = 256

    def __init__(self, world_dir: str | None = None, spec: str | None = None):
        from audit.data.world import WorldRenderer, WorldSpec
        from audit.paths import config_path

        if world_dir:
            if not os.path.exists(os.path.join(world_dir, "spec.toml")):
                raise FileNotFoundError(
                    f"world directory {world_dir!r} has no spec.toml; build one with `zoo-audit world build`"
                )
            self.renderer = WorldRenderer.from_world_dir(world_dir)
        else:
            # The renderer needs only the spec (items come from Fashion-MNIST train), so the
            # default is the shipped default spec: the same renderer as prepare_world(None, None)
            # gives, without building the 11k-image world first.
            spec = spec or config_path("world", "default.toml")
            if spec is None:
                raise FileNotFoundError(
                    "world backend: give world_dir or spec; configs/world/default.toml is not shipped with this install"
                )
            self.renderer = WorldRenderer(WorldSpec.from_toml(spec))
        self.name = "world"

    def defaults(self) -> dict:
        s = int(self.renderer.spec.image_size)
        return {"steps": 1, "guidance": 0.0, "size": [s, s]}

    def check_prompt(self, prompt: str) -> None:
        self.renderer.spec.parse_caption(prompt)

    def generate(self, prompts, seeds, steps, guidance, size):
        imgs = [
            self.renderer.render(p, seed=s, n=1)[0] for p, s in zip(prompts, seeds, strict=True)
        ]
        return _resize(np.stack(imgs), tuple(size))


class NullBackend(Backend):
    """A constant image (for overhead benchmarks and fault-injection tests).

    ``delay_s`` sleeps once per generate call (a stand-in for model time);
    ``fail_prompt`` makes any prompt containing it raise RuntimeError; ``exit_prompt`` ends
    the whole replica process mid-request, as a lost node would.
    """

    max_batch = 1024

    def __init__(
        self,
        delay_s: float = 0.0,
        fail_prompt: str | None = None,
        size: int = 32,
        exit_prompt: str | None = None,
    ):
        self.delay_s, self.fail_prompt, self.size, self.exit_prompt = (
            float(delay_s),
            fail_prompt,
            int(size),
            exit_prompt,
        )
        self.name = "null"

    def defaults(self) -> dict:
        return {"steps": 1, "guidance": 0.0, "size": [self.size, self.size]}

    def generate(self, prompts, seeds, steps, guidance, size):
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.exit_prompt and any(self.exit_prompt in p for p in prompts):
            os._exit(1)
        if self.fail_prompt and any(self.fail_prompt in p for p in prompts):
            raise RuntimeError(
                f"null backend: injected failure for a prompt containing {self.fail_prompt!r}"
            )
        return np.full((len(prompts), *size, 3), 127, dtype=np.uint8)


class DiffusersBackend(Backend):
    """Stable Diffusion (any diffusers text-to-image pipeline) from the HF cache or a directory.

    fp16 with attention slicing on CUDA, fp32 on CPU. ``local_files_only`` (default True:
    these machines have no internet) resolves a model id in the HF cache only. ``scheduler`` names a diffusers
    scheduler class (e.g. ``"DPMSolverMultistepScheduler"``) built from the pipeline's
    scheduler config. Random latents come from per-image CPU generators, so an image
    depends only on its own (prompt, seed, steps, guidance, size).
    """

    def __init__(
        self,
        model: str,
        device: str | None = None,
        dtype: str | None = None,
        scheduler: str | None = None,
        steps: int = 30,
        guidance: float = 7.5,
        size: int | None = None,
        max_batch: int = 8,
        local_files_only: bool = True,
        attention_slicing: bool | None = None,
        num_threads: int | None = None,
    ):
        if not model:
            raise ValueError(
                "diffusers backend needs a model: 'diffusers:MODEL_ID' (from the HF cache) or 'diffusers:/path/to/dir'"
            )
        import torch

        from audit.extras import require

        diffusers = require("diffusers", "diffusion")

        if num_threads:  # CPU replicas sharing a machine: oversubscribed intra-op threads crawl
            torch.set_num_threads(int(num_threads))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        cuda = self.device.startswith("cuda")
        self.dtype = getattr(torch, dtype) if dtype else (torch.float16 if cuda else torch.float32)
        pipe = _load_pipeline(diffusers, model, self.dtype, local_files_only)
        if getattr(pipe, "safety_checker", None) is not None:
            pipe.safety_checker = None  # the audit generates benign product photos; the checker blanks false positives
        if scheduler:
            pipe.scheduler = _scheduler(diffusers, scheduler).from_config(pipe.scheduler.config)
        if attention_slicing if attention_slicing is not None else cuda:
            pipe.enable_attention_slicing()
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self.name = f"diffusers:{model}"
        self.scheduler = type(pipe.scheduler).__name__
        self._steps, self._guidance, self.max_batch = int(steps), float(guidance), int(max_batch)
        vae_scale = getattr(pipe, "vae_scale_factor", 8)
        self._size = int(size or pipe.unet.config.sample_size * vae_scale)

    def defaults(self) -> dict:
        return {"steps": self._steps, "guidance": self._guidance, "size": [self._size, self._size]}

    def info(self) -> dict:
        return {
            **super().info(),
            "device": self.device,
            "dtype": str(self.dtype),
            "scheduler": self.scheduler,
        }

    def generate(self, prompts, seeds, steps, guidance, size):
        import torch

        h, w = size
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        with torch.inference_mode():
            out = self.pipe(
                prompt=list(prompts),
                num_inference_steps=int(steps),
                guidance_scale=float(guidance),
                height=int(h),
                width=int(w),
                generator=gens,
                output_type="np",
            ).images
        return (np.clip(np.asarray(out, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)


def _load_pipeline(diffusers, model: str, dtype, local_files_only: bool):
    """The text-to-image pipeline of ``model`` (a directory, or an id in the HF cache; the hub
    only when ``local_files_only`` is off and HF_HUB_OFFLINE is not 1)."""
    local = os.path.isdir(model)
    offline = bool(local_files_only or local or os.environ.get("HF_HUB_OFFLINE") == "1")
    try:
        return diffusers.AutoPipelineForText2Image.from_pretrained(
            model, dtype=dtype, local_files_only=offline
        )
    except (OSError, ValueError) as e:
        where = (
            "directory"
            if local
            else "Hugging Face cache (local_files_only: no download)"
            if offline
            else "Hugging Face hub"
        )
        raise FileNotFoundError(
            f"diffusers backend: could not load {model!r} from the {where}: {e}"
        ) from e


def _scheduler(diffusers, name: str):
    """The diffusers scheduler class called ``name``; ValueError with close matches."""
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        known = [n for n in dir(diffusers) if n.endswith("Scheduler")]
        close = difflib.get_close_matches(name, known, n=3)
        raise ValueError(
            f"unknown diffusers scheduler {name!r}; close matches {close}; known: {known}"
        )
    return cls


@register_backend("world")
def _world(arg: str | None = None, **options: Any) -> Backend:
    if arg:
        options.setdefault("world_dir", arg)
    return WorldBackend(**options)


@register_backend("null")
def _null(arg: str | None = None, **options: Any) -> Backend:
    return NullBackend(**options)


@register_backend("diffusers")
def _diffusers(arg: str | None = None, **options: Any) -> Backend:
    return DiffusersBackend(arg or options.pop("model", ""), **options)


class LearnedBackend(Backend):
    """A generator learned from an audited dataset (:mod:`audit.synthetic.learned`): real
    images of the caption's class edited towards its slots. ``learned:MODEL_DIR``."""

    max_batch = 64

    def __init__(self, model_dir: str, num_threads: int | None = None):
        from audit.synthetic.learned import LearnedModel

        if not model_dir or not os.path.exists(os.path.join(model_dir, "model.json")):
            raise FileNotFoundError(
                f"learned backend: {model_dir!r} holds no learned generator; the audit trains one "
                "([generate] backend or compare = 'learned')"
            )
        if num_threads:
            import torch

            torch.set_num_threads(int(num_threads))
        self.model = LearnedModel(model_dir)
        self.name = "learned"

    def defaults(self) -> dict:
        s = self.model.size
        return {
            "steps": int(self.model.hp["ddim_steps"]),
            "guidance": float(self.model.hp["guidance"]),
            "size": [s, s],
        }

    def check_prompt(self, prompt: str) -> None:
        self.model.parse(prompt)

    def generate(self, prompts, seeds, steps, guidance, size):
        imgs = self.model.generate(list(prompts), list(seeds), steps, guidance)
        return _resize(imgs, tuple(size))


@register_backend("learned")
def _learned(arg: str | None = None, **options: Any) -> Backend:
    return LearnedBackend(arg or options.pop("model_dir", ""), **options)
