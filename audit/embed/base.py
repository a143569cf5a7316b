"""The embedder interface and its registry (timm-style: register by name, create by name).

An embedder maps images and text into one space of unit vectors:

- ``encode_images(uint8 [N, H, W, 3], batch_size) -> float32 [N, D]``, rows L2-normalised;
- ``encode_text(list[str]) -> float32 [M, D]``, rows L2-normalised;
- ``name``, ``dim``, ``input_config`` (how it wants its pixels, from the model itself) and
  ``key``, a content hash of its weights, so cached embeddings know what made them.

Names have the form ``BACKEND[:ARGS]`` (``open_clip:ViT-B-32:openai``, ``world``,
``world:/path/to/world``); :func:`create_embedder` dispatches on ``BACKEND``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence

import numpy as np

from audit.store import content_hash

_FACTORIES: dict[str, Callable[..., Embedder]] = {}
_EXAMPLES: dict[str, list[str]] = {}


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x [N, D]`` scaled to unit L2 norm (zero rows stay zero), as float32."""
    x = np.asarray(x, np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(n, eps)).astype(np.float32, copy=False)


def check_images(images) -> np.ndarray:
    """Validate a uint8 ``[N, H, W, 3]`` batch (the one input check every backend shares)."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(
            f"images must be uint8 [N, H, W, 3]; got shape {arr.shape}. Decode with ImageTable.decode() first"
        )
    if arr.dtype != np.uint8:
        raise TypeError(f"images must be uint8 RGB in 0..255; got dtype {arr.dtype}")
    return arr


def check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("encode_text takes a list of strings; wrap a single caption in a list")
    texts = list(texts)
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"encode_text takes strings; got {type(bad[0]).__name__} ({bad[0]!r})")
    return texts


class Embedder:
    """Base class: subclasses set ``name``, ``dim``, ``input_config``, ``key`` and implement
    ``_encode_images(images) -> [N, D]`` and ``_encode_text(texts) -> [M, D]`` (unnormalised)."""

    name: str = ""
    dim: int = 0
    input_config = None  # audit.zoo.spec.InputConfig
    key: str = ""
    device: str = "cpu"
    #: the words it was trained on, for a closed-vocabulary embedder (the world encoder); None = open (CLIP)
    vocabulary: frozenset[str] | None = None
    #: whether it embeds text (an image-only space cannot name or generate)
    has_text: bool = True

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` outside :attr:`vocabulary` (none for an open-vocabulary embedder)."""
        if self.vocabulary is None:
            return []
        from audit.embed.vocab import words

        return [w for w in words(text) if w not in self.vocabulary]

    def encode_images(self, images, batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` -> float32 ``[N, D]`` unit rows."""
        from tqdm.auto import tqdm

        images = check_images(images)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = [np.zeros((0, self.dim), np.float32)]
        for i in tqdm(
            range(0, len(images), batch_size),
            desc=f"embed {self.name}",
            disable=not progress,
            leave=False,
        ):
            out.append(np.asarray(self._encode_images(images[i : i + batch_size]), np.float32))
        return l2_normalize(np.concatenate(out))

    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """``M`` strings -> float32 ``[M, D]`` unit rows."""
        texts = check_texts(texts)
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, len(texts), batch_size):
            out.append(np.asarray(self._encode_text(texts[i : i + batch_size]), np.float32))
        return l2_normalize(np.concatenate(out))

    def _encode_images(self, images: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _encode_text(self, texts: list[str]) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, key={self.key!r})"


def embedder_slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")
    # a lossy rewrite gets a hash suffix so two names never share a directory
    return s if s == name else f"{s[:60]}-{content_hash(name)[:8]}"


def register_embedder(backend: str, examples: Sequence[str] = ()):
    """Decorator: register ``factory(args: str, **kwargs) -> Embedder`` for ``backend``.

    ``args`` is what follows ``backend:`` in the name ("" when absent); ``examples`` are full
    names shown by :func:`list_embedders` and used for close-match suggestions.
    """
    if ":" in backend:
        raise ValueError(f"backend name {backend!r} must not contain ':'")

    def deco(fn):
        _FACTORIES[backend] = fn
        _EXAMPLES[backend] = list(examples) or [backend]
        return fn

    return deco


def _ensure_builtin() -> None:
    # the built-in backends register themselves on import (light modules; heavy imports are lazy)
    from audit.embed import clip, world_encoder  # noqa: F401


def list_embedders(filter: str = "") -> list[str]:
    """Example names of every registered backend, optionally filtered by a substring."""
    _ensure_builtin()
    names = [n for b in sorted(_EXAMPLES) for n in _EXAMPLES[b]]
    return [n for n in names if filter.lower() in n.lower()]


#: names the audit resolves itself, besides the registered backends (``features:MODEL``: a zoo
#: member's own penultimate features, see :mod:`audit.embed.features`)
AUDIT_EMBEDDERS = ("features",)


def check_embedder_name(name: str, key: str = "embedder", extra: Sequence[str] = AUDIT_EMBEDDERS):
    """Raise ValueError unless ``name``'s backend (before the first ':') is registered or in
    ``extra``; the message names ``key``, close matches and the registered backends. Builds
    nothing (cheap enough for a config check)."""
    _ensure_builtin()
    backend = name.partition(":")[0]
    if backend in _FACTORIES or backend in extra:
        return
    candidates = list(_FACTORIES) + list_embedders() + list(extra)
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.4)
    close += [
        c
        for c in difflib.get_close_matches(backend, [*_FACTORIES, *extra], n=3, cutoff=0.4)
        if c not in close
    ]
    raise ValueError(
        f"{key} {name!r}: unknown embedder, no backend {backend!r}. Close matches: {close or 'none'}. "
        f"Registered backends: {sorted([*_FACTORIES, *extra])} (names look like {list_embedders()[:4]})"
    )


def create_embedder(name: str, device: str = "cpu", **kwargs) -> Embedder:
    """Build the embedder called ``name`` (``BACKEND[:ARGS]``) on ``device``.

    Unknown backends raise ValueError listing close matches and the registered backends.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(
            f"embedder name must be a non-empty string like 'open_clip:ViT-B-32:openai', got {name!r}"
        )
    check_embedder_name(name, extra=())
    backend, _, args = name.partition(":")
    emb = _FACTORIES[backend](args, device=device, **kwargs)
    if not emb.name:
        emb.name = name
    return emb
