"""zoo-audit: audit a zoo of image classifiers.

This package is the pure library (data, models, statistics, directions, captions). It
imports neither Ray nor Serve, and heavy stacks (torch models, diffusers, open_clip,
faiss, openai) load inside the functions that need them, so ``import audit`` is quick.
"""

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    """Versions of the packages that shape results (recorded in every run manifest)."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version(), "zoo-audit": __version__}
    for pkg in (
        "torch",
        "timm",
        "numpy",
        "scikit-learn",
        "pyarrow",
        "ray",
        "open_clip_torch",
        "faiss-cpu",
        "diffusers",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
