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


# -- one base class, one subclass per kind of member: linear_head() reproduces the logits ----
TINY_RESNET = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8}
TINY_CLIP = "zoo-audit-test-tiny-clip-zoo"


def _batch(n=3, size=16, seed=0):
    import torch

    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, 3, size, size))).float()


def _assert_head_reproduces_logits(module, x):
    import torch

    with torch.no_grad():
        logits, feats = module(x)
    W, b = module.linear_head()
    assert W.dtype == np.float64 and b.dtype == np.float64
    assert W.shape == (logits.shape[1], feats.shape[1]) and b.shape == (logits.shape[1],)
    np.testing.assert_allclose(feats.double().numpy() @ W.T + b, logits.numpy(), atol=1e-4)
    assert np.abs(logits.numpy()).max() > 1e-3  # a check on all-zero logits would prove nothing


def _tiny_timm_spec(**kw) -> ModelSpec:
    return ModelSpec(name="r", family="resnet", arch="resnet18", kwargs=TINY_RESNET, **kw)


def test_timm_classifier_linear_head_is_its_classifier(tmp_path):
    import torch
    from safetensors.torch import save_file

    from audit.zoo.models import create_timm
    from audit.zoo.modules import TimmClassifier

    torch.manual_seed(0)
    net = create_timm(_tiny_timm_spec(), 3)
    torch.nn.init.normal_(net.get_classifier().bias)  # a zero bias would hide a dropped b
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors")
    )
    m = build_model(_tiny_timm_spec(), ["a", "b", "c"], str(tmp_path / "w.safetensors")).module
    assert isinstance(m, TimmClassifier)
    _assert_head_reproduces_logits(m, _batch())
    np.testing.assert_array_equal(
        m.linear_head()[1], net.get_classifier().bias.detach().double().numpy()
    )
    # a linear-probe head on a headless backbone: its head, not the backbone's classifier
    probe = torch.nn.Linear(64, 5)
    m = TimmClassifier(create_timm(_tiny_timm_spec(), 0), probe).eval()
    _assert_head_reproduces_logits(m, _batch())
    np.testing.assert_array_equal(m.linear_head()[0], probe.weight.detach().double().numpy())
    assert TimmClassifier(create_timm(_tiny_timm_spec(), 0)).linear_head() is None  # headless


def test_timm_local_backbone_file_and_linear_probe_head_file(tmp_path):
    """The ladder's local-file rung through the builder: backbone file + head file."""
    import torch
    from safetensors.torch import save_file

    from audit.zoo.models import create_timm

    torch.manual_seed(1)
    net = create_timm(_tiny_timm_spec(), 1000)
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "bb.safetensors")
    )
    probe = torch.nn.Linear(64, 4)
    torch.save(probe.state_dict(), tmp_path / "head.pth")
    spec = _tiny_timm_spec(
        weights=str(tmp_path / "bb.safetensors"), pretrained=str(tmp_path / "head.pth")
    )
    loaded = build_model(spec, ["a", "b", "c", "d"])
    assert loaded.num_classes == 4
    _assert_head_reproduces_logits(loaded.module, _batch())
    np.testing.assert_allclose(loaded.module.linear_head()[0], probe.weight.double().detach())
    got = loaded.module.backbone.state_dict()["conv1.weight"]
    assert torch.equal(got, net.state_dict()["conv1.weight"])  # the file's weights, not random


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    pytest.importorskip("open_clip")
    from tiny_clip import register_tiny_clip

    register_tiny_clip(tmp_path_factory.mktemp("clipcfg"), TINY_CLIP)
    return TINY_CLIP


def test_clip_zero_shot_linear_head_is_scaled_text_embeddings(tiny_clip):
    import torch

    from audit.zoo.modules import ClipZeroShot

    torch.manual_seed(0)
    spec = ModelSpec(name="c", family="clip", builder="open_clip", arch=tiny_clip)
    assert weights_status(spec) == (True, "random initialisation (no pretrained tag)")
    loaded = build_model(spec, ["cat", "dog", "bird"])
    m = loaded.module
    assert isinstance(m, ClipZeroShot) and loaded.num_classes == 3
    with torch.no_grad():
        m.backbone.logit_scale.fill_(2.0)  # scale e^2: a head that forgot it would be off
    _assert_head_reproduces_logits(m, _batch())
    W, b = m.linear_head()
    np.testing.assert_allclose(W, np.exp(2.0) * m.head.double().numpy().T, rtol=1e-6)
    assert not b.any()


def test_torchscript_model_features_are_its_logits_and_it_has_no_linear_head(tmp_path):
    import torch

    from audit.zoo.modules import TorchScriptModel

    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    )
    torch.jit.script(net).save(str(tmp_path / "m.pt"))
    spec = ModelSpec(name="l", family="x", builder="local", weights=str(tmp_path / "m.pt"))
    assert weights_status(spec) == (True, f"local file {tmp_path / 'm.pt'}")
    m = build_model(spec, ["a", "b", "c"]).module
    assert isinstance(m, TorchScriptModel) and m.linear_head() is None
    x = _batch()
    with torch.no_grad():
        logits, feats = m(x)
        np.testing.assert_allclose(logits.numpy(), net(x).numpy(), atol=1e-6)
    assert feats is logits
    torch.save(net, tmp_path / "pickled.pt")  # a pickle is refused, never unpickled
    spec = ModelSpec(name="p", family="x", builder="local", weights=str(tmp_path / "pickled.pt"))
    with pytest.raises(WeightsUnavailable, match="not a TorchScript file"):
        build_model(spec, ["a", "b", "c"])


# -- the one weights ladder -------------------------------------------------------------------
def test_weights_ladder_train_and_local_files(tmp_path):
    from audit.zoo.weights import resolve_weights

    src = resolve_weights(_tiny_timm_spec())
    assert (src.ok, src.kind, src.where) == (
        True,
        "train",
        None,
    ) and "zoo-audit zoo train" in src.why
    missing = str(tmp_path / "nope.safetensors")
    src = resolve_weights(_tiny_timm_spec(weights=missing))
    assert not src.ok and src.why == f"backbone weights file {missing!r} not found"
    with pytest.raises(WeightsUnavailable, match=f"model 'r': {src.why}"):
        build_model(_tiny_timm_spec(weights=missing), ["a"])
    (tmp_path / "bb.safetensors").write_bytes(b"x")
    src = resolve_weights(_tiny_timm_spec(weights=str(tmp_path / "bb.safetensors")))
    assert (src.ok, src.kind, src.where) == (True, "file", str(tmp_path / "bb.safetensors"))
    src = resolve_weights(
        _tiny_timm_spec(weights=str(tmp_path / "bb.safetensors"), pretrained="$NOPE/h.pth")
    )
    assert not src.ok and src.why.startswith("linear-probe head file '$NOPE/h.pth' not found")
    (tmp_path / "h.pth").write_bytes(b"x")
    src = resolve_weights(
        _tiny_timm_spec(
            weights=str(tmp_path / "bb.safetensors"), pretrained=str(tmp_path / "h.pth")
        )
    )
    assert src.ok and src.head == str(tmp_path / "h.pth")


def test_weights_ladder_hf_hub_looks_in_the_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from audit.zoo.weights import resolve_weights

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    spec = _tiny_timm_spec(weights="hf-hub:zoo-audit-test/tiny")
    src = resolve_weights(spec)
    assert (src.ok, src.kind, src.where) == (False, "hf-hub", "zoo-audit-test/tiny")
    assert src.why.startswith("not in the Hugging Face cache: zoo-audit-test/tiny")
    with pytest.raises(WeightsUnavailable, match="not in the Hugging Face cache"):
        build_model(spec, ["a"])
    repo = tmp_path / "models--zoo-audit-test--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "model.safetensors").write_bytes(b"x")
    assert resolve_weights(spec) == type(src)(
        True, "HF cache (zoo-audit-test/tiny)", "hf-hub", "zoo-audit-test/tiny"
    )


def test_models_trained_side_by_side_in_threads_match_one_trained_alone():
    """An in-process executor trains models on Python threads: each must get the weights it
    gets alone (its seeded initial weights are drawn from torch's process-wide generator,
    one model at a time; without that, the other model's draws interleave), and torch's
    thread count is as before once both are done."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from audit.zoo.spec import ModelSpec
    from audit.zoo.train import train_model

    kw = {"layers": [1, 1, 1, 1], "channels": [8, 16, 16, 16], "stem_width": 8}
    inp = {"input_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 1.0}

    def spec(name, epochs):
        train = {"epochs": epochs, "batch_size": 32, "lr": 0.01}
        return ModelSpec(name, "f", arch="resnet18", kwargs=kw, input=inp, train=train)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (128, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 128)

    def fit(s):
        return train_model(s, images, labels, ["a", "b", "c"], progress=False, threads=1)

    short, long = spec("short", 1), spec("long", 4)  # the short one finishes first
    alone = fit(long)
    before = torch.get_num_threads()
    with ThreadPoolExecutor(2) as pool:
        _, side_by_side = pool.map(fit, [short, long])
    assert torch.get_num_threads() == before
    assert all(torch.equal(alone[k], side_by_side[k]) for k in alone)
