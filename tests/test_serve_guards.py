"""The ingress's guards on who is asking (issue 20, round 3), through its FastAPI app in this
process with starlette's TestClient (no Ray): every loopback address is one client for the
quota, and with auth off a request must name a local Host (DNS rebinding)."""

from __future__ import annotations

import hashlib
import os

import pytest
from pydantic import ValidationError
from serve_helpers import AUTH, TOKEN

from serve.config import ServeAppConfig, load_config


class _Remote:
    """A deployment method as a handle shows it: ``.remote(...)`` gives an awaitable."""

    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        async def call():
            return self.fn(*args)

        return call()


class _Generator:
    """The generator's handle, in this process: the null backend's 8x8 images."""

    def __init__(self):
        from audit.synthetic.sets import png_bytes
        from serve.backends import NullBackend

        b = NullBackend(size=8)
        self.info = _Remote(lambda: {**b.info(), "max_batch_images": 64})
        self.generate = _Remote(
            lambda j: {
                "png": [
                    png_bytes(x)
                    for x in b.generate(
                        j["prompts"], j["seeds"], j["steps"], j["guidance"], j["size"]
                    )
                ]
            }
        )


@pytest.fixture
def ingress(tmp_path, monkeypatch):
    """``ingress(token=None, **config)`` -> ``client(address="127.0.0.1", url=...)``: a
    TestClient factory over one Ingress (its own store), the peer ``address`` as the client."""
    import ray.serve
    from starlette.testclient import TestClient

    from serve.app import Ingress, api

    def make(token: str | None = None, **config):
        cfg = ServeAppConfig(backend="null", store=str(tmp_path / "store"), **config)
        sha = hashlib.sha256(token.encode()).hexdigest() if token else None
        # the class under @serve.ingress's wrapper; its routes find it through the replica context
        ing = Ingress.func_or_class.__mro__[1](_Generator(), cfg.model_dump(), sha, True)
        ctx = type("Ctx", (), {"servable_object": ing})
        monkeypatch.setattr(ray.serve, "get_replica_context", lambda: ctx)

        def client(address: str = "127.0.0.1", url: str = "http://127.0.0.1:8000"):
            return TestClient(api, base_url=url, client=(address, 40000))

        return client

    return make


def _four(c, set_id: str, **kw):
    body = {"prompts": ["p"], "images_per_prompt": 4, "set_id": set_id}
    return c.post("/v1/generate", json=body, **kw)


def test_every_loopback_address_is_one_client_for_the_quota(ingress):
    """Any local process dodged the quota from another 127.x address (or ::1)."""
    client = ingress(limits={"client_pixels_per_minute": 6 * 64})  # 6 images of 8x8
    assert _four(client("127.0.0.1"), "a").status_code == 200
    for i, addr in enumerate(("127.0.0.2", "127.255.0.9", "::1", "::ffff:127.0.0.3")):
        r = _four(client(addr), f"b{i}")
        assert r.status_code == 429 and "client_pixels_per_minute" in r.json()["detail"], (
            addr,
            r.text,
        )
    assert _four(client("10.0.0.5"), "c").status_code == 200  # another machine: its own quota
    r = _four(client("::ffff:10.0.0.5"), "d")  # the same machine, IPv4-mapped
    assert r.status_code == 429, r.text


FOREIGN = ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io:8000",
           "localhost:8000@evil.example", "[::1", "", "10.9.9.9:8000"]  # fmt: skip


def _refused(r, host: str) -> None:
    assert r.status_code == 403, (host, r.status_code, r.text)
    detail = r.json()["detail"]
    assert repr(host) in detail and "allowed_hosts" in detail and "\n" not in detail, detail


def test_auth_off_answers_only_a_local_host(ingress, tmp_path):
    """With auth off a DNS-rebinding page (Host: its own name, resolving to 127.0.0.1) could
    post JSON to the service and read its sets."""
    c = ingress()()
    for host in FOREIGN:
        _refused(_four(c, "x", headers={"host": host}), host)
        for path in ("/healthz", "/v1/sets/x", "/v1/sets/x/images/0.png"):
            _refused(c.get(path, headers={"host": host}), host)
    assert not os.path.exists(tmp_path / "store" / "synthetic" / "x")
    for i, host in enumerate(("localhost", "LocalHost:8000", "127.0.0.1:1", "[::1]:8000", "[::1]")):
        assert _four(c, f"ok{i}", headers={"host": host}).status_code == 200, host
    # the address the service was reached at (bound to it, or to 0.0.0.0), by that address
    lan = ingress()(address="10.0.0.5", url="http://10.0.0.4:8000")
    assert lan.get("/healthz").status_code == 200
    _refused(lan.get("/healthz", headers={"host": "10.0.0.6:8000"}), "10.0.0.6:8000")


def test_allowed_hosts_adds_names_and_with_a_token_turns_the_check_on(ingress):
    c = ingress(allowed_hosts=["gpu-box.lan", "[fd00::7]"])()
    for host in ("gpu-box.lan", "GPU-box.lan:8000", "[fd00::7]:80", "localhost:8000"):
        assert c.get("/healthz", headers={"host": host}).status_code == 200, host
    _refused(c.get("/healthz", headers={"host": "other.lan"}), "other.lan")
    # a token without allowed_hosts: the token guards, any Host (a reverse proxy's name) passes
    c = ingress(token=TOKEN)()
    assert _four(c, "t", headers={**AUTH, "host": "zoo.example.org"}).status_code == 200
    assert _four(c, "t", headers={"host": "localhost"}).status_code == 401
    # a token and allowed_hosts: both apply
    c = ingress(token=TOKEN, allowed_hosts=["gpu-box.lan"])()
    _refused(_four(c, "u", headers={**AUTH, "host": "zoo.example.org"}), "zoo.example.org")
    assert _four(c, "u", headers={**AUTH, "host": "gpu-box.lan:8000"}).status_code == 200


def test_allowed_hosts_is_validated():
    cfg = ServeAppConfig(allowed_hosts=["Gpu-Box.LAN", "[::1]", "10.0.0.4", "FD00:0::7"])
    assert cfg.allowed_hosts == ["gpu-box.lan", "::1", "10.0.0.4", "fd00::7"]
    assert load_config({"allowed_hosts": "a.lan, b.lan"}).allowed_hosts == ["a.lan", "b.lan"]
    for bad in ("http://gpu-box.lan", "gpu-box.lan:8000", "*", "a b", "", "x/y", "-a.lan"):
        with pytest.raises(ValidationError, match="allowed_hosts") as e:
            ServeAppConfig(allowed_hosts=[bad])
        assert "without scheme, port or path" in str(e.value), bad
