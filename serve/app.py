"""The Ray Serve generation app: a FastAPI ingress in front of a batched generator.

``build_app(config)`` returns the application (``serve run serve.app:build_app
backend=world store=runs/serve`` or ``serve run configs/serve/serve.yaml``);
``serve_main(args)`` is ``zoo-audit serve``: Ray embedded, the app on 127.0.0.1, blocking.

Routes (bearer token required on all but /healthz when a token is configured)::

    POST /v1/generate            {prompts, images_per_prompt, seed, steps, guidance, size,
                                  set_id?, return_images?} -> {set_id, image_ids, ...}
    GET  /v1/sets/{set_id}       metadata and counts
    GET  /v1/sets/{set_id}/images/{n}.png
    GET  /healthz

The ingress validates (422 naming the bound), authenticates (401), dedups by set id
(same request -> the stored set, different request -> 409), calls the generator through a
handle (whose bounded queue turns overload into 503 + Retry-After), and writes the set in
one atomic Parquet file only after every image exists (a failure -> 500 with an error id,
nothing stored).
"""

import asyncio
import base64
import hashlib
import hmac
import io
import logging
import os
import time
import uuid
from collections import OrderedDict, deque
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from audit.store import RunStore, content_hash
from serve.backends import create_backend
from serve.config import GenerateRequest, ServeAppConfig, check_pixels, check_set_id, load_config
from serve.sets import (
    SetUnreadable,
    claim_set,
    image_id,
    probe_store,
    read_set_image,
    read_set_meta,
    read_set_pngs,
    release_claim,
    request_seeds,
    set_path,
    write_set,
)

log = logging.getLogger("zoo_audit.serve")


def _png(img) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class BadPrompt(ValueError):
    """The backend cannot render a prompt (the caller's mistake: 422)."""


@serve.deployment
class Generator:
    """Owns one backend; ``generate`` merges concurrent requests with ``@serve.batch``.

    A request (job) is ``{prompts, seeds, steps, guidance, size}`` with one seed per image
    (prompts repeated per image); the reply is ``{"png": [bytes]}`` or ``{"error", "status"}``.
    Jobs of one batch with equal (steps, guidance, size) share backend calls of at most
    ``max_batch_images`` images; a failing backend call fails only the jobs in it.
    """

    def __init__(
        self,
        backend: str,
        backend_options: dict,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        max_batch_images: int | None,
    ):
        t = time.perf_counter()
        self.backend = create_backend(backend, **backend_options)
        self.max_batch_images = int(max_batch_images or self.backend.max_batch)
        self.generate.set_max_batch_size(max_batch_size)
        self.generate.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batches: list[int] = []  # requests per batch (recent), for tests and the benchmark
        log.info("generator %s ready in %.1fs", self.backend.name, time.perf_counter() - t)

    def info(self) -> dict:
        return {**self.backend.info(), "max_batch_images": self.max_batch_images}

    def batch_sizes(self) -> list[int]:
        return list(self.batches)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate(self, jobs: list[dict]) -> list[dict]:
        self.batches = [*self.batches[-999:], len(jobs)]
        return await asyncio.to_thread(self._run_batch, jobs)

    def _run_batch(self, jobs: list[dict]) -> list[dict]:
        results: list[dict[str, Any]] = [{"png": [None] * len(j["seeds"])} for j in jobs]
        groups: dict[tuple, list[tuple[int, int]]] = {}
        for ji, j in enumerate(jobs):
            try:
                for p in dict.fromkeys(j["prompts"]):
                    self.backend.check_prompt(p)
            except ValueError as e:
                results[ji] = {"error": str(e), "status": 422}
                continue
            key = (int(j["steps"]), float(j["guidance"]), tuple(j["size"]))
            groups.setdefault(key, []).extend((ji, i) for i in range(len(j["seeds"])))
        for (steps, guidance, size), items in groups.items():
            for start in range(0, len(items), self.max_batch_images):
                chunk = [
                    (ji, i)
                    for ji, i in items[start : start + self.max_batch_images]
                    if "error" not in results[ji]
                ]
                if not chunk:
                    continue
                try:
                    imgs = self.backend.generate(
                        [jobs[ji]["prompts"][i] for ji, i in chunk],
                        [jobs[ji]["seeds"][i] for ji, i in chunk],
                        steps,
                        guidance,
                        size,
                    )
                    for (ji, i), img in zip(chunk, imgs, strict=True):
                        results[ji]["png"][i] = _png(img)
                except Exception as e:  # noqa: BLE001 - a failing call fails its jobs, not the replica
                    log.exception("backend %s failed", self.backend.name)
                    for ji in {ji for ji, _ in chunk}:
                        results[ji] = {"error": f"{type(e).__name__}: {e}", "status": 500}
        return results


api = FastAPI(title="zoo-audit generation", version="1")


AUTH_OFF = (
    "auth is OFF: anyone who can reach this port can generate and store sets. Set a token: "
    "ZOO_AUDIT_SERVE_TOKEN=... or token_file (--token-file) with a 0600 file"
)


def _error(status: int, detail: Any, headers: dict | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status, headers=headers)


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, generator, config: dict, token_sha256: str | None):
        self.generator = generator
        self.cfg = ServeAppConfig.model_validate(config)
        self.store = RunStore(self.cfg.store)
        self.token_sha256 = token_sha256
        self._info: dict | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}
        self._meta: OrderedDict[str, tuple[tuple[int, int], dict]] = (
            OrderedDict()
        )  # set id -> (file stamp, meta)
        self._clients: dict[str, deque] = {}  # client address -> (time, images) of the last minute
        if token_sha256 is None:
            log.warning(AUTH_OFF)

    # -- helpers -----------------------------------------------------------------------
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

    async def _backend_info(self) -> dict:
        if self._info is None:
            self._info = await self.generator.info.remote()
        return self._info

    async def _set_meta(self, set_id: str) -> dict | None:
        """The stored set's metadata, or None. Cached per replica, but each call stats the file
        (a deleted or replaced set is never served from the cache); raises SetUnreadable."""
        stamp = await asyncio.to_thread(self.store.mtime_size, set_path(set_id))
        if stamp is None:
            self._meta.pop(set_id, None)
            return None
        hit = self._meta.get(set_id)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        meta = await asyncio.to_thread(read_set_meta, self.store, set_id)
        if meta is not None:
            self._meta[set_id] = (stamp, meta)
            while len(self._meta) > 4096:
                self._meta.popitem(last=False)
        return meta

    def _fail(
        self,
        set_id: str,
        reason: str,
        what: str = "generation failed; nothing was stored",
        status: int = 500,
        headers: dict | None = None,
    ) -> JSONResponse:
        eid = uuid.uuid4().hex[:12]
        log.error("error %s for set %s: %s", eid, set_id, reason)
        try:
            self.store.record_errors(
                [{"stage": "serve", "item": set_id, "reason": f"error {eid}: {reason}"}]
            )
        except Exception:  # noqa: BLE001 - reporting must not mask the original error (a full disk)
            log.exception("could not record error %s", eid)
        return _error(status, f"{what} (error id {eid})", headers, error_id=eid)

    def _over_quota(self, client: str, n: int) -> JSONResponse | None:
        """429 when ``client`` asked for more than ``limits.client_pixels_per_minute`` new pixels."""
        quota = self.cfg.limits.client_pixels_per_minute
        if not quota:
            return None
        now = time.monotonic()
        q = self._clients.setdefault(client, deque())
        while q and now - q[0][0] > 60:
            q.popleft()
        used = sum(k for _, k in q)
        if used + n > quota:
            wait = max(1, round(60 - (now - q[0][0]))) if q else 60
            return _error(
                429,
                f"limits.client_pixels_per_minute={quota}: this client asked for {used} pixels in the "
                f"last minute; {n} more is over the quota, retry in {wait}s",
                {"Retry-After": str(wait)},
            )
        q.append((now, n))
        return None

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

    def _retry_after(self) -> dict:
        return {"Retry-After": str(max(1, round(self.cfg.retry_after_s)))}

    async def _reply(self, meta: dict, cached: bool, return_images: bool) -> dict:
        out = {
            "set_id": meta["set_id"],
            "generator": meta["generator"],
            "n_images": meta["n_images"],
            "image_ids": [image_id(meta["set_id"], i) for i in range(meta["n_images"])],
            "request": meta["request"],
            "created": meta["created"],
            "cached": cached,
        }
        if return_images:
            pngs = meta.get("_pngs") or await asyncio.to_thread(
                read_set_pngs, self.store, meta["set_id"]
            )
            out["images"] = [base64.b64encode(p).decode() for p in pngs]
        return out

    # -- routes ------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self):
        """Asks the generator and writes to the store on every call (nothing cached)."""
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
        if (denied := self._auth(request)) is not None:
            return denied
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

        info = await self._backend_info()
        resolved = req.resolved(info["defaults"])
        try:
            check_pixels(resolved, self.cfg.limits)
        except ValueError as e:
            return _error(422, str(e))
        request_hash = content_hash(resolved, info["backend"])
        set_id = req.set_id or f"set-{request_hash}"
        client = request.client.host if request.client else "?"
        # One generation per set id: in this replica a repeat waits on the lock; across replicas
        # the claim file in the store decides, and a repeat waits for the set to appear.
        lock = self._locks.setdefault(set_id, asyncio.Lock())
        self._users[set_id] = self._users.get(set_id, 0) + 1
        try:
            async with lock:
                return await self._generate_once(req, resolved, request_hash, set_id, info, client)
        finally:
            self._users[set_id] -= 1
            if not self._users[set_id]:
                del self._users[set_id], self._locks[set_id]

    async def _stored_reply(
        self, set_id: str, request_hash: str, return_images: bool
    ) -> JSONResponse | dict | None:
        try:
            meta = await self._set_meta(set_id)
        except SetUnreadable as e:
            return self._fail(
                set_id,
                str(e),
                f"set {set_id!r} is stored but unreadable; delete it or use another set_id",
            )
        if meta is None:
            return None
        if meta["request_hash"] != request_hash:
            return _error(
                409,
                f"set_id {set_id!r} already holds a different request (generator {meta['generator']}, "
                f"request {meta['request']}); use another set_id or repeat that request",
            )
        return await self._reply(meta, cached=True, return_images=return_images)

    async def _generate_once(
        self, req, resolved: dict, request_hash: str, set_id: str, info: dict, client: str
    ):
        while True:
            if (
                done := await self._stored_reply(set_id, request_hash, req.return_images)
            ) is not None:
                return done
            try:
                held = await asyncio.to_thread(
                    claim_set, self.store, set_id, request_hash, self.cfg.claim_timeout_s
                )
            except Exception as e:  # noqa: BLE001 - a full disk, a read-only store
                return self._fail(set_id, f"cannot claim the set id: {type(e).__name__}: {e}")
            if held is None:
                break  # ours
            if held.get("request_hash") != request_hash:
                return _error(
                    409,
                    f"set_id {set_id!r} is being generated for a different request; use another set_id",
                )
            await asyncio.sleep(
                0.1
            )  # the same request, generating in another replica: wait for its set

        try:
            # the set may have been stored (and its claim released) between our check and our claim
            if (
                done := await self._stored_reply(set_id, request_hash, req.return_images)
            ) is not None:
                return done
            k = resolved["images_per_prompt"]
            h, w = resolved["size"]
            if (over := self._over_quota(client, len(resolved["prompts"]) * k * h * w)) is not None:
                return over
            job = {
                "prompts": [p for p in resolved["prompts"] for _ in range(k)],
                "seeds": request_seeds(resolved["prompts"], k, resolved["seed"]),
                "steps": resolved["steps"],
                "guidance": resolved["guidance"],
                "size": resolved["size"],
            }
            try:
                result = await self.generator.generate.remote(job)
            except BackPressureError:
                return _error(503, "generator queue is full; retry later", self._retry_after())
            except (RayActorError, ActorUnavailableError) as e:
                # the generator's replica (or its node) is gone: Serve starts another, so the caller retries
                return self._fail(
                    set_id,
                    f"{type(e).__name__}: {e}",
                    "the generator was lost; nothing was stored; retry",
                    status=503,
                    headers=self._retry_after(),
                )
            except Exception as e:  # noqa: BLE001 - timeout, a failing backend, ...
                return self._fail(set_id, f"{type(e).__name__}: {e}")
            if "error" in result:
                if result["status"] == 422:
                    return _error(
                        422,
                        f"the {info['backend']} backend cannot render a prompt: {result['error']}",
                    )
                return self._fail(set_id, result["error"])
            try:
                meta = await asyncio.to_thread(
                    write_set,
                    self.store,
                    set_id,
                    resolved,
                    request_hash,
                    info["backend"],
                    job["seeds"],
                    result["png"],
                )
            except Exception as e:  # noqa: BLE001 - a full disk: the temporary is gone, the id stays free
                return self._fail(set_id, f"cannot store the set: {type(e).__name__}: {e}")
            if meta is None:  # stored meanwhile by a holder of a stale claim: that set stands
                stored = await self._stored_reply(set_id, request_hash, req.return_images)
                return (
                    stored
                    if stored is not None
                    else self._fail(set_id, "the set's path holds something that is not a set")
                )
            return await self._reply(
                {**meta, "_pngs": result["png"]}, cached=False, return_images=req.return_images
            )
        finally:
            await asyncio.to_thread(release_claim, self.store, set_id)

    def _check_read(self, request: Request, set_id: str):
        """The error response for a read of ``set_id`` (401 without the token, 422 for a bad
        id), or None when the read may go on."""
        if (denied := self._auth(request)) is not None:
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
            return self._fail(set_id, str(e), f"set {set_id!r} is stored but unreadable")
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
            return self._fail(set_id, str(e), f"set {set_id!r} is stored but unreadable")
        if png is None:
            return _error(404, f"no image {n} in set {set_id!r}")
        return Response(content=png, media_type="image/png")


def build_app(args: ServeAppConfig | dict | None = None):
    """The Serve application for ``args`` (a ServeAppConfig, or ``serve run`` key=value args)."""
    cfg = load_config(args)
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
    token_sha256 = cfg.resolve_token_hash()
    return Ingress.options(**cfg.ingress.deployment_options(cfg.retry_after_s)).bind(
        gen, cfg.model_dump(), token_sha256
    )
