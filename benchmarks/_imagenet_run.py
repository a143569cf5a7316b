"""A run directory at ImageNet shape, made without running any backbone (for
``bench_imagenet_shape.py``; nothing outside ``benchmarks/`` imports it).

Everything is drawn from seeds, so each part can be made again where a stage needs it:

- the dataset: one 8x8 PNG of one colour per row (the colour is the row's index, so any
  resize keeps it), a ``background`` attribute (the caption grammar: ``{noun} on {value}``)
  and a ``group`` column (the planted truth);
- per model, penultimate features (1,280- or 2,048-d) around class means with
  :func:`_imagenet_shape._blobs`, and the calibrated linear head of ``_imagenet_shape``. The
  planted failure: the hard classes' images on snow sit towards a confusion class in the
  models of the failing families (half of the zoo), so those models share it;
- the ``bench`` embedder (512-d, a text side): an image is its class's word vector plus its
  background's; a caption is the sum of its words' vectors. Its image vectors are written
  where the embed stage caches them;
- the ``bench_planted`` zoo builder (the head, from the spec's seed) and
  :class:`IndexSweeper`, which "runs" the zoo on generated images by reading each image's
  row index from its colour and returning that row's features.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _imagenet_shape import _blobs

BACKGROUNDS = ["grass", "sand", "snow", "water", "street", "indoors"]
FAILING = "snow"
NOISE = 0.7  # feature noise, as in _imagenet_shape
EMBED_DIM = 512
SPLITS = ("train", "debug", "test", "pool")


@dataclass(frozen=True)
class RunShape:
    models: int = 40
    examples: int = 50_000  # debug (fit) and test (eval) images each
    classes: int = 1000
    seed: int = 0

    @property
    def sizes(self) -> dict[str, int]:
        train = max(3000, 3 * self.classes)  # [mitigate] max_real real images at most
        return {"train": train, "debug": self.examples, "test": self.examples} | {
            "pool": 5 * self.classes
        }

    @property
    def hard(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed + 1)
        return np.sort(rng.choice(self.classes, max(2, self.classes // 100), replace=False))

    @property
    def confused(self) -> np.ndarray:
        return (self.hard + 1 + self.classes // 2) % self.classes

    def dim(self, m: int) -> int:
        return 1280 if m % 2 else 2048

    def fails(self, m: int) -> bool:
        return (m % 4) < 2  # families 0 and 1 of 4 share the planted failure

    def class_name(self, c: int) -> str:
        return f"c{c:04d}"


# -- the dataset -----------------------------------------------------------------------------
def _png(index: int) -> bytes:
    from PIL import Image

    rgb = np.array([(index >> 16) & 255, (index >> 8) & 255, index & 255], np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.broadcast_to(rgb, (8, 8, 3)).copy()).save(buf, format="PNG")
    return buf.getvalue()


def index_of(images: np.ndarray) -> np.ndarray:
    """The row index each uint8 ``[N, H, W, 3]`` image of :func:`_png` encodes."""
    px = images[:, images.shape[1] // 2, images.shape[2] // 2].astype(np.int64)
    return (px[:, 0] << 16) | (px[:, 1] << 8) | px[:, 2]


@functools.lru_cache(maxsize=2)
def rows(shape: RunShape) -> dict[str, np.ndarray]:
    """Every row: ``split``, ``label``, ``background``, ``sub`` (in a planted group)."""
    rng = np.random.default_rng(shape.seed)
    split = np.concatenate([np.full(n, s) for s, n in shape.sizes.items()])
    n = len(split)
    label = rng.integers(0, shape.classes, n)
    bg = rng.integers(0, len(BACKGROUNDS), n)
    snow = BACKGROUNDS.index(FAILING)
    hard_snow = np.isin(label, shape.hard) & (bg == snow)
    rare = (split == "train") & hard_snow & (rng.random(n) > 0.05)  # rare in train, as in life
    bg[rare] = 0
    sub = np.isin(label, shape.hard) & (bg == snow)
    return {"split": split, "label": label, "background": bg, "sub": sub}


def write_dataset(path: str, shape: RunShape, r: dict) -> None:
    classes = [shape.class_name(c) for c in range(shape.classes)]
    n = len(r["label"])
    bg = np.asarray(BACKGROUNDS)[r["background"]]
    group = np.where(r["sub"], [f"{classes[c]}:background={FAILING}" for c in r["label"]], "")
    t = pa.table(
        {
            "example_id": [f"r{i:07d}" for i in range(n)],
            "split": r["split"],
            "label": pa.array(r["label"], pa.int32()),
            "image": pa.array([_png(i) for i in range(n)], pa.binary()),
            "background": bg,
            "group": group,
        }
    )
    pq.write_table(t.replace_schema_metadata({"classes": json.dumps(classes)}), path)


# -- the models ------------------------------------------------------------------------------
def model_means(shape: RunShape, m: int) -> tuple[np.ndarray, np.ndarray]:
    """``(class means [C, D], planted groups' means [H, D])`` of model ``m``."""
    D = shape.dim(m)
    rng = np.random.default_rng(shape.seed * 1000 + 17 * m + 5)
    mu = (rng.standard_normal((shape.classes, D), np.float32) * np.sqrt(2.0 / D) * 2).astype(
        np.float32
    )
    if not shape.fails(m):
        return mu, mu[shape.hard]
    sub_mu = 0.35 * mu[shape.hard] + 0.65 * mu[shape.confused]
    sub_mu += rng.standard_normal(sub_mu.shape).astype(np.float32) * np.sqrt(4.0 / D)
    return mu, sub_mu.astype(np.float32)


def head(mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The classes' true posterior under the blobs: a calibrated linear head ``(W, b)``."""
    w = mu.astype(np.float64) / NOISE**2
    return w, -0.5 * (mu.astype(np.float64) * w).sum(1)


def features(shape: RunShape, m: int, r: dict, split: str) -> np.ndarray:
    """Model ``m``'s float32 features ``[n, D]`` of ``split``'s rows (drawn per split)."""
    mu, sub_mu = model_means(shape, m)
    at = r["split"] == split
    rng = np.random.default_rng([shape.seed, m, SPLITS.index(split)])
    X = _blobs(rng, mu, r["label"][at], NOISE)
    sub = r["sub"][at]
    X[sub] = _blobs(rng, sub_mu, np.searchsorted(shape.hard, r["label"][at][sub]), NOISE)
    return X


def logits_of(shape: RunShape, m: int, X: np.ndarray) -> np.ndarray:
    w, b = head(model_means(shape, m)[0])
    return X.astype(np.float64) @ w.T + b


def model_specs(shape: RunShape) -> list:
    from audit.zoo.spec import ModelSpec

    return [
        ModelSpec(
            f"m{m:02d}-{shape.dim(m)}",
            f"fam{m % 4}",
            builder="bench_planted",
            weights="package",
            kwargs={"shape": [shape.models, shape.examples, shape.classes, shape.seed], "m": m},
        )
        for m in range(shape.models)
    ]


def _shape_of(spec) -> tuple[RunShape, int]:
    return RunShape(*spec.kwargs["shape"]), int(spec.kwargs["m"])


def register() -> None:
    """The ``bench_planted`` builder and the ``bench`` embedder (call before the config)."""
    from audit.embed import register_embedder
    from audit.zoo.models import LoadedModel, register_builder
    from audit.zoo.modules import ZooModel
    from audit.zoo.spec import InputConfig

    class PlantedHead(ZooModel):
        def __init__(self, w, b):
            super().__init__()
            self.w, self.b = w, b

        def linear_head(self):
            return self.w, self.b

    @register_builder("bench_planted")
    def _build(spec, classes, weights_path):
        shape, m = _shape_of(spec)
        module = PlantedHead(*head(model_means(shape, m)[0]))
        return LoadedModel(spec, module, InputConfig(input_size=8), len(classes))

    @register_embedder("bench")
    def _embedder(args: str = "", **kwargs):
        return _word_sum_class()(RunShape(*map(int, args.split(","))))


@functools.cache
def _word(w: str) -> np.ndarray:
    """A word's fixed random unit vector (cached: a caption table encodes each class's
    candidates, ~2.5 million words at 1,000 classes; a new generator per word took 2 of the
    directions stage's 3 minutes at 2 x 50,000 x 1,000)."""
    seed = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
    v = np.random.default_rng(seed).standard_normal(EMBED_DIM)
    out = (v / np.linalg.norm(v)).astype(np.float32)
    out.flags.writeable = False
    return out


def embedder_name(shape: RunShape) -> str:
    return f"bench:{shape.models},{shape.examples},{shape.classes},{shape.seed}"


def _word_sum_class():
    from audit.embed import Embedder

    class WordSum(Embedder):
        """512-d: an image is its row's vector of :func:`image_vectors` (read from its
        colour); a caption is the sum of its words' vectors."""

        dim, key = EMBED_DIM, "bench-word-sum/1"

        def __init__(self, shape: RunShape):
            self.shape, self.name = shape, embedder_name(shape)
            self.vectors = image_vectors(shape, rows(shape))

        def _encode_images(self, images):
            return self.vectors[index_of(images)]

        def _encode_text(self, texts):
            from audit.embed.vocab import words

            return np.stack([np.sum([_word(w) for w in words(t)], 0) for t in texts])

    return WordSum


def image_vectors(shape: RunShape, r: dict) -> np.ndarray:
    """``[n, 512]`` unit vectors: class word + background word + noise."""
    rng = np.random.default_rng(shape.seed + 7)
    cls = np.stack([_word(shape.class_name(c)) for c in range(shape.classes)])
    bgs = np.stack([_word(b) for b in BACKGROUNDS])
    X = cls[r["label"]] + 0.8 * bgs[r["background"]]
    X += 0.6 * rng.standard_normal(X.shape, np.float32) / np.sqrt(EMBED_DIM)
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


class IndexSweeper:
    """A :class:`~audit.pipeline.sweep.Sweeper` without a backbone: each image's row index
    (its colour) picks that row's planted features; logits are the planted head's."""

    def __init__(self, shape: RunShape):
        self.shape = shape

    def run(self, job, sink) -> dict:
        r = rows(self.shape)
        idx = index_of(job.images)
        for spec in job.specs:
            shape, m = _shape_of(spec)
            X = np.zeros((len(idx), shape.dim(m)), np.float32)
            for split in SPLITS:
                at = r["split"][idx] == split
                if at.any():
                    pos = np.cumsum(r["split"] == split) - 1  # row -> position in its split
                    X[at] = features(shape, m, r, split)[pos[idx[at]]]
            sink.model_done(spec.name, logits_of(shape, m, X), X, 0)
        return {"shards": 1, "device": "none (planted features)"}
