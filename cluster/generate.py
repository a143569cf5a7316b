"""Generation services for the generate stage: the Ray Serve app over HTTP, either a
running ``zoo-audit serve`` at a URL or the app started in-process for the run (its
store is the run directory, so the sets land in ``RUN/synthetic/``)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping

import pyarrow as pa

from audit.pipeline.generate import SETS_SCHEMA

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_sets(
    url: str,
    wanted: Mapping[str, list[str]],
    set_ids: Mapping[str, str],
    k: int | Mapping[str, int],
    seed: int,
    token: str | None = None,
) -> pa.Table:
    """Ask the service at ``url`` for one set per scope; rows of ``synthetic_sets.parquet``."""
    from serve.client import GenerationClient

    rows = []
    with GenerationClient(url, token=token) as client:
        for scope, caps in wanted.items():
            s = client.request_set(
                caps, k=k if isinstance(k, int) else k[scope], seed=seed, set_id=set_ids[scope]
            )
            rows.append(
                {
                    "scope": scope,
                    "set_id": s.set_id,
                    "captions": caps,
                    "n_images": len(s.image_ids),
                    "generator": s.generator,
                }
            )
    return pa.Table.from_pylist(rows, schema=SETS_SCHEMA)


class HttpSetGenerator:
    """A running generation service (``zoo-audit serve``); token from ``$ZOO_AUDIT_SERVE_TOKEN``."""

    def __init__(self, url: str):
        self.url = url

    def request_sets(self, wanted, set_ids, k, seed):
        return request_sets(self.url, wanted, set_ids, k, seed)


def diffusion_weights_present(model: str) -> bool:
    """Whether a diffusers model is a local directory or in the Hugging Face cache (no download)."""
    import os

    if os.path.isdir(model):
        return os.path.isfile(os.path.join(model, "model_index.json"))
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "model_index.json"), str)
    except Exception:  # noqa: BLE001 - an unreadable cache means no weights here
        return False


class ServeSetGenerator:
    """Starts the Serve app in this Ray for the request, on a free loopback port, then stops it.

    ``shutdown_serve=False`` leaves Serve to the Ray shutdown that follows (a run that owns
    its Ray): stopping the controller by hand makes Ray print a retried-task notice."""

    def __init__(
        self, backend: str, store_uri: str, world_dir: str | None, shutdown_serve: bool = True
    ):
        self.backend, self.store_uri, self.world_dir = backend, store_uri, world_dir
        self.shutdown_serve = shutdown_serve

    def resolved_backend(self) -> str:
        """The backend that serves this run: the world renderer for a world; for any other
        dataset the configured diffusers model, else ``retrieval`` (nearest real pool images
        in the run's joint space). Says which in one log line."""
        if self.backend == "world" and self.world_dir:
            resolved, why = f"world:{self.world_dir}", "the world renderer (the data is a world)"
        elif self.backend in ("world", "retrieval") or (
            self.backend.startswith("diffusers:")
            and not self.world_dir
            and not diffusion_weights_present(self.backend.partition(":")[2])
        ):
            resolved = f"retrieval:{self.store_uri}"
            why = (
                "retrieval: the nearest real pool images of each caption (the data is not a world and no diffusion "
                "weights are configured; set [generate] backend = 'diffusers:MODEL' to generate)"
            )
        else:
            from serve.backends import list_backends, parse_backend

            name = parse_backend(self.backend)[0]
            if name not in list_backends():
                raise ValueError(
                    f"[generate] backend {self.backend!r} is no generation backend; known: "
                    f"{', '.join(list_backends())} (diffusers takes 'diffusers:MODEL_ID_OR_DIR')"
                )
            resolved, why = self.backend, self.backend
        # the substitution of retrieval for generation is worth a line on the console; the rest is routine
        (log.warning if resolved.startswith("retrieval:") else log.info)(
            "generation backend: %s", why
        )
        return resolved

    def request_sets(self, wanted, set_ids, k, seed):
        backend = self.resolved_backend()
        if backend.startswith("retrieval:"):
            from audit.store import RunStore

            if (
                not RunStore(self.store_uri).manifest().get("config")
            ):  # checked here: a failed deployment says less
                raise ValueError(
                    f"the data is not a world, and retrieval needs an audit run in {self.store_uri} "
                    "to retrieve from; set [generate] backend = 'diffusers:MODEL' or run the audit first"
                )
        from ray import serve

        from cluster.runtime import requiet
        from serve.app import build_app
        from serve.config import Limits, ServeAppConfig

        requiet()  # importing ray.serve installs a console handler
        # the run's own app: limits sized for the run's sets (a model's hard captions, the probe set)
        limits = Limits(
            max_prompts=1024,
            max_images_per_prompt=64,
            max_images=8192,
            max_pixels=1 << 34,
            max_body_bytes=1 << 22,
            client_pixels_per_minute=0,
        )
        app = build_app(ServeAppConfig(backend=backend, store=self.store_uri, limits=limits))
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        requiet()
        try:
            serve.run(app, name="zoo-audit-generate", route_prefix="/")
            return request_sets(f"http://127.0.0.1:{port}", wanted, set_ids, k, seed)
        finally:
            if self.shutdown_serve:
                serve.shutdown()
            else:
                serve.delete("zoo-audit-generate")


def set_generator(cfg, store_uri: str, world_dir: str | None, shutdown_serve: bool = True):
    """The generator for the ``[generate]`` section."""
    if cfg.url:
        return HttpSetGenerator(cfg.url)
    return ServeSetGenerator(cfg.backend, store_uri, world_dir, shutdown_serve)
