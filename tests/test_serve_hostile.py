"""The generation service under hostile and careless input (issue 11), over real HTTP on
127.0.0.1: two ingress replicas over one store, bodies, corrupt sets, quotas, a failing
store and a generator lost mid-request."""

from __future__ import annotations

import concurrent.futures as cf
import os
import socket
import subprocess
import sys
import time

import pytest
from serve_helpers import (
    AUTH,
    BLUE_BAG,
    RED_SANDAL,
    post,
)

from serve.config import ServeAppConfig

pytest_plugins = ["serve_fixtures"]  # service, http, tiny_sd, one_thread


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
    head = "POST /n/v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 300000000\r\n"
    assert " 413" in _raw(port, head, b'{"prompts": [')
    # a chunked body with no length: refused once 64 KiB + 1 have streamed in, the rest never sent
    head = "POST /n/v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    chunk = b"x" * (100 * 1024)
    assert " 413" in _raw(port, head, f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")


@pytest.mark.ray
def test_deleted_or_corrupt_set_is_404_or_500_with_an_error_id(service, http):
    """Issue 11 #10: a deleted set kept answering 200 from the cache; a corrupt one was a bare 500."""
    from audit.store import RunStore

    store = RunStore(service["stores"]["w"])
    for sid in ("gone", "bad"):
        assert post(http, "w", prompts=[BLUE_BAG], seed=11, set_id=sid).status_code == 200
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
        post(http, "w", prompts=[BLUE_BAG], seed=11, set_id="bad"),
    ):
        assert r.status_code == 500 and r.json()["error_id"] in r.json()["detail"], r.text
        assert any(r.json()["error_id"] in x for x in store.errors()["reason"].to_pylist())


@pytest.mark.ray
def test_duplicate_prompts_over_http_distinct_images_and_counts(service, http):
    """Issue 11 #10: duplicate prompts gave 2 distinct images of 4; fresh counts were wrong."""
    r = post(
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
    r = post(
        http, "x", auth=False, prompts=["a vanish prompt"], images_per_prompt=1, set_id="lost-1"
    )
    assert r.status_code == 503 and r.headers.get("retry-after") == "1", r.text
    assert "generator was lost" in r.json()["detail"] and r.json()["error_id"]
    assert not os.path.exists(
        os.path.join(service["stores"]["x"], "synthetic", "lost-1", "part-00000.parquet")
    )
    deadline = time.time() + 90
    while True:  # the replacement replica serves the same id with another request
        ok = post(
            http, "x", auth=False, prompts=["a fine prompt"], images_per_prompt=1, set_id="lost-1"
        )
        if ok.status_code == 200 or time.time() > deadline:
            break
        time.sleep(1)
    assert ok.status_code == 200, ok.text


# -- claims whose holder is gone (issue 20 #3; no Ray) --------------------------------------
_CLAIM = (
    "import sys, time; from audit.store import RunStore; "
    "from audit.synthetic.claims import claim_set; "
    "assert claim_set(RunStore(sys.argv[1]), 'set-a', 'h1', 900) is None; "
    "print('claimed', flush=True); time.sleep(60)"
)


def _claimed_by_a_process(root) -> subprocess.Popen:
    """A process that claims ``set-a`` (for request ``h1``) and holds it until it is killed,
    as an ingress replica generating the set does."""
    p = subprocess.Popen(
        [sys.executable, "-c", _CLAIM, str(root)], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "claimed"
    return p


def test_a_claim_whose_holder_was_killed_is_released_at_once(tmp_path):
    """An ingress killed mid-generation left its claim: the same request hung and another got
    409 for the claim's 15 minutes. The holder is checked: alive, the claim stands; gone, the
    claim is taken over at once, by this or a different request."""
    from audit.store import RunStore
    from audit.synthetic.claims import claim_set

    store = RunStore(str(tmp_path / "s"))
    p = _claimed_by_a_process(tmp_path / "s")
    try:
        held = claim_set(store, "set-a", "h2", 900)
        assert held is not None and held["pid"] == p.pid and held["request_hash"] == "h1"
    finally:
        p.kill()
        p.wait()
    assert claim_set(store, "set-a", "h2", 900) is None  # a different request: no 409
    assert claim_set(store, "set-a", "h2", 900)["pid"] == os.getpid()  # and now ours holds


def test_a_claim_of_a_reused_process_id_is_released(tmp_path):
    """The holder's process id now belongs to another process (another start time)."""
    import json

    from audit.store import RunStore
    from audit.synthetic.claims import claim_path, claim_set, process_start

    store = RunStore(str(tmp_path / "s"))
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid())}
    old = {"request_hash": "h1", "time": time.time(), "owner": "x", **me}
    old["start"] -= 1
    store.write_bytes(claim_path("set-a"), json.dumps(old).encode())
    assert claim_set(store, "set-a", "h1", 900) is None
    other_host = {**old, "host": "elsewhere", "start": 1}
    store.write_bytes(claim_path("set-b"), json.dumps(other_host).encode())
    assert claim_set(store, "set-b", "h1", 900)["host"] == "elsewhere"  # judged by its age only
