"""The generation service through real HTTP on 127.0.0.1.

One embedded Ray + Serve per module hosts three small apps side by side:
``/w`` world backend with a bearer token and tight limits, ``/n`` the null backend with a
slow, tiny queue and an injected failure, ``/d`` a tiny random Stable Diffusion pipeline
loaded through the same ``diffusers:DIR`` path as real weights.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import os
import socket

import numpy as np
import pytest

from serve.backends import (
    WorldBackend,
    build_tiny_sd_pipeline,
    create_backend,
    image_seed,
    list_backends,
)
from serve.config import GenerateRequest, Limits, ServeAppConfig, check_set_id, load_config

TOKEN = "s3cret-token"
RED_SANDAL = "a photo of a red sandal on grass"
BLUE_BAG = "a photo of a blue bag on moon"


def _png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# -- pure parts (no Ray) ---------------------------------------------------------------
def test_registry_and_config_errors():
    assert {"world", "null", "diffusers"} <= set(list_backends())
    with pytest.raises(ValueError, match="did you mean"):
        create_backend("wrld")
    for bad in ["../x", "/abs", "a/b", ".hidden", "", "a..b", "x" * 200]:
        with pytest.raises(ValueError, match="set_id"):
            check_set_id(bad)
    assert check_set_id("family-resnet_v1.2") == "family-resnet_v1.2"
    cfg = load_config({"backend": "null", "generator.num_gpus": "1", "limits.max_steps": "7"})
    assert cfg.generator.num_gpus == 1.0 and cfg.limits.max_steps == 7
    assert cfg.generator.deployment_options(1.0)["num_replicas"] == 1
    auto = load_config({"generator": {"min_replicas": 1, "max_replicas": 4}}).generator.deployment_options(1.0)
    assert auto["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in auto
    with pytest.raises(ValueError, match="limits.max_images_per_prompt=2"):
        GenerateRequest(prompts=["a"], images_per_prompt=3).check_limits(Limits(max_images_per_prompt=2))


@pytest.fixture
def one_thread():
    """Tiny CPU models on a shared 2-core box run far faster on one intra-op thread."""
    import torch

    n = torch.get_num_threads()
    yield 1
    torch.set_num_threads(n)


def test_diffusers_backend_direct(tiny_sd, one_thread):
    b = create_backend(f"diffusers:{tiny_sd}", steps=2, num_threads=one_thread)
    assert b.defaults()["size"] == [32, 32] and b.dtype.__repr__() == "torch.float32"
    pair = b.generate(["a red sandal", "a blue bag"], [11, 12], 2, 5.0, (32, 32))
    alone = b.generate(["a red sandal"], [11], 2, 5.0, (32, 32))
    other = b.generate(["a red sandal"], [13], 2, 5.0, (32, 32))
    assert pair.shape == (2, 32, 32, 3) and pair.dtype == np.uint8
    np.testing.assert_array_equal(pair[0], alone[0])  # independent of what else is in the batch
    assert not np.array_equal(alone[0], other[0])
    with pytest.raises(ValueError, match="unknown diffusers scheduler"):
        create_backend(f"diffusers:{tiny_sd}", scheduler="NoSuchScheduler")
    ddim = create_backend(f"diffusers:{tiny_sd}", scheduler="DDIMScheduler")
    assert ddim.scheduler == "DDIMScheduler"
    with pytest.raises(FileNotFoundError, match="Hugging Face cache"):
        create_backend("diffusers:nobody/no-such-model-here")


# -- the service -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> str:
    return build_tiny_sd_pipeline(str(tmp_path_factory.mktemp("tiny_sd") / "pipe"))


@pytest.fixture(scope="module")
def service(tmp_path_factory, ray_session):
    from ray import serve

    from serve.app import build_app

    root = tmp_path_factory.mktemp("serve")
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    limits = {"max_prompts": 4, "max_prompt_chars": 80, "max_images_per_prompt": 4, "max_images": 12,
              "max_steps": 10, "max_size": 64, "max_guidance": 20}  # fmt: skip
    small = {"num_cpus": 0.25, "max_batch_size": 4, "max_ongoing_requests": 4, "batch_wait_timeout_s": 0.05}
    apps = {
        "w": ServeAppConfig(backend="world", store=str(root / "w"), token_file=str(token_file), limits=limits, generator=small),
        "n": ServeAppConfig(backend="null", backend_options={"delay_s": 0.6, "fail_prompt": "boom"}, store=str(root / "n"),
                            generator={"num_cpus": 0.25, "max_batch_size": 1, "max_ongoing_requests": 1, "max_queued_requests": 1},
                            retry_after_s=2),  # fmt: skip
    }
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run_many([serve.RunTarget(build_app(c), name=n, route_prefix=f"/{n}") for n, c in apps.items()])
    yield {"url": f"http://127.0.0.1:{port}", "stores": {n: c.store for n, c in apps.items()}, "root": root}
    serve.shutdown()


@pytest.fixture(scope="module")
def http(service):
    import httpx

    with httpx.Client(base_url=service["url"], timeout=120) as c:
        yield c


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _gen(http, app: str, auth: bool = True, **body):
    return http.post(f"/{app}/v1/generate", json=body, headers=AUTH if auth else {})


@pytest.mark.ray
def test_world_round_trip_and_stored_set(service, http):
    from audit.store import RunStore

    r = _gen(http, "w", prompts=[RED_SANDAL, BLUE_BAG], images_per_prompt=3, seed=5, set_id="rt", return_images=True)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["set_id"] == "rt" and body["n_images"] == 6 and not body["cached"]
    assert body["image_ids"] == [f"rt-{i:05d}" for i in range(6)]
    imgs = np.stack([_png(base64.b64decode(b)) for b in body["images"]])
    # The images are the renderer's for each (caption, image seed): they show the caption.
    want = WorldBackend().generate([RED_SANDAL] * 3, [image_seed(5, i) for i in range(3)], 1, 0.0, (32, 32))
    np.testing.assert_array_equal(imgs[:3], want)

    t = RunStore(service["stores"]["w"]).read_table("synthetic/rt")
    assert t.num_rows == 6 and {"image_id", "png", "prompt", "seed", "generator", "params"} <= set(t.column_names)
    assert t["prompt"].to_pylist() == [RED_SANDAL] * 3 + [BLUE_BAG] * 3 and set(t["generator"].to_pylist()) == {"world"}
    np.testing.assert_array_equal(_png(t["png"][4].as_py()), imgs[4])

    meta = http.get("/w/v1/sets/rt", headers=AUTH).json()
    assert meta["n_images"] == 6 and meta["n_prompts"] == 2 and {c["n"] for c in meta["counts"]} == {3}
    img = http.get("/w/v1/sets/rt/images/4.png", headers=AUTH)
    assert img.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(_png(img.content), imgs[4])
    assert http.get("/w/v1/sets/rt/images/6.png", headers=AUTH).status_code == 404
    assert http.get("/w/v1/sets/nope", headers=AUTH).status_code == 404
    assert "images" not in _gen(http, "w", prompts=[RED_SANDAL], set_id="rt2").json()  # inline only when asked


@pytest.mark.ray
def test_determinism_and_batching(service, http):
    from ray import serve

    def get(seed, sid):
        r = _gen(http, "w", prompts=[RED_SANDAL], images_per_prompt=2, seed=seed, set_id=sid, return_images=True)
        assert r.status_code == 200, r.text
        return r.json()["images"]

    with cf.ThreadPoolExecutor(4) as ex:  # concurrent clients: merged by @serve.batch
        a, b, c, _ = ex.map(lambda x: get(*x), [(7, "det-a"), (7, "det-b"), (8, "det-c"), (9, "det-d")])
    assert a == b and a != c
    sizes = serve.get_deployment_handle("Generator", app_name="w").batch_sizes.remote().result()
    assert max(sizes) > 1, sizes


@pytest.mark.ray
def test_idempotent_and_conflict(service, http):
    from audit.store import RunStore

    store = RunStore(service["stores"]["w"])
    req = {"prompts": [BLUE_BAG], "images_per_prompt": 2, "seed": 3, "set_id": "idem"}
    first = _gen(http, "w", **req)
    path = store.path("synthetic/idem/part-00000.parquet")
    mtime = os.stat(path).st_mtime_ns
    again = _gen(http, "w", **req)
    assert again.status_code == 200 and again.json()["cached"] and again.json()["image_ids"] == first.json()["image_ids"]
    assert os.stat(path).st_mtime_ns == mtime  # not generated or written twice
    conflict = _gen(http, "w", **{**req, "seed": 4})
    assert conflict.status_code == 409 and "idem" in conflict.json()["detail"]
    # Without a set id, the id is the request's hash: asking twice is also idempotent.
    x, y = (_gen(http, "w", prompts=[RED_SANDAL], seed=99).json() for _ in range(2))
    assert x["set_id"] == y["set_id"] and y["cached"] and not x["cached"]


@pytest.mark.ray
@pytest.mark.parametrize(
    ("body", "bound"),
    [
        ({"prompts": [RED_SANDAL] * 5}, "limits.max_prompts=4"),
        ({"prompts": ["a photo of a " + "very " * 20 + "red bag"]}, "limits.max_prompt_chars=80"),
        ({"prompts": [RED_SANDAL], "images_per_prompt": 5}, "limits.max_images_per_prompt=4"),
        ({"prompts": [RED_SANDAL] * 4, "images_per_prompt": 4}, "limits.max_images=12"),
        ({"prompts": [RED_SANDAL], "steps": 11}, "limits.max_steps=10"),
        ({"prompts": [RED_SANDAL], "size": 128}, "limits.max_size=64"),
        ({"prompts": [RED_SANDAL], "size": [32, 36]}, "limits.size_multiple=8"),
        ({"prompts": [RED_SANDAL], "guidance": 25}, "limits.max_guidance=20"),
        ({"prompts": ["a photo of a unicorn"]}, "unknown item 'unicorn'"),
        ({"prompts": []}, "prompts"),
        ({"prompts": [RED_SANDAL], "colour": "red"}, "colour"),
    ],
)
def test_limits_are_422_naming_the_bound(service, http, body, bound):
    r = _gen(http, "w", **body)
    assert r.status_code == 422, r.text
    assert bound in str(r.json()["detail"])


@pytest.mark.ray
def test_auth(service, http):
    assert _gen(http, "w", auth=False, prompts=[RED_SANDAL]).status_code == 401
    bad = http.post("/w/v1/generate", json={"prompts": [RED_SANDAL]}, headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
    assert http.post("/w/v1/generate", content=b"not json").status_code == 401  # auth before parsing
    assert http.get("/w/v1/sets/rt").status_code == 401
    assert http.get("/w/healthz").json()["auth"] is True
    assert http.get("/n/healthz").json()["auth"] is False


@pytest.mark.ray
def test_path_traversal_rejected(service, http):
    for sid in ["../escape", "/etc", "a/../../b", ".hidden", "..", "a\\b"]:
        r = _gen(http, "w", prompts=[RED_SANDAL], set_id=sid)
        assert r.status_code == 422 and "set_id" in str(r.json()["detail"]), (sid, r.text)
    for path in ["/w/v1/sets/..%2F..%2Fetc", "/w/v1/sets/%2E%2E", "/w/v1/sets/.hidden", "/w/v1/sets/..%2Fn/images/0.png"]:
        assert http.get(path, headers=AUTH).status_code in (404, 422), path
    root = os.path.dirname(service["stores"]["w"])
    assert not any(n in os.listdir(root) for n in ("escape", "b", "etc"))


@pytest.mark.ray
def test_backend_error_is_500_and_leaves_no_set(service, http):
    from audit.store import RunStore

    store = RunStore(service["stores"]["n"])
    r = _gen(http, "n", prompts=["fine", "boom here"], images_per_prompt=2, set_id="broken")
    assert r.status_code == 500, r.text
    eid = r.json()["error_id"]
    assert eid in r.json()["detail"] and not store.exists("synthetic/broken")
    assert any(eid in reason for reason in store.errors()["reason"].to_pylist())
    assert http.get("/n/v1/sets/broken").status_code == 404
    ok = _gen(http, "n", prompts=["fine"], set_id="broken")  # the id is still free
    assert ok.status_code == 200 and store.exists("synthetic/broken/part-00000.parquet")


@pytest.mark.ray
def test_overload_is_503_with_retry_after(service, http):
    """1 request in flight + 1 queued per generator replica; the rest get 503 at once."""
    import httpx

    from audit.store import RunStore

    def one(i):
        with httpx.Client(base_url=service["url"], timeout=60) as c:
            return i, c.post("/n/v1/generate", json={"prompts": ["load"], "seed": 1000 + i, "set_id": f"load-{i}"})

    with cf.ThreadPoolExecutor(8) as ex:
        res = list(ex.map(one, range(8)))
    codes = [r.status_code for _, r in res]
    assert set(codes) <= {200, 503} and codes.count(503) >= 4 and codes.count(200) >= 1, codes
    assert all(r.headers.get("retry-after") == "2" for _, r in res if r.status_code == 503)
    store = RunStore(service["stores"]["n"])
    stored = {n for n in store.listdir("synthetic") if n.startswith("load-")}
    assert stored == {f"load-{i}" for i, r in res if r.status_code == 200}


@pytest.fixture(scope="module")
def sd_app(service, tiny_sd):
    """A third app, ``/d``: the tiny pipeline through the generic ``diffusers:DIR`` path."""
    from ray import serve

    from serve.app import build_app

    cfg = ServeAppConfig(backend=f"diffusers:{tiny_sd}", backend_options={"steps": 2, "num_threads": 1},
                         store=str(service["root"] / "d"), generator={"num_cpus": 0.25})  # fmt: skip
    serve.run(build_app(cfg), name="d", route_prefix="/d")
    return cfg


@pytest.mark.ray
@pytest.mark.slow  # a third replica importing diffusers: ~15 s on 2 busy cores; the backend is tested directly above
def test_diffusers_over_http(sd_app, http, tiny_sd, one_thread):
    body = {"prompts": ["a red sandal", "a bag"], "images_per_prompt": 2, "seed": 1, "size": 32, "return_images": True}
    r = http.post("/d/v1/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["generator"] == f"diffusers:{tiny_sd}" and out["request"]["steps"] == 2 and out["n_images"] == 4
    imgs = np.stack([_png(base64.b64decode(b)) for b in out["images"]])
    direct = create_backend(f"diffusers:{tiny_sd}", steps=2, num_threads=one_thread).generate(["a bag"], [image_seed(1, 1)], 2, 7.5, (32, 32))
    np.testing.assert_array_equal(imgs[3], direct[0])  # same image as the backend called directly
    again = http.post("/d/v1/generate", json={**body, "set_id": "sd-again"}).json()
    assert again["images"] == out["images"]


@pytest.mark.ray
def test_client_request_set(service):
    from serve.client import GenerationClient, ServiceError

    with GenerationClient(f"{service['url']}/w", token=TOKEN, timeout=60) as c:
        s = c.request_set([RED_SANDAL, BLUE_BAG], k=3, seed=2)
        assert s.images.shape == (6, 32, 32, 3) and s.prompts[3] == BLUE_BAG and not s.cached
        assert c.request_set([RED_SANDAL, BLUE_BAG], k=3, seed=2).cached
        np.testing.assert_array_equal(c.image(s.set_id, 5), s.images[5])
        assert c.get_set(s.set_id)["n_images"] == 6
        with pytest.raises(ServiceError, match="limits.max_prompts"):
            c.request_set([RED_SANDAL] * 5, k=1)
    with GenerationClient(f"{service['url']}/w", token="wrong", timeout=5) as c, pytest.raises(ServiceError, match="401"):
        c.request_set([RED_SANDAL])
