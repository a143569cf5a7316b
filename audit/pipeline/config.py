"""The audit config: one TOML file, typed by pydantic, never mutated after load.

Every section is a frozen model that forbids unknown keys, so a typo (``num_cpu_worker``)
is an error naming the file, the section, the key, the closest known key and all known
keys, raised before any work starts. Relative paths are resolved once, at load: as given
when they exist from the working directory, else next to the config file.

Each section's :meth:`Section.key_fields` says which of its fields change results; the
runner hashes only those into its stages' keys, so asking for more workers does not redo
a finished sweep.
"""

from __future__ import annotations

import difflib
import os
from typing import Annotated, Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# bounds shared by many keys: a count of images or rows, a bootstrap or permutation count (each
# resample is an array the size of the split: 10**9 of them asked for 29.8 GiB), a seed (numpy's
# and torch's generators take 0 <= seed < 2**32)
MAX_COUNT = 10**9
MAX_RESAMPLES = 100_000
MAX_NEAREST = 100_000  # nearest images asked of one search (an array of that many per query)
MAX_SEED = 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Split = Literal["train", "debug", "test", "pool"]  # audit.data.table.SPLITS


class Section(BaseModel):
    # strict: "256" is no int and "yes" no bool (a TOML int still fills a float key);
    # NaN and infinity are no value of any key
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    def key_fields(self) -> dict[str, Any]:
        """The fields that change a stage's results (default: all of them)."""
        return self.model_dump()


class DataSection(Section):
    # a world directory, a Parquet manifest or an ImageFolder
    path: str = ""
    # built (once, cached by the spec's hash) when `path` is empty
    world_spec: str = ""
    # where failures are found and directions fitted
    split: Split = "debug"
    # where captions are checked on their nearest images, and fixes measured
    eval_split: Split = "test"
    # 0 = the whole split
    limit: int = Field(0, ge=0, le=MAX_COUNT)
    # the column naming each label's class; "" = auto-detect (or directory names, `classes`)
    class_column: str = ""
    # class names in label order, when nothing in the data names the labels
    classes: list[str] = []
    # caption slots (attribute columns); unset = auto-detected, [] = none
    attributes: list[str] | None = None
    # per attribute, e.g. {background = "{noun} on {value}"}
    attribute_templates: dict[str, str] = {}

    def key_fields(self) -> dict[str, Any]:
        d = self.model_dump()
        optional = {
            "class_column": "",
            "classes": [],
            "attributes": None,
            "attribute_templates": {},
        }
        for k, default in optional.items():
            if d[k] == default:  # runs made before these keys existed keep their keys
                d.pop(k)
        return d

    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        if not self.path and not self.world_spec:
            raise ValueError(
                "[data] needs a 'path' (a dataset) or a 'world_spec' (a world built on first use)"
            )
        return self


class ZooSection(Section):
    manifest: str = "demo"  # a shipped name or a TOML path
    models: list[str] = []  # a subset of the zoo; empty = all
    train: bool = True  # train members with weights = "train" that are not cached yet
    cache: str = ""  # checkpoint directory; empty = $ZOO_AUDIT_CACHE/zoo
    device: str = "cpu"  # where members are trained


class RaySection(Section):
    # embedded Ray only; 0 = all cores (at most this machine's: cluster.runner.check_ray_cpus)
    num_cpus: int = Field(0, ge=0, le=2**20)
    num_cpu_workers: int = Field(2, ge=1, le=4096)  # ZooShard actors when the cluster has no GPU
    # 0 = CPUs / workers; more than fit is lowered to what fits, with a warning (cluster.sweep)
    threads_per_worker: int = Field(0, ge=0, le=4096)
    gpus: Literal["auto", "no"] = "auto"
    batch_size: int = Field(256, ge=1, le=65536)
    with_features: bool = True  # penultimate features, for head retraining
    max_restarts: int = Field(3, ge=0, le=1000)

    def key_fields(self) -> dict[str, Any]:
        # placement and batching do not change predictions
        return {"with_features": self.with_features}


class StatsSection(Section):
    similarity: Literal["jaccard", "shared_fraction", "error_consistency"] = "jaccard"
    # cut the dendrogram at this similarity, or into `n_clusters`; neither = as many as families
    # (a similarity: jaccard and shared_fraction lie in [0, 1], error_consistency in [-1, 1])
    threshold: float | None = Field(None, ge=-1, le=1)
    n_clusters: int | None = Field(None, ge=1, le=MAX_COUNT)  # at most the zoo's size (at load)
    method: Literal["average", "complete", "single", "weighted"] = "average"
    n_boot: int = Field(1000, ge=1, le=MAX_RESAMPLES)
    ci: float = Field(0.95, gt=0, lt=1)
    seed: Seed = 0
    # a group (a class's examples with one attribute value, or a planted group) "fails" when
    # it is this far below its class; a named failure is "confirmed" when generated images of
    # its hard caption are this much worse than those of the easy one
    min_gap: float = Field(0.15, gt=0, lt=1)

    @model_validator(mode="after")
    def _one_cut(self) -> StatsSection:
        if self.threshold is not None and self.n_clusters is not None:
            raise ValueError(
                "[stats] threshold and n_clusters both cut the dendrogram; give one of them"
            )
        return self


class DirectionsSection(Section):
    enabled: bool = True
    # "world" (trained here on the data's captions) or "open_clip:ARCH:TAG"
    embedder: str = "world"
    k: int = Field(50, ge=1, le=MAX_NEAREST)  # nearest eval images per caption
    top_k: int = Field(5, ge=1, le=10_000)  # hard and easy captions kept per direction
    caption_scoring: Literal["images", "text"] = "images"
    # nearest fit-split images per caption ("images" scoring)
    grounding_k: int = Field(50, ge=1, le=MAX_NEAREST)
    max_modes: int = Field(2, ge=1, le=10_000)
    n_permutations: int = Field(50, ge=0, le=MAX_RESAMPLES)
    # a p-value the first n_permutations leave within a factor of two of 0.05, of a mode whose
    # bootstrap interval lies above chance, is resolved with more, up to this many (0: never)
    max_permutations: int = Field(800, ge=0, le=MAX_RESAMPLES)
    llm_model: str = ""  # an OpenAI-compatible model for caption proposals; "" = grammar only
    llm_base_url: str = ""  # default $OPENAI_BASE_URL

    def key_fields(self) -> dict[str, Any]:
        d = self.model_dump()
        d.pop("llm_base_url")  # where the LLM answers from does not change what it is asked
        return d

    @model_validator(mode="after")
    def _known_embedder(self) -> DirectionsSection:
        from audit.embed.base import check_embedder_name

        check_embedder_name(self.embedder, key="[directions] embedder")
        return self


class GenerateSection(Section):
    enabled: bool = True
    url: str = ""  # a running `zoo-audit serve`; "" = start the app in-process with `backend`
    backend: str = "world"  # in-process only: "world" (the data's world) or "diffusers:MODEL"
    # other generators whose sets are made too, each fix measured beside the backend's
    # ("retrieval": nearest real pool images; "world" on a world is its own generator: an oracle)
    compare: list[str] = []
    # the learned generator's hyper-parameters (audit.synthetic.learned.HPARAMS), e.g. {steps = 2000}
    learned: dict[str, Any] = {}

    @model_validator(mode="after")
    def _learned_keys(self) -> GenerateSection:
        from audit.synthetic.learned import HPARAMS

        unknown = sorted(set(self.learned) - set(HPARAMS))
        if unknown:
            raise ValueError(
                f"[generate] learned: unknown key(s) {unknown}; known: {sorted(HPARAMS)}"
            )
        return self

    # images per named caption (2312.05464 generates 3 with Stable Diffusion; retrieval and the
    # renderers are cheap, and a head needs more than a handful to move)
    k: int = Field(16, ge=1, le=100_000)
    probe_k: int = Field(32, ge=1, le=100_000)  # images per caption of the probe set (confirmation)
    seed: Seed = 0

    def key_fields(self) -> dict[str, Any]:
        d = self.model_dump()
        d.pop("url")
        return d


class MitigateSection(Section):
    enabled: bool = True
    # weight of the synthetic images in a head's training mix, chosen on the fit split
    # (each in [0, 1): the share of the synthetic images in the mix; real ones keep the rest)
    lambdas: list[Annotated[float, Field(ge=0, lt=1)]] = Field([0.5, 0.75, 0.9], min_length=1)
    # real train examples in a head's training (stratified; 0 = all)
    max_real: int = Field(3000, ge=0, le=MAX_COUNT)
    # head rows a fit may move: the hard classes and their main confusions on the fit split;
    # the rest stay at the model's own weights (0, or at least the classes: every row moves)
    head_classes: int = Field(32, ge=0, le=MAX_COUNT)
    pool_k: int = Field(50, ge=1, le=MAX_NEAREST)  # pool (and upweighted fit) images per hard class
    # weight of the fit split's direction-selected images
    upweight: float = Field(5.0, gt=0, le=1e6)
    k_nearest: int = Field(50, ge=1, le=MAX_NEAREST)  # nearest images of a hard caption
    alpha: float = Field(1e-3, ge=0, le=1e6)  # L2 anchor of the retrained head to the original one
    max_iter: int = Field(60, ge=1, le=100_000)
    # a choice may lower the fit split's overall accuracy this much
    max_drop: float = Field(0.005, ge=0, le=1)
    n_boot: int = Field(1000, ge=1, le=MAX_RESAMPLES)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, values: Any) -> Any:
        if isinstance(values, dict) and "min_gap" in values:
            raise ValueError("min_gap moved to [stats] min_gap (one threshold for the whole audit)")
        return values


class ReportSection(Section):
    enabled: bool = True  # write RUN/report/index.html at the end of the run
    # failure modes per card with image grids (strongest first)
    max_modes: int = Field(12, ge=0, le=10_000)
    # real images per grid (hardest, easiest); generated per mode
    images: int = Field(8, ge=1, le=1000)
    max_rows: int = Field(200, ge=1, le=MAX_COUNT)  # rows per table on a card (worst first)
    # thumbnails per synthetic set on the sets page
    max_set_images: int = Field(240, ge=0, le=MAX_COUNT)
    # failure modes on the cards page (strongest first)
    max_index_rows: int = Field(5000, ge=0, le=MAX_COUNT)
    thumb_size: int = Field(64, ge=16, le=1024)  # pixels; larger images are scaled down to JPEG


SECTIONS: dict[str, type[Section]] = {
    "data": DataSection,
    "zoo": ZooSection,
    "ray": RaySection,
    "stats": StatsSection,
    "directions": DirectionsSection,
    "generate": GenerateSection,
    "mitigate": MitigateSection,
    "report": ReportSection,
}
PATH_KEYS = {"data": ("path", "world_spec"), "zoo": ("cache",)}


class AuditConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data: DataSection
    zoo: ZooSection = ZooSection()
    ray: RaySection = RaySection()
    stats: StatsSection = StatsSection()
    directions: DirectionsSection = DirectionsSection()
    generate: GenerateSection = GenerateSection()
    mitigate: MitigateSection = MitigateSection()
    report: ReportSection = ReportSection()
    source: str = ""  # the file it was read from (not part of any key)

    def section(self, name: str) -> Section:
        return getattr(self, name)


def _resolve(p: str, base: str) -> str:
    """A config path: as given when it exists from the working directory, else next to the config."""
    if not p or "://" in p:
        return p
    p = os.path.expanduser(p)
    if os.path.isabs(p) or os.path.exists(p):
        return os.path.abspath(p)
    cand = os.path.join(base, p)
    return os.path.abspath(cand) if os.path.exists(cand) else os.path.abspath(p)


def find_config(path: str) -> str:
    """A config file path, or the name of a shipped config (``demo`` -> configs/audit/demo.toml)."""
    if os.path.isfile(path):
        return path
    from audit.paths import config_path

    shipped = config_path("audit", path if path.endswith(".toml") else path + ".toml")
    if not shipped:
        raise FileNotFoundError(
            f"audit config {path!r} not found (give a TOML path or a shipped name such as 'demo')"
        )
    return shipped


def _explain(path: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        section = loc[0] if loc else ""
        where = (
            f"[{section}] {'.'.join(loc[1:])}"
            if len(loc) > 1
            else (f"[{section}]" if section else "config")
        )
        if e["type"] == "extra_forbidden":
            if len(loc) == 1:
                known = list(SECTIONS)
                what = f"unknown section; known sections: {', '.join(known)}"
            else:
                known = list(SECTIONS[section].model_fields) if section in SECTIONS else []
                what = f"unknown key; known keys: {', '.join(known)}"
            close = difflib.get_close_matches(loc[-1], known, n=1)
            if close:
                what = (
                    f"unknown {'section' if len(loc) == 1 else 'key'} (did you mean {close[0]!r}?); "
                    + what.split("; ", 1)[1]
                )
        elif e["type"] == "value_error":  # our validators' messages name their key already
            msg = str(e.get("ctx", {}).get("error", e["msg"]))
            lines.append(f"{path}: {msg}" if msg.startswith("[") else f"{path}: {where}: {msg}")
            continue
        else:
            what = e["msg"] + (
                f" (got {e['input']!r})"
                if e["type"] != "missing" and not isinstance(e["input"], dict)
                else ""
            )
        lines.append(f"{path}: {where}: {what}")
    return "\n".join(lines)


def load_config(path: str, overrides: dict[str, dict[str, Any]] | None = None) -> AuditConfig:
    """Read, resolve and validate an audit config; ``overrides`` (section -> key -> value)
    are applied before validation (used by ``zoo-audit demo`` flags).

    Raises ``ValueError`` naming the file, the key and the known keys for any mistake.
    """
    path = find_config(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from e
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    base = os.path.dirname(os.path.abspath(path))
    for section, keys in PATH_KEYS.items():
        if isinstance(raw.get(section), dict):
            for k in keys:
                if isinstance(raw[section].get(k), str):
                    raw[section][k] = _resolve(raw[section][k], base)
    zoo = raw.get("zoo")
    if (
        isinstance(zoo, dict)
        and isinstance(zoo.get("manifest"), str)
        and os.path.isfile(os.path.join(base, zoo["manifest"]))
    ):
        zoo["manifest"] = os.path.join(base, zoo["manifest"])
    raw.setdefault("data", {})
    try:
        return AuditConfig(**raw, source=os.path.abspath(path))
    except ValidationError as e:
        raise ValueError(_explain(path, e)) from None
