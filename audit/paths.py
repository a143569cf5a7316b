"""Where shipped configs and caches live (no hard-coded machine paths)."""

from __future__ import annotations

import os
from pathlib import Path

from audit.cache import cache_dir  # noqa: F401 - re-exported

REPO_ROOT = Path(__file__).resolve().parent.parent


def config_path(*parts: str) -> str | None:
    """Path of a shipped config (``configs/...``), or None when not shipped with this install."""
    for base in (
        os.environ.get("ZOO_AUDIT_CONFIGS"),
        REPO_ROOT / "configs",
        Path.cwd() / "configs",
    ):
        if base and (Path(base) / Path(*parts)).exists():
            return str(Path(base) / Path(*parts))
    return None
