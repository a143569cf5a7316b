"""``world``: a small joint image/text encoder trained contrastively by this project.

It stands in for CLIP offline. Image tower: a small CNN. Text tower: the frozen MiniLM
(:mod:`audit.embed.text`) plus a trained projection, so free text and paraphrases embed
too. It trains on any :class:`ImageTable` with a ``caption`` column (the world by default).

Training (:func:`train_world_encoder`):

- Captions repeat a lot (216 distinct ones in the default world), so the text side works on
  a *vocabulary*: every distinct caption in several paraphrase templates ("a photo of ...",
  "a picture of ...", "an image of ...", bare), and partial versions that omit attribute
  words (a colour, a background) found in the table's attribute columns. MiniLM embeds each
  distinct string once, before training; only the image tower and the projection train.
- The loss is CLIP's symmetric contrastive loss with the whole vocabulary of a granularity
  level as the negatives on the image side (no false negatives from repeated captions) and
  multi-positive in-batch images on the text side, averaged over levels (full caption,
  caption without colour, ...), so "a photo of a blue pullover" and "a photo of a pullover
  on grass" both land near the right images.
- The towers, the trained :class:`WorldEncoder` and its zero-shot accuracy live in
  :mod:`audit.embed.world_model`; the inputs, augmentation, loss and fitting in
  :mod:`audit.embed.world_training`; the caption vocabulary in :mod:`audit.embed.vocab`,
  the training loop in :mod:`audit.zoo.loop`.
- The checkpoint is cached under ``$ZOO_AUDIT_CACHE/embedders/`` by a content hash of the
  data, the captions, the code's declared version (:data:`VERSION`), the torch/timm and
  text-model versions and the hyper-parameters.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from audit.cache import atomic_write, cache_dir, code_version, content_hash
from audit.data.table import ImageTable
from audit.embed.base import register_embedder
from audit.embed.world_model import (  # noqa: F401  (re-exported: the model's public names)
    WorldEncoder,
    build_towers,
    input_config_for,
    read_metadata,
    zero_shot_accuracy,
)
from audit.embed.world_training import fit_towers, training_data

log = logging.getLogger(__name__)

# Bump when what a checkpoint holds changes for the same data and hyper-parameters: the
# towers (audit/embed/world_model.py), the loss, augmentation or inputs
# (audit/embed/world_training.py), the caption vocabulary (audit/embed/vocab.py), the
# training loop (audit/zoo/loop.py) or the text side (audit/embed/text.py).
VERSION = 1

HPARAMS: dict = {
    "dim": 128,
    "width": 16,
    "epochs": 20,
    "batch_size": 128,
    "lr": 3e-3,
    "weight_decay": 0.05,
    "seed": 0,
    "splits": ["train"],
    "templates": ["a photo of {}", "a picture of {}", "an image of {}", "{}"],
    "max_examples": 0,  # 0 = all rows of the training splits
    "proj_hidden": 512,
}


# -- caching --------------------------------------------------------------------------------
def table_hash(table: ImageTable) -> str:
    """Hash of what the encoder learns from: ids, labels, image bytes, captions, attributes."""
    from audit.zoo.train import data_hash

    extra = [
        np.asarray(table.column(c)).astype(str).tobytes()
        for c in sorted(table.columns)
        if c not in ("image", "path", "example_id", "label")
    ]
    return content_hash(data_hash(table), *extra)


def resolve_hparams(hparams: Mapping | None = None) -> dict:
    hp = {**HPARAMS, **dict(hparams or {})}
    unknown = set(hp) - set(HPARAMS)
    if unknown:
        raise ValueError(
            f"unknown world-encoder hyper-parameter(s) {sorted(unknown)}; known: {sorted(HPARAMS)}"
        )
    return hp


def checkpoint_key(table: ImageTable, hparams: Mapping | None = None) -> str:
    from audit.embed.text import minilm_version

    hp = resolve_hparams(hparams)
    code = code_version("embed.world", VERSION, torch_stack=True)
    return content_hash(table_hash(training_rows(table, hp)), code, minilm_version(), hp)


def checkpoint_path(
    table: ImageTable, hparams: Mapping | None = None, cache: str | None = None
) -> str:
    """Where the encoder trained on ``table`` (an :func:`encoder_table`) is cached."""
    key = checkpoint_key(table, hparams)
    return os.path.join(cache or cache_dir("embedders"), f"world-{key}.safetensors")


def training_rows(table: ImageTable, hp: Mapping) -> ImageTable:
    present = set(table.column("split").tolist()) if len(table) else set()
    splits = [s for s in hp["splits"] if s in present]
    if not splits:
        raise ValueError(
            f"the table has none of the training split(s) {hp['splits']} (it has {sorted(present)}); "
            "pass hparams={'splits': [...]} naming splits it has"
        )
    rows = table.split(splits)
    if hp["max_examples"] and len(rows) > hp["max_examples"]:
        rng = np.random.default_rng(int(hp["seed"]))
        rows = rows.take(np.sort(rng.choice(len(rows), int(hp["max_examples"]), replace=False)))
    return rows


# -- training -------------------------------------------------------------------------------
@dataclass
class TrainResult:
    path: str
    key: str
    trained: bool  # False when it came from the cache
    seconds: float
    metrics: dict = field(default_factory=dict)


def train_world_encoder(
    table: ImageTable,
    hparams: Mapping | None = None,
    device: str = "cpu",
    cache: str | None = None,
    progress: bool = True,
    evaluate: bool = True,
) -> TrainResult:
    """Train (or fetch from the cache) the world encoder on ``table``'s training splits.

    Returns where the safetensors checkpoint is and, when it was trained now and the table
    has a ``debug`` split, zero-shot accuracies on it (also stored in the checkpoint).
    """
    import torch
    from safetensors.torch import save_file

    from audit.zoo.loop import usable_cores

    hp = resolve_hparams(hparams)
    key = checkpoint_key(table, hp)
    root = cache or cache_dir("embedders")
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, f"world-{key}.safetensors")
    if os.path.exists(path):
        return TrainResult(path, key, False, 0.0, read_metadata(path).get("metrics", {}))

    t0 = time.perf_counter()
    torch.manual_seed(int(hp["seed"]))
    torch.set_num_threads(usable_cores())
    data = training_data(training_rows(table, hp), hp["templates"], device, progress, t0)
    towers = build_towers(hp, data.text_dim).to(device)
    n = fit_towers(towers, data, hp, device, progress)
    seconds = time.perf_counter() - t0
    timings = {**data.timings, "train": seconds - sum(data.timings.values())}

    meta = {
        "hparams": hp,
        "key": key,
        "image_size": int(data.images.shape[1]),
        "text_dim": data.text_dim,
        "train_seconds": round(seconds, 1),
        "attributes": data.vocab.attributes,
        "n_train": int(n),
        "n_strings": data.n_strings,
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    state = {k: v.detach().cpu().contiguous() for k, v in towers.state_dict().items()}
    metrics = {}
    if evaluate and "debug" in set(table.column("split").tolist()):
        enc = WorldEncoder(state, meta, device=device)
        metrics = zero_shot_accuracy(enc, table.split("debug"), data.vocab.attributes)
        log.info("world encoder zero-shot accuracy on debug: %s", metrics)
    log.info("world encoder trained in %.1fs (%s)", seconds, meta["timings"])
    meta["metrics"] = metrics
    with atomic_write(path) as tmp:
        save_file(state, tmp, metadata={"world_encoder": json.dumps(meta)})
    return TrainResult(path, key, True, seconds, metrics)


# -- registry and CLI -----------------------------------------------------------------------
def _default_world() -> ImageTable:
    from audit.data.default_world import prepare_world

    table, _ = prepare_world(None, None)
    return table


NO_CAPTIONS = (
    "the world encoder trains on captions, and this dataset has neither a 'caption' column nor attribute "
    "columns to compose captions from ([data] attributes); use a CLIP embedder instead: "
    "[directions] embedder = 'open_clip:ARCH:PRETRAINED' (e.g. 'open_clip:ViT-B-32:openai')"
)


def encoder_table(table: ImageTable, slots: Mapping[str, str] | None = None) -> ImageTable:
    """``table`` as the world encoder trains on it: its own ``caption`` column, else captions
    composed from its attribute columns (``slots``: attribute -> template; None = detected).

    Raises ValueError saying to use a CLIP embedder when there is neither."""
    if "caption" in table.columns:
        return table
    from audit.data.attributes import attribute_slots, resolve_attributes, with_captions

    if slots is None:
        slots = attribute_slots(table, resolve_attributes(table))
    if not slots:
        raise ValueError(NO_CAPTIONS)
    out = with_captions(table, slots)
    log.info(
        "world encoder: no caption column; captions composed from %s (e.g. %r)",
        ", ".join(slots),
        out.table["caption"][0].as_py(),
    )
    return out


def with_vocabulary(
    enc: WorldEncoder, table: ImageTable, hparams: Mapping | None = None
) -> WorldEncoder:
    """``enc`` knowing the words of the captions it was trained on (``table`` as it trained on it)."""
    from audit.embed.vocab import known_words

    hp = resolve_hparams(hparams)
    enc.vocabulary = known_words(
        [str(c) for c in training_rows(table, hp).column("caption")], hp["templates"]
    )
    return enc


def load_or_train(
    data: ImageTable | str | None = None,
    device: str = "cpu",
    hparams: Mapping | None = None,
    train: bool = True,
    cache: str | None = None,
    progress: bool = True,
    name: str = "world",
    slots: Mapping[str, str] | None = None,
) -> WorldEncoder:
    """The world encoder for ``data`` (a table, a dataset path, or None for the default world).

    A table without a ``caption`` column trains on captions composed from its attribute
    columns (``slots``, default: detected); the encoder knows the words it trained on
    (:attr:`Embedder.vocabulary`)."""
    from audit.data.readers import read_dataset

    table = (
        _default_world() if data is None else read_dataset(data) if isinstance(data, str) else data
    )
    if not isinstance(table, ImageTable):
        raise TypeError(
            f"data must be an ImageTable, a dataset path or None; got {type(data).__name__}"
        )
    table = encoder_table(table, slots)
    if not train:
        path = checkpoint_path(table, hparams, cache)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"no trained world encoder for this data ({path}); run `zoo-audit embed train --data DIR`"
            )
        return with_vocabulary(WorldEncoder.load(path, device=device, name=name), table, hparams)
    res = train_world_encoder(table, hparams, device=device, cache=cache, progress=progress)
    return with_vocabulary(WorldEncoder.load(res.path, device=device, name=name), table, hparams)


@register_embedder("world", examples=["world", "world:/path/to/world_dir"])
def _create_world(args: str, device: str = "cpu", data=None, **kwargs) -> WorldEncoder:
    if args and data is not None:
        raise ValueError(
            f"give the world encoder's data once: either in the name (world:{args}) or as data=, not both"
        )
    # asking for an embedder never trains one: `zoo-audit embed train` (or the audit's embed stage) does
    return load_or_train(
        args or data,
        device=device,
        name=f"world:{args}" if args else "world",
        **{"train": False, **kwargs},
    )


def train_cli(args) -> TrainResult:
    """``zoo-audit embed train --data DIR [--device D]``: train (or reuse) and report."""
    from audit.data.readers import read_dataset

    table = encoder_table(read_dataset(args.data))
    res = train_world_encoder(table, device=getattr(args, "device", "cpu"), progress=True)
    state = "trained" if res.trained else "cached"
    print(f"world encoder {state} ({res.seconds:.1f}s): {res.path}")
    if res.metrics:
        print(
            "zero-shot accuracy on the debug split: "
            + ", ".join(f"{k} {v:.1%}" for k, v in res.metrics.items())
        )
    return res
