"""The generator learned from the audited data (``learned``): trained on the train split
only, cached by content hash, deterministic per (caption, seed), served by the Serve
backend ``learned:DIR``; and when it cannot train, the run retrieves instead, saying why."""

from __future__ import annotations

import numpy as np
import pytest

TINY = {
    "steps": 120,
    "channels": [16, 32],
    "batch_size": 32,
    "lr": 3e-3,
    "bank": 16,
    "ddim_steps": 8,
}


@pytest.fixture(scope="module")
def learned(tmp_path_factory, testbed):
    from audit.data.readers import read_dataset
    from audit.slots import SlotGrammar
    from audit.synthetic.learned import train_learned

    data = read_dataset(testbed[0])
    grammar = SlotGrammar.of(data)
    cache = str(tmp_path_factory.mktemp("learned"))
    return data, grammar, cache, train_learned(data, grammar, TINY, cache=cache)


def test_it_trains_once_and_composes_a_colour_it_rarely_saw_on_the_class(learned):
    """Blue is 1% of the test bed's t-shirts in train: the model learns blue from the other
    classes and paints it on t-shirts edited from real ones (their colour is the caption's)."""
    from audit.synthetic.learned import LearnedModel, train_learned

    data, grammar, cache, root = learned
    assert train_learned(data, grammar, TINY, cache=cache) == root  # cached by content hash
    m = LearnedModel(root)
    assert m.meta["loss_last"] < m.meta["loss_first"]
    blue = m.generate(["a photo of a blue t-shirt"] * 8, list(range(8)))
    red = m.generate(["a photo of a red t-shirt"] * 8, list(range(8)))  # the same sources
    assert blue.shape == (8, 16, 16, 3) and blue.dtype == np.uint8
    np.testing.assert_array_equal(
        blue, m.generate(["a photo of a blue t-shirt"] * 8, list(range(8)))
    )
    b, r = blue.astype(float), red.astype(float)
    assert (b[..., 2] - b[..., 0]).mean() > (r[..., 2] - r[..., 0]).mean() + 10
    with pytest.raises(ValueError, match="names none of the classes"):
        m.generate(["a photo of a bicycle"], [0])


def test_the_serve_backend_loads_it(learned):
    from serve.backends import create_backend

    *_, root = learned
    backend = create_backend(f"learned:{root}")
    d = backend.defaults()
    imgs = backend.generate(
        ["a photo of a green trouser"], [3], d["steps"], d["guidance"], (24, 24)
    )
    assert imgs.shape == (1, 24, 24, 3)
    with pytest.raises(FileNotFoundError, match="holds no learned generator"):
        create_backend("learned:/nowhere")


def test_a_generator_that_cannot_train_falls_back_to_retrieval_with_one_line(
    tmp_path, caplog, testbed
):
    from audit.data.readers import read_dataset
    from audit.pipeline.config import AuditConfig
    from audit.store import RunStore
    from audit.synthetic import RetrievalSetGenerator
    from cluster.generate import choose_generator

    data = read_dataset(testbed[0])
    few = data.take(np.flatnonzero(data.column("split") != "train")[:50])  # no train split left
    cfg = AuditConfig(data={"path": "unused"}, generate={"backend": "learned"})

    def no_serve(spec):
        raise AssertionError(spec)

    with caplog.at_level("WARNING", logger="cluster.generate"):
        gen = choose_generator(cfg, RunStore(str(tmp_path / "run")), None, no_serve, few)
    assert isinstance(gen, RetrievalSetGenerator)
    assert [r.message for r in caplog.records] == [
        "generation backend: learned cannot be trained (the learned generator needs at least 8 "
        "decodable train images per class; the train split has 0 for 3 classes); retrieval instead"
    ]
