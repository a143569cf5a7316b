"""The generation service through real HTTP on 127.0.0.1 and through the handle ``serve.run``
returns (the apps of :mod:`serve_fixtures`, plus ``/d``: a tiny random Stable Diffusion
pipeline loaded through the same ``diffusers:DIR`` path as real weights)."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import os

import numpy as np
import pytest
from serve_helpers import (
    AUTH,
    BLUE_BAG,
    RED_SANDAL,
    TOKEN,
    png_array,
    post,
)

from audit.synthetic.sets import image_seed
from serve.backends import WorldBackend, create_backend
from serve.config import ServeAppConfig

pytest_plugins = ["serve_fixtures"]  # service, http, tiny_sd, one_thread


@pytest.mark.ray
def test_world_round_trip_and_stored_set(service, http):
    from audit.store import RunStore

    r = post(
        http,
        "w",
        prompts=[RED_SANDAL, BLUE_BAG],
        images_per_prompt=3,
        seed=5,
        set_id="rt",
        return_images=True,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["set_id"] == "rt" and body["n_images"] == 6 and not body["cached"]
    assert body["image_ids"] == [f"rt-{i:05d}" for i in range(6)]
    imgs = np.stack([png_array(base64.b64decode(b)) for b in body["images"]])
    # The images are the renderer's for each (caption, image seed): they show the caption.
    want = WorldBackend().generate(
        [RED_SANDAL] * 3, [image_seed(5, i) for i in range(3)], 1, 0.0, (32, 32)
    )
    np.testing.assert_array_equal(imgs[:3], want)

    t = RunStore(service["stores"]["w"]).read_table("synthetic/rt")
    assert t.num_rows == 6 and {"image_id", "png", "prompt", "seed", "generator", "params"} <= set(
        t.column_names
    )
    assert t["prompt"].to_pylist() == [RED_SANDAL] * 3 + [BLUE_BAG] * 3 and set(
        t["generator"].to_pylist()
    ) == {"world"}
    np.testing.assert_array_equal(png_array(t["png"][4].as_py()), imgs[4])

    meta = http.get("/w/v1/sets/rt", headers=AUTH).json()
    assert (
        meta["n_images"] == 6 and meta["n_prompts"] == 2 and {c["n"] for c in meta["counts"]} == {3}
    )
    img = http.get("/w/v1/sets/rt/images/4.png", headers=AUTH)
    assert img.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(png_array(img.content), imgs[4])
    assert http.get("/w/v1/sets/rt/images/6.png", headers=AUTH).status_code == 404
    assert http.get("/w/v1/sets/nope", headers=AUTH).status_code == 404
    assert (
        "images" not in post(http, "w", prompts=[RED_SANDAL], set_id="rt2").json()
    )  # inline only when asked


@pytest.mark.ray
def test_determinism_and_batching(service, http):
    from ray import serve

    def get(seed, sid):
        r = post(
            http,
            "w",
            prompts=[RED_SANDAL],
            images_per_prompt=2,
            seed=seed,
            set_id=sid,
            return_images=True,
        )
        assert r.status_code == 200, r.text
        return r.json()["images"]

    with cf.ThreadPoolExecutor(4) as ex:  # concurrent clients: merged by @serve.batch
        a, b, c, _ = ex.map(
            lambda x: get(*x), [(7, "det-a"), (7, "det-b"), (8, "det-c"), (9, "det-d")]
        )
    assert a == b and a != c
    sizes = serve.get_deployment_handle("Generator", app_name="w").batch_sizes.remote().result()
    assert max(sizes) > 1, sizes


@pytest.mark.ray
def test_idempotent_and_conflict(service, http):
    from audit.store import RunStore

    store = RunStore(service["stores"]["w"])
    req = {"prompts": [BLUE_BAG], "images_per_prompt": 2, "seed": 3, "set_id": "idem"}
    first = post(http, "w", **req)
    path = store.path("synthetic/idem/part-00000.parquet")
    mtime = os.stat(path).st_mtime_ns
    again = post(http, "w", **req)
    assert (
        again.status_code == 200
        and again.json()["cached"]
        and again.json()["image_ids"] == first.json()["image_ids"]
    )
    assert os.stat(path).st_mtime_ns == mtime  # not generated or written twice
    conflict = post(http, "w", **{**req, "seed": 4})
    assert conflict.status_code == 409 and "idem" in conflict.json()["detail"]
    # Without a set id, the id is the request's hash: asking twice is also idempotent.
    x, y = (post(http, "w", prompts=[RED_SANDAL], seed=99).json() for _ in range(2))
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
    r = post(http, "w", **body)
    assert r.status_code == 422, r.text
    assert bound in str(r.json()["detail"])


@pytest.mark.ray
def test_auth(service, http):
    assert post(http, "w", auth=False, prompts=[RED_SANDAL]).status_code == 401
    bad = http.post(
        "/w/v1/generate", json={"prompts": [RED_SANDAL]}, headers={"Authorization": "Bearer nope"}
    )
    assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
    assert (
        http.post("/w/v1/generate", content=b"not json").status_code == 401
    )  # auth before parsing
    assert http.get("/w/v1/sets/rt").status_code == 401
    assert http.get("/w/healthz").json()["auth"] is True
    assert http.get("/n/healthz").json()["auth"] is False


@pytest.mark.ray
def test_path_traversal_rejected(service, http):
    for sid in ["../escape", "/etc", "a/../../b", ".hidden", "..", "a\\b"]:
        r = post(http, "w", prompts=[RED_SANDAL], set_id=sid)
        assert r.status_code == 422 and "set_id" in str(r.json()["detail"]), (sid, r.text)
    for path in [
        "/w/v1/sets/..%2F..%2Fetc",
        "/w/v1/sets/%2E%2E",
        "/w/v1/sets/.hidden",
        "/w/v1/sets/..%2Fn/images/0.png",
    ]:
        assert http.get(path, headers=AUTH).status_code in (404, 422), path
    root = os.path.dirname(service["stores"]["w"])
    assert not any(n in os.listdir(root) for n in ("escape", "b", "etc"))


@pytest.mark.ray
def test_backend_error_is_500_and_leaves_no_set(service, http):
    from audit.store import RunStore

    store = RunStore(service["stores"]["n"])
    r = post(http, "n", prompts=["fine", "boom here"], images_per_prompt=2, set_id="broken")
    assert r.status_code == 500, r.text
    eid = r.json()["error_id"]
    assert eid in r.json()["detail"] and not store.exists("synthetic/broken")
    assert any(eid in reason for reason in store.errors()["reason"].to_pylist())
    assert http.get("/n/v1/sets/broken").status_code == 404
    ok = post(http, "n", prompts=["fine"], set_id="broken")  # the id is still free
    assert ok.status_code == 200 and store.exists("synthetic/broken/part-00000.parquet")


@pytest.mark.ray
def test_overload_is_503_with_retry_after(service, http):
    """1 request in flight + 1 queued per generator replica; the rest get 503 at once."""
    import httpx

    from audit.store import RunStore

    def one(i):
        with httpx.Client(base_url=service["url"], timeout=60) as c:
            return i, c.post(
                "/n/v1/generate",
                json={"prompts": ["load"], "seed": 1000 + i, "set_id": f"load-{i}"},
            )

    with cf.ThreadPoolExecutor(8) as ex:
        res = list(ex.map(one, range(8)))
    codes = [r.status_code for _, r in res]
    assert set(codes) <= {200, 503} and codes.count(503) >= 4 and codes.count(200) >= 1, codes
    assert all(r.headers.get("retry-after") == "2" for _, r in res if r.status_code == 503)
    store = RunStore(service["stores"]["n"])
    stored = {n for n in store.listdir("synthetic") if n.startswith("load-")}
    assert stored == {f"load-{i}" for i, r in res if r.status_code == 200}


@pytest.mark.ray
def test_handle_door_is_trusted_and_shares_the_set_logic(service, http):
    """``make_set`` through the app's handle (the run's path): no token and no request limits,
    but the same dedupe by set id, conflicts, prompt checks and error ids as HTTP."""
    from ray import serve

    from audit.store import RunStore

    w = serve.get_app_handle("w")
    # beyond the HTTP door's limits of /w (4 prompts, 12 images), and without its token
    req = {"prompts": [RED_SANDAL] * 5 + [BLUE_BAG], "images_per_prompt": 5, "seed": 3}
    first = w.make_set.remote({**req, "set_id": "handle-big"}).result()
    assert "error" not in first, first
    assert first["n_images"] == 30 and not first["cached"] and first["generator"] == "world"
    assert w.make_set.remote({**req, "set_id": "handle-big"}).result()["cached"]
    assert http.get("/w/v1/sets/handle-big", headers=AUTH).json()["n_images"] == 30
    assert w.make_set.remote({**req, "seed": 4, "set_id": "handle-big"}).result()["status"] == 409
    bad = w.make_set.remote({"prompts": ["a photo of a unicorn"]}).result()
    assert bad["status"] == 422 and "unicorn" in bad["error"]
    assert w.make_set.remote({"prompts": [RED_SANDAL], "set_id": "../x"}).result()["status"] == 422
    boom = serve.get_app_handle("n").make_set.remote({"prompts": ["boom"], "set_id": "h"}).result()
    assert boom["status"] == 500 and boom["error_id"] in boom["error"]
    assert not RunStore(service["stores"]["n"]).exists("synthetic/h")


@pytest.mark.ray
def test_client_request_set(service, http):
    from serve.client import GenerationClient, ServiceError

    with GenerationClient(f"{service['url']}/w", token=TOKEN, timeout=60) as c:
        s = c.request_set([RED_SANDAL, BLUE_BAG], k=3, seed=2)
        assert s.images.shape == (6, 32, 32, 3) and s.prompts[3] == BLUE_BAG and not s.cached
        assert c.request_set([RED_SANDAL, BLUE_BAG], k=3, seed=2).cached
        img = http.get(f"/w/v1/sets/{s.set_id}/images/5.png", headers=AUTH)
        np.testing.assert_array_equal(png_array(img.content), s.images[5])
        with pytest.raises(ServiceError, match="limits.max_prompts"):
            c.request_set([RED_SANDAL] * 5, k=1)
    with (
        GenerationClient(f"{service['url']}/w", token="wrong", timeout=5) as c,
        pytest.raises(ServiceError, match="401"),
    ):
        c.request_set([RED_SANDAL])


@pytest.fixture(scope="module")
def sd_app(service, tiny_sd):
    """A third app, ``/d``: the tiny pipeline through the generic ``diffusers:DIR`` path."""
    from ray import serve

    from serve.app import build_app

    cfg = ServeAppConfig(
        backend=f"diffusers:{tiny_sd}",
        backend_options={"steps": 2, "num_threads": 1},
        store=str(service["root"] / "d"),
        generator={"num_cpus": 0.25},
    )
    serve.run(build_app(cfg), name="d", route_prefix="/d")
    return cfg


@pytest.mark.ray
@pytest.mark.slow  # a third replica importing diffusers: ~15 s on 2 busy cores; the backend is tested directly above
def test_diffusers_over_http(sd_app, http, tiny_sd, one_thread):
    body = {
        "prompts": ["a red sandal", "a bag"],
        "images_per_prompt": 2,
        "seed": 1,
        "size": 32,
        "return_images": True,
    }
    r = http.post("/d/v1/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (
        out["generator"] == f"diffusers:{tiny_sd}"
        and out["request"]["steps"] == 2
        and out["n_images"] == 4
    )
    imgs = np.stack([png_array(base64.b64decode(b)) for b in out["images"]])
    direct = create_backend(f"diffusers:{tiny_sd}", steps=2, num_threads=one_thread).generate(
        ["a bag"], [image_seed(1, 1)], 2, 7.5, (32, 32)
    )
    np.testing.assert_array_equal(imgs[3], direct[0])  # same image as the backend called directly
    again = http.post("/d/v1/generate", json={**body, "set_id": "sd-again"}).json()
    assert again["images"] == out["images"]
