"""Embedders: registry, open_clip (random small config), the world encoder, the run-dir cache."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest

from audit.data.table import ImageTable
from audit.embed import (
    Embedder,
    create_embedder,
    embed_table,
    embedder_slug,
    embedding_path,
    list_embedders,
    load_embeddings,
)
from audit.store import RunStore

TINY_CLIP = "zoo-audit-test-tiny-clip"


@pytest.fixture(scope="module")
def tiny_clip_config(tmp_path_factory):
    from tiny_clip import register_tiny_clip

    return register_tiny_clip(
        tmp_path_factory.mktemp("clipcfg"), TINY_CLIP, image_size=32, patch_size=16
    )


def _images(n, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_open_clip_random_small_config(tiny_clip_config):
    emb = create_embedder(f"open_clip:{TINY_CLIP}:random")
    assert emb.dim == 24 and emb.input_config.input_size == 32
    assert emb.name == f"open_clip:{TINY_CLIP}:random" and emb.key
    img = emb.encode_images(_images(5, size=20), batch_size=2)
    txt = emb.encode_text(["a photo of a red bag", "a bag"])
    assert img.shape == (5, 24) and txt.shape == (2, 24)
    assert img.dtype == np.float32 and txt.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-5)
    # the same random config rebuilds the same model (stable cache key)
    assert create_embedder(f"open_clip:{TINY_CLIP}:random").key == emb.key
    with pytest.raises(ValueError, match="close matches"):
        create_embedder("open_clip:ViT-B-33:random")


def test_open_clip_missing_weights_is_an_error_not_a_download(tiny_clip_config):
    from audit.zoo.models import WeightsUnavailable

    with pytest.raises((WeightsUnavailable, ValueError)):
        create_embedder(f"open_clip:{TINY_CLIP}:/nonexistent/weights.bin")


def test_registry_lists_and_suggests():
    names = list_embedders()
    assert "world" in names and any(n.startswith("open_clip:ViT-B-32") for n in names)
    assert list_embedders("world") == [n for n in names if "world" in n]
    with pytest.raises(ValueError) as e:
        create_embedder("wrold")
    assert "world" in str(e.value) and "Registered backends" in str(e.value)
    with pytest.raises(ValueError, match="open_clip"):
        create_embedder("openclip:ViT-B-32:openai")
    with pytest.raises(TypeError):
        create_embedder("")


# -- the world encoder ----------------------------------------------------------------------
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 230)}
BACKS = {"dark": 30, "light": 220}
ITEMS = ["square", "bar"]


def _png(arr):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _captioned_table(n_per=2, size=8):
    rows = {
        k: [] for k in ("example_id", "split", "label", "image", "color", "background", "caption")
    }
    i = 0
    for split in ("train", "debug"):
        for li, item in enumerate(ITEMS):
            for c, rgb in COLORS.items():
                for b, g in BACKS.items():
                    for _ in range(n_per):
                        img = np.full((size, size, 3), g, np.uint8)
                        if item == "square":
                            img[2:6, 2:6] = rgb
                        else:
                            img[1:7, 3:5] = rgb
                        rows["example_id"].append(f"{split}-{i}")
                        rows["split"].append(split)
                        rows["label"].append(li)
                        rows["image"].append(_png(img))
                        rows["color"].append(c)
                        rows["background"].append(b)
                        rows["caption"].append(f"a photo of a {c} {item} on {b}")
                        i += 1
    t = pa.table(
        {
            **{k: v for k, v in rows.items() if k not in ("label", "image")},
            "label": pa.array(rows["label"], pa.int32()),
            "image": pa.array(rows["image"], pa.binary()),
        }
    )
    return ImageTable(t, ITEMS)


TINY_HP = {"epochs": 2, "width": 4, "dim": 16, "batch_size": 8, "proj_hidden": 16}


def test_caption_vocabulary_omits_attribute_words():
    from audit.embed.vocab import CaptionVocab, omit_value, omittable_attributes

    table = _captioned_table(n_per=1)
    assert omittable_attributes(table) == ["color", "background"]
    assert omit_value("a photo of an orange bag on grass", "orange") == "a photo of a bag on grass"
    assert omit_value("a photo of a red bag on the grass", "grass") == "a photo of a red bag"
    v = CaptionVocab.build(table.split("train"), ["a photo of {}", "{}"])
    assert [len(k) for k in v.keys] == [12, 4, 6, 2]  # full, no colour, no background, item only
    assert v.texts[3][0] == ["a photo of a square", "a photo of a bar"]
    assert "a blue bar on dark" in v.texts[0][1]
    assert v.targets[3].tolist() == table.split("train").labels.tolist()


def test_world_encoder_learns_what_its_captions_say(tmp_path):
    """A planted answer: colour, background and item are all there is in these images, so
    an encoder trained long enough retrieves each image's caption far above chance (label
    1/2, colour 1/3, background 1/2, the full caption 1/12)."""
    from audit.embed.world_encoder import train_world_encoder

    res = train_world_encoder(
        _captioned_table(), {**TINY_HP, "epochs": 40}, cache=str(tmp_path), progress=False
    )
    m = res.metrics
    assert m["label"] >= 0.7 and m["color"] >= 0.6 and m["background"] >= 0.8, m
    assert m["full_caption"] >= 0.4, m


def test_world_encoder_trains_caches_and_embeds(tmp_path):
    from audit.embed.world_encoder import WorldEncoder, checkpoint_key, train_world_encoder

    table = _captioned_table()
    res = train_world_encoder(table, TINY_HP, cache=str(tmp_path), progress=False)
    assert res.trained and res.path.startswith(str(tmp_path))
    assert set(res.metrics) == {"label", "color", "background", "full_caption"}
    again = train_world_encoder(table, TINY_HP, cache=str(tmp_path), progress=False)
    assert not again.trained and again.path == res.path and again.metrics == res.metrics
    # other hyper-parameters or other data, other checkpoint
    assert checkpoint_key(table, {**TINY_HP, "epochs": 1}) != res.key
    assert (
        checkpoint_key(table.take(np.arange(1, len(table))), TINY_HP) != res.key
    )  # a train row less
    assert (
        checkpoint_key(table.take(np.arange(len(table) - 1)), TINY_HP) == res.key
    )  # a debug row less

    emb = create_embedder("world", data=table, hparams=TINY_HP, cache=str(tmp_path), progress=False)
    assert (
        isinstance(emb, WorldEncoder)
        and emb.name == "world"
        and emb.dim == 16
        and emb.key.startswith(res.key + "-")  # the checkpoint's key and its weights' digest
    )
    images, _, _ = table.decode()
    img = emb.encode_images(images[:5])
    txt = emb.encode_text(["a photo of a blue square", "a picture of something red", "a bar"])
    assert img.shape == (5, 16) and txt.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="embed train"):
        create_embedder(
            "world", data=table, hparams={**TINY_HP, "seed": 9}, cache=str(tmp_path), train=False
        )
    with pytest.raises(ValueError, match="caption"):
        train_world_encoder(
            ImageTable(table.table.drop_columns(["caption"]), ITEMS), TINY_HP, cache=str(tmp_path)
        )
    with pytest.raises(ValueError, match="unknown world-encoder hyper-parameter"):
        train_world_encoder(table, {"epoch": 3}, cache=str(tmp_path))


def test_train_cli(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    import audit.embed.world_encoder as we

    table = _captioned_table(n_per=1)
    table.to_parquet(str(tmp_path / "data" / "examples.parquet"))
    monkeypatch.setenv("ZOO_AUDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(we, "HPARAMS", {**we.HPARAMS, **TINY_HP, "epochs": 1})
    res = we.train_cli(SimpleNamespace(data=str(tmp_path / "data"), device="cpu"))
    assert res.trained and str(tmp_path / "cache") in res.path
    assert "trained" in capsys.readouterr().out
    assert not we.train_cli(SimpleNamespace(data=str(tmp_path / "data"), device="cpu")).trained


# -- the embedding cache in the run directory -------------------------------------------------
class CountingEmbedder(Embedder):
    """A fake embedder: mean colour + a constant, counting the images it sees."""

    def __init__(self, key="k1"):
        self.name, self.dim, self.key, self.seen = "fake:counting", 4, key, 0

    def _encode_images(self, images):
        self.seen += len(images)
        m = images.reshape(len(images), -1, 3).mean(1)
        return np.concatenate([m, np.ones((len(images), 1))], 1)

    def _encode_text(self, texts):
        return np.ones((len(texts), 4))


def test_embedding_cache_is_reused_and_incremental(tmp_path):
    store = RunStore(tmp_path / "run")
    table = _captioned_table(n_per=1)
    emb = CountingEmbedder()
    first = embed_table(store, emb, table, progress=False)
    assert emb.seen == len(table) and first.vectors.shape == (len(table), 4)
    assert store.exists(embedding_path(emb)) and embedding_path(emb).startswith(
        "embeddings/embedder=fake_counting-"
    )
    stored = store.read_table(embedding_path(emb))
    assert pa.types.is_fixed_size_list(stored.schema.field("vector").type)
    assert store.manifest()["embeddings"][embedder_slug(emb.name)]["n"] == len(table)

    second = embed_table(store, emb, table, progress=False)  # another model, same data: no work
    assert emb.seen == len(table)
    np.testing.assert_array_equal(second.vectors, first.vectors)
    np.testing.assert_array_equal(second.example_ids, table.example_ids)

    sub = table.split("debug")  # a subset is served from the cache, in its own order
    part = embed_table(store, emb, sub.take(np.arange(len(sub))[::-1]), progress=False)
    assert emb.seen == len(table)
    np.testing.assert_array_equal(part.example_ids, sub.example_ids[::-1])

    loaded = load_embeddings(store, emb.name)
    np.testing.assert_allclose(loaded.align(sub.example_ids), first.align(sub.example_ids))
    with pytest.raises(ValueError, match="no fake:counting embedding"):
        loaded.align(["nope"])

    other = CountingEmbedder(key="k2")  # new weights: everything is recomputed
    embed_table(store, other, table, progress=False)
    assert other.seen == len(table)


def test_embedding_cache_records_undecodable_rows(tmp_path):
    store = RunStore(tmp_path / "run")
    table = _captioned_table(n_per=1)
    images = table.table["image"].to_pylist()
    images[3] = b"not a png"
    bad = ImageTable(
        table.table.set_column(
            table.table.schema.get_field_index("image"), "image", pa.array(images, pa.binary())
        ),
        ITEMS,
    )
    out = embed_table(store, CountingEmbedder(), bad, progress=False)
    assert len(out) == len(table) - 1 and table.example_ids[3] not in out.example_ids
    errs = store.errors().to_pylist()
    assert errs and errs[0]["stage"] == "embed" and table.example_ids[3] in errs[0]["item"]
    with pytest.raises(TypeError, match="Embedder"):
        embed_table(store, object(), table)
