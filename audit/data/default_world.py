"""The embedded default dataset: the world of ``configs/world/default.toml``, built once
and cached by the spec's content hash."""

from __future__ import annotations

from audit.cache import cache_dir, content_hash
from audit.data.table import ImageTable
from audit.paths import config_path


def default_world_dir(spec_path: str) -> str:
    """Where the world of ``spec_path`` is cached (``$ZOO_AUDIT_CACHE/worlds/<spec hash>``)."""
    with open(spec_path, "rb") as f:
        return cache_dir("worlds", content_hash(f.read()))


def prepare_world(
    spec_path: str | None = None, world_dir: str | None = None
) -> tuple[ImageTable, str]:
    """Build (or reuse) the world of ``spec_path`` (default: the shipped default spec);
    returns the table and its directory."""
    from audit.data.world import build_world

    spec_path = spec_path or config_path("world", "default.toml")
    if spec_path is None:
        raise FileNotFoundError(
            "no world spec given and configs/world/default.toml is not shipped with this install"
        )
    world_dir = world_dir or default_world_dir(spec_path)
    return build_world(spec_path, world_dir), world_dir
