"""The generate stage's set generators and the choice between them.

- :class:`ServeSetGenerator`: the Ray Serve app started in this Ray for the run, without an
  HTTP proxy; the run calls the ingress's ``make_set`` through the handle ``serve.run``
  returns (its store is the run directory, so the sets land in ``RUN/synthetic/``).
- :class:`HttpSetGenerator`: a running ``zoo-audit serve`` at ``[generate] url``, over HTTP.
- :class:`audit.synthetic.RetrievalSetGenerator`: real pool images, no Serve and no Ray, for
  data that is not a world when no diffusion weights are configured.

:func:`choose_generator` picks one for a run (the composition root, ``cluster.runner``, wires
it); :func:`resolve_backend` is the rule.
"""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Callable, Mapping

import pyarrow as pa

from audit.pipeline.generate import SETS_SCHEMA

log = logging.getLogger(__name__)

RETRIEVAL = "retrieval"
APP_NAME = "zoo-audit-generate"


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


def resolve_backend(backend: str, world_dir: str | None) -> tuple[str, str]:
    """``(spec, why)`` for ``[generate] backend``: the world renderer (``world:DIR``) for a
    world; for any other dataset the configured diffusers model when its weights are here,
    else ``"retrieval"`` (nearest real pool images in the run's joint space, no Serve). A
    Serve backend named explicitly (``null``, ``diffusers:...`` for a world) is itself.
    Raises ValueError naming the known backends for any other name."""
    if backend == "world" and world_dir:
        return f"world:{world_dir}", "the world renderer (the data is a world)"
    if backend == RETRIEVAL:
        return RETRIEVAL, "retrieval: the nearest real pool images of each caption"
    if backend == "world" or (
        backend.startswith("diffusers:")
        and not world_dir
        and not diffusion_weights_present(backend.partition(":")[2])
    ):
        return RETRIEVAL, (
            "retrieval: the nearest real pool images of each caption (the data is not a world and no diffusion "
            "weights are configured; set [generate] backend = 'diffusers:MODEL' to generate)"
        )
    from serve.backends import list_backends, parse_backend

    if parse_backend(backend)[0] not in list_backends():
        known = ", ".join([*list_backends(), RETRIEVAL])
        raise ValueError(
            f"[generate] backend {backend!r} is no generation backend; known: "
            f"{known} (diffusers takes 'diffusers:MODEL_ID_OR_DIR')"
        )
    return backend, backend


def check_backends(cfg) -> None:
    """``[generate] backend`` and every ``compare`` name a generator that exists (a registered
    Serve backend, ``retrieval``; ``diffusers`` with its model): checked before any work, even
    with generation off, so a typo is one line naming the key instead of a failed stage after
    the sweep. Whether weights are here is decided later (:func:`resolve_backend`)."""
    from serve.backends import list_backends, parse_backend

    g, known = cfg.generate, [*list_backends(), RETRIEVAL]
    where = f" in {cfg.source}" if cfg.source else ""
    for key, spec in [("backend", g.backend), *(("compare", c) for c in g.compare)]:
        name, arg = parse_backend(spec) if spec.strip() else ("", None)
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"[generate] {key} {spec!r}{where} is no generation backend{hint}; known: "
                f"{', '.join(known)} (diffusers takes 'diffusers:MODEL_ID_OR_DIR')"
            )
        if name == "diffusers" and not arg:
            raise ValueError(
                f"[generate] {key} {spec!r}{where} names no model; give 'diffusers:MODEL_ID_OR_DIR'"
            )


class ServeSetGenerator:
    """The Serve app, started in this Ray for the request, reached through its handle.

    Serve starts without proxies (no HTTP port: nothing outside this Ray can reach it), the
    app has no token and no request limits (the run's requests are its own), and the
    generator still batches the backend calls. ``shutdown_serve=False`` leaves Serve to the
    Ray shutdown that follows (a run that owns its Ray): stopping the controller by hand
    makes Ray print a retried-task notice; otherwise only the app is deleted.
    """

    #: how long one set may keep answering 503 (generator lost or queue full) before failing
    retry_s: float = 600.0

    def __init__(
        self, backend: str, store_uri: str, world_dir: str | None, shutdown_serve: bool = True
    ):
        self.backend, self.store_uri, self.world_dir = backend, store_uri, world_dir
        self.shutdown_serve = shutdown_serve

    def resolved_backend(self) -> str:
        """The Serve backend spec that serves this run (see :func:`resolve_backend`)."""
        spec, _ = resolve_backend(self.backend, self.world_dir)
        if spec == RETRIEVAL:
            raise ValueError(
                f"[generate] backend {self.backend!r}: the data is not a world and no diffusion weights "
                "are here, so no Serve backend can generate for it; the run retrieves instead "
                "(cluster.generate.choose_generator) or set [generate] backend = 'diffusers:MODEL'"
            )
        return spec

    def request_sets(self, wanted, set_ids, k, seed) -> pa.Table:
        from ray import serve

        from cluster.runtime import requiet
        from serve.app import build_handle_app
        from serve.config import ServeAppConfig

        cfg = ServeAppConfig(backend=self.resolved_backend(), store=self.store_uri)
        requiet()  # importing ray.serve installs a console handler
        serve.start(proxy_location="Disabled")
        requiet()
        try:
            handle = serve.run(build_handle_app(cfg), name=APP_NAME, route_prefix=None)
            rows = []
            for scope, caps in wanted.items():
                n = k if isinstance(k, int) else k[scope]
                reply = self._make_set(handle, caps, n, seed, set_ids[scope])
                rows.append(
                    {
                        "scope": scope,
                        "set_id": reply["set_id"],
                        "captions": list(caps),
                        "n_images": reply["n_images"],
                        "generator": reply["generator"],
                    }
                )
            return pa.Table.from_pylist(rows, schema=SETS_SCHEMA)
        finally:
            if self.shutdown_serve:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)

    def _make_set(self, handle, captions: list[str], k: int, seed: int, set_id: str) -> dict:
        """One set through ``handle.make_set``; a 503 (generator lost, queue full) is retried."""
        request = {
            "prompts": list(captions),
            "images_per_prompt": k,
            "seed": seed,
            "set_id": set_id,
        }
        return retry_503(lambda: handle.make_set.remote(request).result(), self.retry_s, set_id)


def retry_503(call: Callable[[], dict], retry_s: float, what: str) -> dict:
    """``call()`` until it answers other than 503 (waiting its ``retry_after_s``) or
    ``retry_s`` have passed; raises RuntimeError with the detail of an error answer."""
    deadline = time.monotonic() + retry_s
    while True:
        reply = call()
        if "error" not in reply:
            return reply
        if reply["status"] != 503 or time.monotonic() > deadline:
            raise RuntimeError(
                f"generation of set {what!r} failed ({reply['status']}): {reply['error']}"
            )
        time.sleep(float(reply.get("retry_after_s") or 1.0))


class ChosenGenerator:
    """Chooses the run's generator on its first request, so Ray starts only for Serve (an
    unknown ``[generate] backend`` is refused before the run by :func:`check_backends`; one
    whose weights are missing here is substituted, or fails, at the generate stage)."""

    def __init__(self, choose: Callable[[], object]):
        self._choose, self._gen = choose, None

    def request_sets(self, wanted, set_ids, k, seed):
        if self._gen is None:
            self._gen = self._choose()
        return self._gen.request_sets(wanted, set_ids, k, seed)


LEARNED = "learned"


def _learned(cfg, store, on_serve, data):
    """The generator learned from the run's train split (trained here, or found in the
    cache), served by the Serve app; when it cannot be trained, retrieval, with one warning
    line saying why."""
    from audit.slots import SlotGrammar
    from audit.synthetic import RetrievalSetGenerator
    from audit.synthetic.learned import train_learned

    try:
        if data is None:
            from audit.pipeline.inputs import load_data

            data, _ = load_data(cfg)
        grammar = SlotGrammar.of(data, cfg.data.attribute_templates)
        root = train_learned(data, grammar, cfg.generate.learned)
    except (ValueError, MemoryError, RuntimeError) as e:
        log.warning("generation backend: learned cannot be trained (%s); retrieval instead", e)
        return RetrievalSetGenerator(store, cfg, data=data)
    log.info("generation backend: learned (%s)", root)
    return on_serve(f"{LEARNED}:{root}")


def choose_generator(
    cfg, store, world_dir: str | None, on_serve: Callable[[str], object], data=None, backend=None
):
    """The generator of ``backend`` (default ``[generate] backend``) for the run of ``cfg``
    (an AuditConfig) into ``store``: the service at ``[generate] url`` (for the run's own
    backend); else, by :func:`resolve_backend`, the audit's retrieval (a substitution for the
    asked backend is one warning line; ``data``: the run's loaded dataset, its pool) or
    ``on_serve(spec)``, the Serve app for that backend."""
    g = cfg.generate
    backend = backend or g.backend
    if g.url and backend == g.backend:
        return HttpSetGenerator(g.url)
    if backend == LEARNED:
        return _learned(cfg, store, on_serve, data)
    spec, why = resolve_backend(backend, world_dir)
    if spec == RETRIEVAL:
        from audit.synthetic import RetrievalSetGenerator

        # the substitution of retrieval for generation is worth a line on the console
        (log.info if backend == RETRIEVAL else log.warning)("generation backend: %s", why)
        return RetrievalSetGenerator(store, cfg, data=data)
    log.info("generation backend: %s", why)
    return on_serve(spec)
