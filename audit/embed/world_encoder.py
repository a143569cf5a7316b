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
- The caption vocabulary lives in :mod:`audit.embed.vocab`, the training loop in
  :mod:`audit.zoo.loop`.
- The checkpoint is cached under ``$ZOO_AUDIT_CACHE/embedders/`` by a content hash of the
  data, the captions, the code's declared version (:data:`VERSION`), the torch/timm and
  text-model versions and the hyper-parameters.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from audit.cache import atomic_write, cache_dir, code_version, content_hash
from audit.data.table import ImageTable
from audit.embed.base import Embedder, register_embedder
from audit.embed.vocab import CaptionVocab, omittable_attributes

log = logging.getLogger(__name__)

# Bump when what a checkpoint holds changes for the same data and hyper-parameters: this
# module's towers, loss or augmentation, the caption vocabulary (audit/embed/vocab.py), the
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


# -- the model ------------------------------------------------------------------------------
def _build_towers(hp: Mapping, text_dim: int):
    import torch
    from torch import nn

    w, d = int(hp["width"]), int(hp["dim"])

    def block(cin, cout):
        return [
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]

    image = nn.Sequential(
        *block(3, w),
        nn.MaxPool2d(2),
        *block(w, 2 * w),
        *block(2 * w, 2 * w),
        nn.MaxPool2d(2),
        *block(2 * w, 4 * w),
        *block(4 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * w, d),
    )

    class Projection(nn.Module):
        """Linear map plus a small residual MLP: stays close to MiniLM's geometry for new text."""

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(text_dim, d)
            self.mlp = nn.Sequential(
                nn.Linear(text_dim, int(hp["proj_hidden"])),
                nn.GELU(),
                nn.Linear(int(hp["proj_hidden"]), d),
            )

        def forward(self, x):
            return self.linear(x) + self.mlp(x)

    towers = nn.ModuleDict({"image": image, "text": Projection()})
    towers.register_parameter("logit_scale", nn.Parameter(torch.tensor(float(np.log(1 / 0.07)))))
    return towers


def input_config_for(size: int):
    from audit.zoo.spec import InputConfig

    return InputConfig(
        input_size=int(size),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        interpolation="bilinear",
        crop_pct=1.0,
    )


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
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from audit.embed.text import load_minilm
    from audit.zoo.loop import train_loop, usable_cores
    from audit.zoo.models import preprocess

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
    rows = training_rows(table, hp)
    vocab = CaptionVocab.build(rows, hp["templates"])
    timings = {}
    images, ok, errors = rows.decode()
    timings["decode"] = time.perf_counter() - t0
    if errors:
        log.warning("%d training images could not be decoded and are skipped", len(errors))
    if len(ok) < 2:
        raise ValueError(
            f"the world encoder needs at least 2 decodable training images; got {len(ok)}"
        )
    size = int(images.shape[1])
    cfg = input_config_for(size)

    # every distinct string once through the frozen MiniLM
    minilm = load_minilm(device)
    strings = vocab.all_texts()
    text_feats = {}
    for i in tqdm(
        range(0, len(strings), 256), desc="MiniLM captions", disable=not progress, leave=False
    ):
        for s, e in zip(strings[i : i + 256], minilm.encode(strings[i : i + 256]), strict=True):
            text_feats[s] = e
    timings["text"] = time.perf_counter() - t0 - sum(timings.values())
    level_feats = [
        torch.as_tensor(np.stack([[text_feats[s] for s in tpl] for tpl in lvl])).to(device)
        for lvl in vocab.texts
    ]  # [T, V, 384]
    level_targets = [torch.as_tensor(t[ok]).to(device) for t in vocab.targets]

    towers = _build_towers(hp, minilm.dim).to(device)
    x_all = torch.cat(
        [preprocess(images[i : i + 2048], cfg, "cpu") for i in range(0, len(images), 2048)]
    )
    n_tpl = len(vocab.templates)

    def step_loss(idx, gen):
        xb = _augment(x_all[idx], gen).to(device)
        img = F.normalize(towers["image"](xb), dim=-1)
        scale = towers.logit_scale.clamp(max=np.log(100.0)).exp()
        loss = 0.0
        for feats, targets in zip(level_feats, level_targets, strict=True):
            t = int(torch.randint(n_tpl, (1,), generator=gen))
            txt = F.normalize(towers["text"](feats[t]), dim=-1)  # [V, D]
            y = targets[idx.to(device)]
            logits = scale * img @ txt.T  # [B, V]: the whole level's vocabulary as negatives
            uniq, inv = torch.unique(y, return_inverse=True)
            pos = inv.unsqueeze(0) == torch.arange(len(uniq), device=device).unsqueeze(1)  # [U, B]
            t2i = logits[:, uniq].T  # [U, B]: each caption in the batch against the batch's images
            t2i_loss = -(
                torch.logsumexp(t2i.masked_fill(~pos, -1e4), 1) - torch.logsumexp(t2i, 1)
            ).mean()
            loss = loss + 0.5 * (F.cross_entropy(logits, y) + t2i_loss)
        return loss / len(level_feats)

    n = len(x_all)
    towers.train()
    train_loop(
        towers.parameters(),
        step_loss,
        n=n,
        batch_size=int(hp["batch_size"]),
        epochs=int(hp["epochs"]),
        lr=float(hp["lr"]),
        weight_decay=float(hp["weight_decay"]),
        pct_start=0.1,
        seed=int(hp["seed"]),
        drop_last=True,
        progress=progress,
        desc="train world encoder",
    )
    towers.eval()
    seconds = time.perf_counter() - t0
    timings["train"] = seconds - sum(timings.values())

    meta = {
        "hparams": hp,
        "key": key,
        "image_size": size,
        "text_dim": minilm.dim,
        "train_seconds": round(seconds, 1),
        "attributes": vocab.attributes,
        "n_train": int(n),
        "n_strings": len(strings),
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    state = {k: v.detach().cpu().contiguous() for k, v in towers.state_dict().items()}
    metrics = {}
    if evaluate and "debug" in set(table.column("split").tolist()):
        enc = WorldEncoder(state, meta, device=device)
        metrics = zero_shot_accuracy(enc, table.split("debug"), vocab.attributes)
        log.info("world encoder zero-shot accuracy on debug: %s", metrics)
    log.info("world encoder trained in %.1fs (%s)", seconds, meta["timings"])
    meta["metrics"] = metrics
    with atomic_write(path) as tmp:
        save_file(state, tmp, metadata={"world_encoder": json.dumps(meta)})
    return TrainResult(path, key, True, seconds, metrics)


def _augment(x, gen):
    """Random 2-pixel shift (reflect padding) per batch and horizontal flip per image."""
    import torch
    import torch.nn.functional as F

    p = 2
    dy, dx = (int(v) for v in torch.randint(0, 2 * p + 1, (2,), generator=gen))
    h, w = x.shape[-2:]
    x = F.pad(x, (p, p, p, p), mode="reflect")[..., dy : dy + h, dx : dx + w]
    flip = (torch.rand(len(x), generator=gen) < 0.5).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


def read_metadata(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return json.loads((f.metadata() or {}).get("world_encoder", "{}"))


# -- the embedder ---------------------------------------------------------------------------
class WorldEncoder(Embedder):
    """The trained world encoder as an :class:`Embedder` (``name`` is ``world`` by default)."""

    def __init__(self, state: Mapping, meta: Mapping, device: str = "cpu", name: str = "world"):
        from audit.embed.text import load_minilm

        self.meta = dict(meta)
        self.towers = _build_towers(meta["hparams"], int(meta["text_dim"]))
        self.towers.load_state_dict(dict(state))
        self.towers.eval().to(device)
        self.device = device
        self.name = name
        self.dim = int(meta["hparams"]["dim"])
        self.key = str(meta["key"])
        self.input_config = input_config_for(int(meta["image_size"]))
        self.minilm = load_minilm(device)

    @classmethod
    def load(cls, path: str, device: str = "cpu", name: str = "world") -> WorldEncoder:
        from safetensors.torch import load_file

        return cls(load_file(path), read_metadata(path), device=device, name=name)

    def _encode_images(self, images: np.ndarray) -> np.ndarray:
        import torch

        from audit.zoo.models import preprocess

        with torch.inference_mode():
            return (
                self.towers["image"](preprocess(images, self.input_config, self.device))
                .float()
                .cpu()
                .numpy()
            )

    def _encode_text(self, texts: list[str]) -> np.ndarray:
        import torch

        feats = torch.as_tensor(self.minilm.encode(texts)).to(self.device)
        with torch.inference_mode():
            return self.towers["text"](feats).float().cpu().numpy()


def zero_shot_accuracy(
    embedder: Embedder,
    table: ImageTable,
    attributes: Sequence[str] | None = None,
    template: str = "a photo of {}",
    batch_size: int = 512,
) -> dict[str, float]:
    """Zero-shot accuracy per attribute on ``table`` (e.g. the world's debug split).

    For the label, the prompts are the captions with every attribute omitted ("a photo of a
    pullover"); for an attribute, the captions keeping only the label and that attribute
    ("a photo of a blue pullover"), and the predicted value is that of the most similar
    prompt. ``full_caption`` is the accuracy of picking the exact caption among all of them.
    Returns ``{"label": acc, "<attribute>": acc, ..., "full_caption": acc}``.
    """
    attrs = list(omittable_attributes(table) if attributes is None else attributes)
    vocab = CaptionVocab.build(table, [template], attrs)
    images, ok, _ = table.decode()
    img = embedder.encode_images(images, batch_size=batch_size)
    out = {}
    for omit, keys, texts, target in zip(
        vocab.levels, vocab.keys, vocab.texts, vocab.targets, strict=True
    ):
        kept = [a for a in attrs if a not in omit]
        if len(kept) > 1:
            continue
        pred = (img @ embedder.encode_text(texts[0]).T).argmax(1)
        true = target[ok]
        col = 0 if not kept else 1  # keys are (label, kept value) or (label,)/(label, caption)
        out["label" if not kept else kept[0]] = float(
            np.mean([keys[p][col] == keys[t][col] for p, t in zip(pred, true, strict=True)])
        )
    full = vocab.levels.index(())
    pred = (img @ embedder.encode_text(vocab.texts[full][0]).T).argmax(1)
    out["full_caption"] = float(np.mean(pred == vocab.targets[full][ok]))
    return out


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
        key = checkpoint_key(table, hparams)
        path = os.path.join(cache or cache_dir("embedders"), f"world-{key}.safetensors")
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
