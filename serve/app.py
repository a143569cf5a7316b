"""The Ray Serve generation app: a FastAPI ingress in front of a batched generator.

``build_app(config)`` returns the application (``serve run serve.app:build_app
backend=world store=runs/serve`` or ``serve run configs/serve/serve.yaml``);
``serve_main(args)`` is ``zoo-audit serve``: Ray embedded, the app on 127.0.0.1, blocking.

Routes (bearer token required on all but /healthz when a token is configured; with auth off,
or with ``allowed_hosts`` set, a Host header that names no local or allowed host gets 403)::

    POST /v1/generate            {prompts, images_per_prompt, seed, steps, guidance, size,
                                  set_id?, return_images?} -> {set_id, image_ids, ...}
    GET  /v1/sets/{set_id}       metadata and counts
    GET  /v1/sets/{set_id}/images/{n}.png
    GET  /healthz

The ingress checks the Host (403), validates (422 naming the bound), authenticates (401),
counts every loopback address as one client for the quota (429), dedups by set id
(same request -> the stored set, different request -> 409), calls the generator through a
handle (whose bounded queue turns overload into 503 + Retry-After), and writes the set in
one atomic Parquet file only after every image exists (a failure -> 500 with an error id,
nothing stored). The run itself skips HTTP: it calls the ingress's ``make_set`` through the
handle ``serve.run`` returns (:mod:`serve.making`).
"""

import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections import deque
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve

from audit.synthetic.claims import probe_store
from audit.synthetic.sets import SetUnreadable, check_set_id, image_id, read_set_image
from serve.config import AUTH_OFF, GenerateRequest, ServeAppConfig, load_config
from serve.generator import Generator
from serve.guard import client_key, host_refusal
from serve.making import SetFailed, SetMaker

log = logging.getLogger("zoo_audit.serve")

api = FastAPI(title="zoo-audit generation", version="1")


def _error(status: int, detail: Any, headers: dict | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status, headers=headers)


def _failed(e: SetFailed) -> JSONResponse:
    extra = {"error_id": e.error_id} if e.error_id else {}
    return _error(e.status, e.detail, e.headers, **extra)


@serve.deployment
@serve.ingress(api)
class Ingress(SetMaker):
    """``http=False``: the app of a run, reached only through its handle (no proxy, no port),
    so an absent token is no warning."""

    def __init__(self, generator, config: dict, token_sha256: str | None, http: bool = True):
        super().__init__(generator, config)
        self.token_sha256 = token_sha256
        self._clients: dict[str, deque] = {}  # client_key -> (time, pixels) of the last minute
        if token_sha256 is None and http:
            log.warning(AUTH_OFF)

    # -- helpers -----------------------------------------------------------------------
    def _host(self, request: Request) -> JSONResponse | None:
        """403 when the Host header names no local or allowed host, if the check applies.

        With auth off it always does: that stops DNS rebinding. With a token, the token already
        keeps a rebinding page out (the browser never sends it there), and a remote client
        behind a reverse proxy may use any name, so the check applies only when the user set
        ``allowed_hosts`` (asking for it). 403, not 421: a browser may retry a 421 elsewhere."""
        if self.token_sha256 is not None and not self.cfg.allowed_hosts:
            return None
        server = request.scope.get("server")
        refusal = host_refusal(
            request.headers.get("host"), server[0] if server else None, self.cfg.allowed_hosts
        )
        return None if refusal is None else _error(403, refusal)

    def _guard(self, request: Request) -> JSONResponse | None:
        """The Host check, then the token: the refusal, or None when the request may go on."""
        return self._host(request) or self._auth(request)

    def _auth(self, request: Request) -> JSONResponse | None:
        if self.token_sha256 is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode()).hexdigest()
        if (
            scheme.lower() != "bearer"
            or not token
            or not hmac.compare_digest(given, self.token_sha256)
        ):
            return _error(
                401,
                "missing or wrong bearer token: send 'Authorization: Bearer TOKEN'",
                {"WWW-Authenticate": "Bearer"},
            )
        return None

    def _charge(self, client: str, n: int) -> None:
        """Raise 429 when ``client`` asked for more than ``limits.client_pixels_per_minute``
        new pixels in the last minute; else count ``n``."""
        quota = self.cfg.limits.client_pixels_per_minute
        if not quota:
            return
        now = time.monotonic()
        q = self._clients.setdefault(client, deque())
        while q and now - q[0][0] > 60:
            q.popleft()
        used = sum(k for _, k in q)
        if used + n > quota:
            wait = max(1, round(60 - (now - q[0][0]))) if q else 60
            raise SetFailed(
                429,
                f"limits.client_pixels_per_minute={quota}: this client asked for {used} pixels in the "
                f"last minute; {n} more is over the quota, retry in {wait}s",
                {"Retry-After": str(wait)},
            )
        q.append((now, n))

    async def _read_body(self, request: Request) -> bytes | JSONResponse:
        """The body, read while counting: beyond ``limits.max_body_bytes`` reading stops with 413."""
        limit = self.cfg.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return _error(413, f"limits.max_body_bytes={limit}: Content-Length is {declared}")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                return _error(413, f"limits.max_body_bytes={limit}: the body is longer")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _parse(self, request: Request) -> GenerateRequest | JSONResponse:
        """The request of a POST within the limits, or the error response (415, 413, 422)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return _error(415, f"Content-Type must be application/json, got {ctype or 'none'!r}")
        body = await self._read_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            req = GenerateRequest.model_validate_json(body)
            req.check_limits(self.cfg.limits)
        except ValidationError as e:
            return _error(422, [{k: err[k] for k in ("loc", "msg", "type")} for err in e.errors()])
        except ValueError as e:
            return _error(422, str(e))
        return req

    # -- routes ------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self, request: Request):
        """Asks the generator and writes to the store on every call (nothing cached); no token
        asked, but the Host is checked (a rebinding page could make the service write)."""
        if (denied := self._host(request)) is not None:
            return denied
        try:
            info = await asyncio.wait_for(self.generator.info.remote(), timeout=30)
            self._info = info
        except Exception as e:  # noqa: BLE001
            return _error(503, f"generator not ready: {type(e).__name__}: {e}", self._retry_after())
        try:
            await asyncio.wait_for(asyncio.to_thread(probe_store, self.store), timeout=30)
        except Exception as e:  # noqa: BLE001 - a full disk, a read-only mount, an unreachable bucket
            return _error(
                503,
                f"store not writable: {type(e).__name__}: {str(e).replace(self.store.root, 'STORE')}",
                self._retry_after(),
            )
        return {
            "status": "ok",
            "generator": info,
            "store": "ok",
            "auth": self.token_sha256 is not None,
        }

    @api.post("/v1/generate")
    async def generate(self, request: Request):
        if (denied := self._guard(request)) is not None:
            return denied
        req = await self._parse(request)
        if isinstance(req, JSONResponse):
            return req
        client = client_key(request.client.host) if request.client else "?"
        try:
            return await self.set_for(req, self.cfg.limits, lambda n: self._charge(client, n))
        except SetFailed as e:
            return _failed(e)

    def _check_read(self, request: Request, set_id: str):
        """The error response for a read of ``set_id`` (403 for a foreign Host, 401 without the
        token, 422 for a bad id), or None when the read may go on."""
        if (denied := self._guard(request)) is not None:
            return denied
        try:
            check_set_id(set_id)
        except ValueError as e:
            return _error(422, str(e))
        return None

    @api.get("/v1/sets/{set_id}")
    async def get_set(self, set_id: str, request: Request):
        if (denied := self._check_read(request, set_id)) is not None:
            return denied
        try:
            meta = await self._set_meta(set_id)
        except SetUnreadable as e:
            return _failed(self._fail(set_id, str(e), f"set {set_id!r} is stored but unreadable"))
        if meta is None:
            return _error(404, f"no set {set_id!r}")
        return {**meta, "image_ids": [image_id(set_id, i) for i in range(meta["n_images"])]}

    @api.get("/v1/sets/{set_id}/images/{n}.png")
    async def get_image(self, set_id: str, n: int, request: Request):
        if (denied := self._check_read(request, set_id)) is not None:
            return denied
        try:
            png = await asyncio.to_thread(read_set_image, self.store, set_id, n)
        except SetUnreadable as e:
            return _failed(self._fail(set_id, str(e), f"set {set_id!r} is stored but unreadable"))
        if png is None:
            return _error(404, f"no image {n} in set {set_id!r}")
        return Response(content=png, media_type="image/png")


def build_app(args: ServeAppConfig | dict | None = None):
    """The Serve application for ``args`` (a ServeAppConfig, or ``serve run`` key=value args)."""
    return _build(load_config(args), http=True)


def build_handle_app(cfg: ServeAppConfig):
    """The application a run calls through the handle ``serve.run`` returns (``make_set``):
    started without proxies, it has no HTTP surface, so no token is needed or asked for."""
    return _build(cfg, http=False)


def _build(cfg: ServeAppConfig, http: bool):
    if "://" not in cfg.store:  # replicas may run elsewhere than this cwd
        cfg = cfg.model_copy(update={"store": os.path.abspath(cfg.store)})
    g = cfg.generator
    gen = Generator.options(**g.deployment_options(cfg.retry_after_s)).bind(
        cfg.backend,
        cfg.backend_options,
        g.max_batch_size,
        g.batch_wait_timeout_s,
        g.max_batch_images,
    )
    token_sha256 = cfg.resolve_token_hash() if http else None
    return Ingress.options(**cfg.ingress.deployment_options(cfg.retry_after_s)).bind(
        gen, cfg.model_dump(), token_sha256, http
    )
