"""zoo-audit: audit a zoo of image classifiers.

This package is the pure library (data, models, statistics, directions, captions). It
imports neither Ray nor Serve, and heavy stacks (torch models, diffusers, open_clip,
faiss, openai) load inside the functions that need them, so ``import audit`` is quick.
"""

__version__ = "0.1.0"
