"""Which captions a cluster's shared synthetic set is made from."""

from __future__ import annotations

import pytest

from audit.pipeline.generate import cluster_hard_captions, set_id_for
from audit.synthetic.sets import check_set_id


def test_a_clusters_set_holds_the_named_caption_of_each_of_its_classes():
    from audit.pipeline.name import NamedMode

    named = [
        NamedMode("cluster:0", "bag", 0, "a photo of a green bag", "a photo of a bag"),
        NamedMode("cluster:0", "dress", 1, "a photo of a dress on moon", None),
        NamedMode("cluster:1", "bag", 0, "a photo of a green bag", None),
        NamedMode("m1", "bag", 0, "a photo of a blue bag", None),
    ]
    assert cluster_hard_captions(named) == {
        "cluster:0": ["a photo of a dress on moon", "a photo of a green bag"],
        "cluster:1": ["a photo of a green bag"],
    }
    assert check_set_id(set_id_for("cluster:0", "0123456789abcdef")) == "cluster-0-hard-01234567"


def _config(backend: str = "world", url: str = ""):
    from audit.pipeline.config import AuditConfig

    return AuditConfig(data={"path": "unused"}, generate={"backend": backend, "url": url})


def test_the_generator_is_chosen_at_its_first_request(tmp_path, caplog):
    """The composition root: an unknown backend fails the generate stage (the first request),
    naming the known ones, not the run's start; data that is not a world retrieves (one
    warning line) without Ray; a URL is the running service."""
    from audit.store import RunStore
    from audit.synthetic import RetrievalSetGenerator
    from cluster.generate import ChosenGenerator, HttpSetGenerator, choose_generator

    store = RunStore(str(tmp_path / "run"))

    def no_serve(spec):
        raise AssertionError(f"Serve asked for {spec}")

    gen = ChosenGenerator(
        lambda: choose_generator(_config("stable-diffusion"), store, None, no_serve)
    )
    with pytest.raises(
        ValueError, match="no generation backend; known: diffusers, learned, null, world"
    ):
        gen.request_sets({"m": ["a photo of a bag"]}, {"m": "m-hard-0"}, 1, 0)
    with caplog.at_level("WARNING", logger="cluster.generate"):
        chosen = choose_generator(_config("world"), store, None, no_serve)
    assert isinstance(chosen, RetrievalSetGenerator) and chosen.store is store
    assert [r.message for r in caplog.records] == [
        "generation backend: retrieval: the nearest real pool images of each caption (the data is "
        "not a world and no diffusion weights are configured; set [generate] backend = "
        "'diffusers:MODEL' to generate)"
    ]
    assert choose_generator(_config("world"), store, "/w", lambda spec: spec) == "world:/w"
    url = choose_generator(_config(url="http://127.0.0.1:1"), store, None, no_serve)
    assert isinstance(url, HttpSetGenerator)


@pytest.mark.ray
def test_run_generates_through_the_serve_handle_without_a_port(
    ray_session, tiny_world, tmp_path, monkeypatch
):
    """A world run's generator (from the composition root): the in-process Serve app, started
    without proxies (no HTTP port), called through its handle; the sets it stores are the
    world renderer's images of each (caption, image seed), k per caption, in RUN/synthetic/."""
    import io

    import numpy as np
    from PIL import Image
    from ray import serve
    from ray.util import list_named_actors

    import cluster.generate as cg
    from audit.store import RunStore
    from audit.synthetic.sets import image_seed, read_set_meta
    from cluster.runner import _LazyRay, ray_services
    from serve.backends import WorldBackend

    during = []
    real = cg.ServeSetGenerator._make_set

    def spy(self, handle, *a):  # what runs in this Ray while the run asks for a set
        proxies = [x for x in list_named_actors(all_namespaces=True) if "PROXY" in x["name"]]
        during.append((type(handle).__name__, serve.status().proxies, proxies))
        return real(self, handle, *a)

    monkeypatch.setattr(cg.ServeSetGenerator, "_make_set", spy)
    cfg = _config("world")
    store = RunStore(str(tmp_path / "run"))
    services = ray_services(cfg, store, tiny_world, _LazyRay(cfg, None, False, None), False)
    wanted = {
        "cluster:0": ["a photo of a blue t-shirt", "a photo of a sandal on brick"],
        "cluster:1": ["a photo of a red trouser"],
    }
    ids = {s: set_id_for(s, "feedbeef00") for s in wanted}
    table = services.generator.request_sets(wanted, ids, 3, 0)
    assert during == [("DeploymentHandle", {}, [])] * 2  # no proxy: nothing listens for HTTP
    assert table["scope"].to_pylist() == ["cluster:0", "cluster:1"]
    assert set(table["generator"].to_pylist()) == {"world"}
    renderer = WorldBackend(tiny_world)
    size = tuple(renderer.defaults()["size"])
    for r in table.to_pylist():
        meta = read_set_meta(store, r["set_id"])
        assert meta["n_images"] == r["n_images"] == 3 * len(wanted[r["scope"]])
        assert [c["prompt"] for c in meta["counts"]] == wanted[r["scope"]]
        t = store.read_table(f"synthetic/{r['set_id']}")
        got = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in t["png"].to_pylist()])
        want = renderer.generate(t["prompt"].to_pylist(), t["seed"].to_pylist(), 1, 0.0, size)
        np.testing.assert_array_equal(got, want)
        assert t["seed"].to_pylist()[:3] == [image_seed(0, i) for i in range(3)]
    # asked again (a resumed run): the stored sets answer, nothing is generated twice
    before = {r: store.mtime_size(f"synthetic/{r}/part-00000.parquet") for r in ids.values()}
    again = ray_services(cfg, store, tiny_world, _LazyRay(cfg, None, False, None), False)
    assert again.generator.request_sets(wanted, ids, 3, 0).equals(table)
    assert before == {
        r: store.mtime_size(f"synthetic/{r}/part-00000.parquet") for r in ids.values()
    }
    with pytest.raises(ValueError, match="not a world"):
        cg.ServeSetGenerator("world", store.uri, None).request_sets(wanted, ids, 3, 0)
