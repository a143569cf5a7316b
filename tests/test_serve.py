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
import time

import numpy as np
import pytest

from audit.synthetic.sets import check_set_id, image_seed, request_seeds
from serve.backends import WorldBackend, create_backend, list_backends
from serve.config import GenerateRequest, Limits, ServeAppConfig, load_config

TOKEN = "s3cret-token"
RED_SANDAL = "a photo of a red sandal on grass"
BLUE_BAG = "a photo of a blue bag on moon"


def _png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# -- pure parts (no Ray) ---------------------------------------------------------------
def test_registry_and_config_errors():
    assert {"world", "null", "diffusers"} <= set(list_backends())
    assert "retrieval" not in list_backends()  # the audit's own generator, not a Serve backend
    with pytest.raises(ValueError, match="did you mean"):
        create_backend("wrld")
    for bad in ["../x", "/abs", "a/b", ".hidden", "", "a..b", "x" * 200]:
        with pytest.raises(ValueError, match="set_id"):
            check_set_id(bad)
    assert check_set_id("family-resnet_v1.2") == "family-resnet_v1.2"
    cfg = load_config({"backend": "null", "generator.num_gpus": "1", "limits.max_steps": "7"})
    assert cfg.generator.num_gpus == 1.0 and cfg.limits.max_steps == 7
    assert cfg.generator.deployment_options(1.0)["num_replicas"] == 1
    auto = load_config(
        {"generator": {"min_replicas": 1, "max_replicas": 4}}
    ).generator.deployment_options(1.0)
    assert auto["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in auto
    with pytest.raises(ValueError, match="limits.max_images_per_prompt=2"):
        GenerateRequest(prompts=["a"], images_per_prompt=3).check_limits(
            Limits(max_images_per_prompt=2)
        )


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
    from tiny_sd import build_tiny_sd_pipeline

    return build_tiny_sd_pipeline(str(tmp_path_factory.mktemp("tiny_sd") / "pipe"))


@pytest.fixture(scope="module")
def service(tmp_path_factory, ray_session):
    from ray import serve

    from serve.app import build_app
    from serve.main import free_port

    root = tmp_path_factory.mktemp("serve")
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    limits = {
        "max_prompts": 4,
        "max_prompt_chars": 80,
        "max_images_per_prompt": 4,
        "max_images": 12,
        "max_steps": 10,
        "max_size": 64,
        "max_guidance": 20,
    }
    small = {
        "num_cpus": 0.25,
        "max_batch_size": 4,
        "max_ongoing_requests": 4,
        "batch_wait_timeout_s": 0.05,
    }
    apps = {
        "w": ServeAppConfig(
            backend="world",
            store=str(root / "w"),
            token_file=str(token_file),
            limits=limits,
            generator=small,
        ),
        "n": ServeAppConfig(
            backend="null",
            backend_options={"delay_s": 0.6, "fail_prompt": "boom"},
            store=str(root / "n"),
            generator={
                "num_cpus": 0.25,
                "max_batch_size": 1,
                "max_ongoing_requests": 1,
                "max_queued_requests": 1,
            },
            retry_after_s=2,
        ),
        "x": ServeAppConfig(
            backend="null",
            backend_options={"exit_prompt": "vanish"},
            store=str(root / "x"),
            generator={"num_cpus": 0.25},
            retry_after_s=1,
        ),
    }
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run_many(
        [serve.RunTarget(build_app(c), name=n, route_prefix=f"/{n}") for n, c in apps.items()]
    )
    yield {
        "url": f"http://127.0.0.1:{port}",
        "stores": {n: c.store for n, c in apps.items()},
        "root": root,
    }
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

    r = _gen(
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
    imgs = np.stack([_png(base64.b64decode(b)) for b in body["images"]])
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
    np.testing.assert_array_equal(_png(t["png"][4].as_py()), imgs[4])

    meta = http.get("/w/v1/sets/rt", headers=AUTH).json()
    assert (
        meta["n_images"] == 6 and meta["n_prompts"] == 2 and {c["n"] for c in meta["counts"]} == {3}
    )
    img = http.get("/w/v1/sets/rt/images/4.png", headers=AUTH)
    assert img.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(_png(img.content), imgs[4])
    assert http.get("/w/v1/sets/rt/images/6.png", headers=AUTH).status_code == 404
    assert http.get("/w/v1/sets/nope", headers=AUTH).status_code == 404
    assert (
        "images" not in _gen(http, "w", prompts=[RED_SANDAL], set_id="rt2").json()
    )  # inline only when asked


@pytest.mark.ray
def test_determinism_and_batching(service, http):
    from ray import serve

    def get(seed, sid):
        r = _gen(
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
    first = _gen(http, "w", **req)
    path = store.path("synthetic/idem/part-00000.parquet")
    mtime = os.stat(path).st_mtime_ns
    again = _gen(http, "w", **req)
    assert (
        again.status_code == 200
        and again.json()["cached"]
        and again.json()["image_ids"] == first.json()["image_ids"]
    )
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
        r = _gen(http, "w", prompts=[RED_SANDAL], set_id=sid)
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
    imgs = np.stack([_png(base64.b64decode(b)) for b in out["images"]])
    direct = create_backend(f"diffusers:{tiny_sd}", steps=2, num_threads=one_thread).generate(
        ["a bag"], [image_seed(1, 1)], 2, 7.5, (32, 32)
    )
    np.testing.assert_array_equal(imgs[3], direct[0])  # same image as the backend called directly
    again = http.post("/d/v1/generate", json={**body, "set_id": "sd-again"}).json()
    assert again["images"] == out["images"]


@pytest.mark.ray
def test_client_request_set(service, http):
    from serve.client import GenerationClient, ServiceError

    with GenerationClient(f"{service['url']}/w", token=TOKEN, timeout=60) as c:
        s = c.request_set([RED_SANDAL, BLUE_BAG], k=3, seed=2)
        assert s.images.shape == (6, 32, 32, 3) and s.prompts[3] == BLUE_BAG and not s.cached
        assert c.request_set([RED_SANDAL, BLUE_BAG], k=3, seed=2).cached
        img = http.get(f"/w/v1/sets/{s.set_id}/images/5.png", headers=AUTH)
        np.testing.assert_array_equal(_png(img.content), s.images[5])
        with pytest.raises(ServiceError, match="limits.max_prompts"):
            c.request_set([RED_SANDAL] * 5, k=1)
    with (
        GenerationClient(f"{service['url']}/w", token="wrong", timeout=5) as c,
        pytest.raises(ServiceError, match="401"),
    ):
        c.request_set([RED_SANDAL])


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


@pytest.mark.gpu
def test_diffusers_fp16_on_cuda(tiny_sd):
    """On a CUDA device: fp16 with attention slicing; a batched call gives the images of one
    call per prompt (within fp16 noise); the timings of both are printed (run with -s)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    b = create_backend(f"diffusers:{tiny_sd}", steps=10)
    assert b.device == "cuda" and b.dtype == torch.float16
    prompts = [f"a photo of a red sandal on grass {i}" for i in range(8)]
    seeds, size = list(range(8)), tuple(b.defaults()["size"])
    b.generate(prompts[:2], seeds[:2], 10, 7.5, size)  # warm-up
    direct, batched = [], []
    for _ in range(3):
        t = time.perf_counter()
        one = [b.generate([p], [s], 10, 7.5, size)[0] for p, s in zip(prompts, seeds, strict=True)]
        direct.append(time.perf_counter() - t)
        t = time.perf_counter()
        many = b.generate(prompts, seeds, 10, 7.5, size)
        batched.append(time.perf_counter() - t)
    diff = max(
        int(np.abs(m.astype(int) - o.astype(int)).max()) for m, o in zip(many, one, strict=True)
    )
    print(
        f"\ndiffusers fp16 on {torch.cuda.get_device_name(0)}: {len(prompts)} prompts at {size[0]}px, "
        f"10 steps: one call per prompt {min(direct):.3f}s, batched {min(batched):.3f}s "
        f"(ratio {min(direct) / min(batched):.2f}x); max abs diff {diff}"
    )
    assert many.shape == (8, *size, 3) and diff <= 8


# -- hostile and careless input (issue 11) -----------------------------------------------
def test_default_limits_are_lower_and_count_pixels():
    """Issue 11 #6: 16 x 16 images at 1024 px were allowed by default (28 s CPU, ~3 GB RSS)."""
    from serve.config import check_pixels

    lim = Limits()
    with pytest.raises(ValueError, match="limits.max_images=64"):
        GenerateRequest(prompts=["a"] * 16, images_per_prompt=16, size=1024).check_limits(lim)
    req = GenerateRequest(prompts=["a"] * 8, images_per_prompt=8, size=1024)
    req.check_limits(lim)
    with pytest.raises(ValueError, match="limits.max_pixels"):
        check_pixels(req.resolved({"steps": 1, "guidance": 0.0, "size": [32, 32]}), lim)
    check_pixels(
        GenerateRequest(prompts=["a"] * 16, size=1024).resolved(
            {"steps": 1, "guidance": 0, "size": 8}
        ),
        lim,
    )
    assert lim.max_body_bytes <= 64 * 1024 and lim.client_pixels_per_minute > 0


def test_duplicate_prompts_get_distinct_seeds():
    """Issue 11 #10: a prompt given twice in one request reused its seeds (2 distinct images of 4)."""
    prompts = [RED_SANDAL, BLUE_BAG, RED_SANDAL]
    seeds = request_seeds(prompts, 2, 5)
    pairs = list(zip([p for p in prompts for _ in range(2)], seeds, strict=True))
    assert len(set(pairs)) == 6  # an image is (prompt, seed): all distinct
    # a prompt's first images keep the seeds they always had (stored sets stay reproducible)
    assert seeds[:4] == [image_seed(5, 0), image_seed(5, 1), image_seed(5, 0), image_seed(5, 1)]


def test_token_file_readable_by_others_warns_and_auth_off_is_loud(tmp_path, caplog):
    """Issue 11 #6 and #10: auth off was quiet; a world-readable token file went unnoticed."""
    from serve.main import startup_lines

    tok = tmp_path / "token"
    tok.write_text(TOKEN)
    tok.chmod(0o644)
    with caplog.at_level("WARNING", logger="zoo_audit.serve"):
        ServeAppConfig(token_file=str(tok)).resolve_token_hash()
    assert "chmod 600" in caplog.text and "644" in caplog.text
    caplog.clear()
    tok.chmod(0o600)
    with caplog.at_level("WARNING", logger="zoo_audit.serve"):
        ServeAppConfig(token_file=str(tok)).resolve_token_hash()
    assert caplog.text == ""
    off = startup_lines(
        ServeAppConfig(token_env="ZOO_AUDIT_NO_SUCH_TOKEN_VAR", store=str(tmp_path / "s")), 8000
    )
    assert off[0].startswith("WARNING: auth is OFF") and "auth OFF" in off[1]
    on = startup_lines(ServeAppConfig(token_file=str(tok), store=str(tmp_path / "s")), 8000)
    assert not any("WARNING" in line for line in on)


def test_store_failure_in_write_set_leaves_nothing_and_the_claim_is_released(tmp_path):
    """Issue 11 #3 and #5 without Ray: the claim is exclusive, released after a failure (the
    id is free again), and a write that dies leaves no temporary and no set."""
    from audit.store import RunStore
    from audit.synthetic.claims import claim_set, release_claim
    from audit.synthetic.sets import SetUnreadable, read_set_meta, write_set

    store = RunStore(tmp_path / "run")
    assert claim_set(store, "s", "hash-a", 60) is None
    held = claim_set(store, "s", "hash-b", 60)
    assert held is not None and held["request_hash"] == "hash-a"
    req = {
        "prompts": ["p"],
        "images_per_prompt": 1,
        "seed": 0,
        "steps": 1,
        "guidance": 0.0,
        "size": [8, 8],
    }

    class Full:
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def open_output_stream(self, path):
            raise OSError(28, "No space left on device")

    real = store.fs
    store.fs = Full(real)
    with pytest.raises(OSError, match="No space"):
        write_set(store, "s", req, "hash-a", "null", [1], [b"png"])
    store.fs = real
    release_claim(store, "s")
    assert not store.exists("synthetic/s")  # no temporary, no claim, no set: the id is free
    assert claim_set(store, "s", "hash-b", 60) is None  # and can be claimed again
    assert claim_set(store, "s", "hash-c", 0) is None  # a stale claim (holder dead) is taken over
    assert write_set(store, "s", req, "hash-c", "null", [1], [b"png"])["counts"] == [
        {"prompt": "p", "n": 1}
    ]
    assert write_set(store, "s", req, "hash-c", "null", [1], [b"png"]) is None  # never overwritten
    store.write_bytes("synthetic/s/part-00000.parquet", b"garbage")
    with pytest.raises(SetUnreadable, match="cannot be read"):
        read_set_meta(store, "s")


@pytest.fixture(scope="module")
def replicas_app(service):
    """``/r``: two ingress replicas over one store (the null backend, slow enough to overlap)."""
    from ray import serve

    from serve.app import build_app

    cfg = ServeAppConfig(
        backend="null",
        backend_options={"delay_s": 0.3},
        store=str(service["root"] / "r"),
        ingress={"num_replicas": 2, "num_cpus": 0.25},
        generator={
            "num_cpus": 0.25,
            "max_batch_size": 16,
            "max_ongoing_requests": 32,
            "max_queued_requests": 64,
        },
    )
    serve.run(build_app(cfg), name="r", route_prefix="/r")
    return cfg


@pytest.mark.ray
def test_two_ingress_replicas_keep_one_set_per_id(service, replicas_app):
    """Issue 11 #3: with two ingress replicas, 19 of 20 conflicting pairs both got 200 and an
    acknowledged set was overwritten; identical requests were generated twice."""
    import httpx

    from audit.store import RunStore
    from audit.synthetic.sets import read_set_meta

    def post(body):
        with httpx.Client(
            base_url=service["url"], timeout=60
        ) as c:  # one connection each: spread over replicas
            return c.post("/r/v1/generate", json=body)

    conflicting = [
        {"prompts": ["x"], "seed": s, "set_id": f"pair-{i}"} for i in range(10) for s in (1, 2)
    ]
    identical = [
        {"prompts": ["y"], "seed": 7, "set_id": f"same-{i}"} for i in range(5) for _ in range(2)
    ]
    with cf.ThreadPoolExecutor(30) as ex:
        res = list(ex.map(post, conflicting + identical))
    store = RunStore(str(service["root"] / "r"))
    for i in range(10):
        a, b = res[2 * i], res[2 * i + 1]
        assert sorted([a.status_code, b.status_code]) == [200, 409], (i, a.text, b.text)
        winner = a if a.status_code == 200 else b
        # the acknowledged set is the one stored (never overwritten by the loser)
        assert (
            read_set_meta(store, f"pair-{i}")["request"]["seed"] == winner.json()["request"]["seed"]
        )
    for i in range(5):
        a, b = res[20 + 2 * i], res[21 + 2 * i]
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        assert sorted([a.json()["cached"], b.json()["cached"]]) == [False, True]  # generated once
    assert not [
        f for d, _, fs in os.walk(service["root"] / "r") for f in fs if f.startswith(".")
    ]  # no claims, temps


def _raw(port: int, head: str, body: bytes, timeout: float = 15) -> str:
    """Send a request by hand (headers that httpx would correct); the status line, or '' on timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.encode() + b"\r\n" + body)
        try:
            return s.recv(4096).decode(errors="replace").split("\r\n")[0]
        except TimeoutError:
            return ""


@pytest.mark.ray
def test_body_is_limited_while_streaming_and_only_json_is_accepted(service, http):
    """Issue 11 #6: a 300 MB body was read whole before the size check; a cross-site
    ``text/plain`` POST stored a set."""
    from audit.store import RunStore

    body = b'{"prompts": ["x"], "set_id": "xsite"}'
    for app, headers in (("n", {}), ("w", AUTH)):
        r = http.post(
            f"/{app}/v1/generate", content=body, headers={**headers, "content-type": "text/plain"}
        )
        assert r.status_code == 415 and "application/json" in r.json()["detail"]
        assert not RunStore(service["stores"][app]).exists("synthetic/xsite")
    port = int(service["url"].rsplit(":", 1)[1])
    # a declared 300 MB body: refused from the header, without waiting for (or reading) it
    head = "POST /n/v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 300000000\r\n"
    assert " 413" in _raw(port, head, b'{"prompts": [')
    # a chunked body with no length: refused once 64 KiB + 1 have streamed in, the rest never sent
    head = "POST /n/v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    chunk = b"x" * (100 * 1024)
    assert " 413" in _raw(port, head, f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")


@pytest.mark.ray
def test_deleted_or_corrupt_set_is_404_or_500_with_an_error_id(service, http):
    """Issue 11 #10: a deleted set kept answering 200 from the cache; a corrupt one was a bare 500."""
    from audit.store import RunStore

    store = RunStore(service["stores"]["w"])
    for sid in ("gone", "bad"):
        assert _gen(http, "w", prompts=[BLUE_BAG], seed=11, set_id=sid).status_code == 200
        assert (
            http.get(f"/w/v1/sets/{sid}", headers=AUTH).status_code == 200
        )  # now in the replica's cache
    os.remove(store.path("synthetic/gone/part-00000.parquet"))
    assert http.get("/w/v1/sets/gone", headers=AUTH).status_code == 404
    assert http.get("/w/v1/sets/gone/images/0.png", headers=AUTH).status_code == 404
    with open(store.path("synthetic/bad/part-00000.parquet"), "wb") as f:
        f.write(b"PAR1 this is not parquet at all PAR1")
    for r in (
        http.get("/w/v1/sets/bad", headers=AUTH),
        http.get("/w/v1/sets/bad/images/0.png", headers=AUTH),
        _gen(http, "w", prompts=[BLUE_BAG], seed=11, set_id="bad"),
    ):
        assert r.status_code == 500 and r.json()["error_id"] in r.json()["detail"], r.text
        assert any(r.json()["error_id"] in x for x in store.errors()["reason"].to_pylist())


@pytest.mark.ray
def test_duplicate_prompts_over_http_distinct_images_and_counts(service, http):
    """Issue 11 #10: duplicate prompts gave 2 distinct images of 4; fresh counts were wrong."""
    r = _gen(
        http,
        "w",
        prompts=[RED_SANDAL, RED_SANDAL],
        images_per_prompt=2,
        seed=4,
        set_id="dups",
        return_images=True,
    )
    assert r.status_code == 200, r.text
    assert len(set(r.json()["images"])) == 4
    meta = http.get("/w/v1/sets/dups", headers=AUTH).json()
    assert meta["counts"] == [{"prompt": RED_SANDAL, "n": 4}] and meta["n_prompts"] == 1


@pytest.fixture(scope="module")
def quota_app(service):
    """``/q``: 8x8 null images, a quota of 6 images' pixels per minute, its own store."""
    from ray import serve

    from serve.app import build_app

    cfg = ServeAppConfig(
        backend="null",
        backend_options={"size": 8},
        store=str(service["root"] / "q"),
        limits={"client_pixels_per_minute": 6 * 64},
        generator={"num_cpus": 0.25},
    )
    serve.run(build_app(cfg), name="q", route_prefix="/q")
    return cfg


@pytest.mark.ray
def test_store_failure_is_500_with_error_id_healthz_says_so_and_it_recovers(
    service, http, quota_app
):
    """Issue 11 #5: a failing store gave a bare 500, left its temporary and /healthz said ok;
    /healthz also showed the store's absolute path (#10)."""
    root = service["root"]
    syn = root / "q" / "synthetic"
    h = http.get("/q/healthz")
    assert h.status_code == 200 and h.json()["store"] == "ok" and str(root) not in h.text
    syn.mkdir(parents=True, exist_ok=True)
    os.rename(syn, root / "q-aside")
    syn.write_bytes(
        b""
    )  # the store cannot create anything under synthetic/ (a full or broken disk)
    try:
        r = http.post("/q/v1/generate", json={"prompts": ["p"], "set_id": "full"})
        assert r.status_code == 500 and r.json()["error_id"] in r.json()["detail"], r.text
        h = http.get("/q/healthz")
        assert (
            h.status_code == 503
            and "store not writable" in h.json()["detail"]
            and str(root) not in h.text
        )
    finally:
        os.remove(syn)
        os.rename(root / "q-aside", syn)
    assert http.get("/q/healthz").status_code == 200
    r = http.post("/q/v1/generate", json={"prompts": ["p"], "set_id": "full"})
    assert r.status_code == 200, r.text
    assert not [f for d, _, fs in os.walk(root / "q") for f in fs if f.startswith(".")]


@pytest.mark.ray
def test_per_client_quota_is_429_with_retry_after(service, http, quota_app):
    a = http.post(
        "/q/v1/generate", json={"prompts": ["p"], "images_per_prompt": 4, "set_id": "quota-a"}
    )
    assert a.status_code == 200, a.text
    b = http.post(
        "/q/v1/generate", json={"prompts": ["p"], "images_per_prompt": 4, "set_id": "quota-b"}
    )
    assert (
        b.status_code == 429
        and "client_pixels_per_minute" in b.json()["detail"]
        and int(b.headers["retry-after"]) >= 1
    )
    again = http.post(
        "/q/v1/generate", json={"prompts": ["p"], "images_per_prompt": 4, "set_id": "quota-a"}
    )
    assert again.status_code == 200 and again.json()["cached"]  # a stored set costs no quota


@pytest.mark.ray
def test_generator_lost_mid_request_is_503_with_retry_after_and_nothing_stored(service, http):
    """The generator's process ends in the middle of a request (what losing its node does):
    503 with Retry-After and an error id, no set, the id free; Serve brings a replica back."""
    r = _gen(
        http, "x", auth=False, prompts=["a vanish prompt"], images_per_prompt=1, set_id="lost-1"
    )
    assert r.status_code == 503 and r.headers.get("retry-after") == "1", r.text
    assert "generator was lost" in r.json()["detail"] and r.json()["error_id"]
    assert not os.path.exists(
        os.path.join(service["stores"]["x"], "synthetic", "lost-1", "part-00000.parquet")
    )
    deadline = time.time() + 90
    while True:  # the replacement replica serves the same id with another request
        ok = _gen(
            http, "x", auth=False, prompts=["a fine prompt"], images_per_prompt=1, set_id="lost-1"
        )
        if ok.status_code == 200 or time.time() > deadline:
            break
        time.sleep(1)
    assert ok.status_code == 200, ok.text
