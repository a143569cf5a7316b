"""Fixtures shared by the generation service's tests: one embedded Serve per test module on a
free loopback port, hosting small apps side by side: ``/w`` the world backend with a bearer
token and tight limits, ``/n`` the null backend with a slow, tiny queue and an injected
failure, ``/x`` a null backend whose process ends on a prompt (a lost node). Also the tiny
random Stable Diffusion pipeline (:mod:`tiny_sd`). A test module loads them with
``pytest_plugins = ["serve_fixtures"]``."""

from __future__ import annotations

import pytest
from serve_helpers import TOKEN

from serve.config import ServeAppConfig


@pytest.fixture
def one_thread():
    """Tiny CPU models on a shared 2-core box run far faster on one intra-op thread."""
    import torch

    n = torch.get_num_threads()
    yield 1
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> str:
    from tiny_sd import build_tiny_sd_pipeline

    return build_tiny_sd_pipeline(str(tmp_path_factory.mktemp("tiny_sd") / "pipe"))


def service_apps(root, token_file) -> dict[str, ServeAppConfig]:
    """The apps ``service`` hosts, by route prefix."""
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
    return {
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


@pytest.fixture(scope="module")
def service(tmp_path_factory, ray_session):
    from ray import serve

    from serve.app import build_app
    from serve.main import free_port

    root = tmp_path_factory.mktemp("serve")
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    apps = service_apps(root, token_file)
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
