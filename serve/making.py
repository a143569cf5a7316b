"""Making one set, shared by the ingress's two doors: dedupe by set id, claim the id across
replicas, generate through the generator's handle, store the set, answer.

The HTTP door (:mod:`serve.app`) parses, authenticates and applies the request limits and
the client's quota, then calls :meth:`SetMaker.set_for`; the handle door
:meth:`SetMaker.make_set` is the run's own (trusted) path: ``serve.run(...)`` returns the
ingress's handle and the run calls ``handle.make_set.remote(request).result()``, with no
HTTP, no token and no limits (backend calls are still batched by the generator).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from audit.store import RunStore
from audit.synthetic.claims import claim_set, release_claim
from audit.synthetic.sets import (
    SetUnreadable,
    image_id,
    read_set_meta,
    read_set_pngs,
    request_key,
    request_seeds,
    set_path,
    write_set,
)
from serve.config import GenerateRequest, Limits, ServeAppConfig, check_pixels

log = logging.getLogger("zoo_audit.serve")


class SetFailed(Exception):
    """A request that made no set: ``status`` as HTTP would say it (422, 409, 429, 500, 503)."""

    def __init__(
        self, status: int, detail: Any, headers: dict | None = None, error_id: str | None = None
    ):
        super().__init__(f"{status}: {detail}")
        self.status, self.detail, self.headers, self.error_id = status, detail, headers, error_id

    def as_dict(self) -> dict:
        """The handle door's answer: ``{"error", "status"}`` plus ``error_id`` and
        ``retry_after_s`` when there are."""
        out: dict[str, Any] = {"error": self.detail, "status": self.status}
        if self.error_id:
            out["error_id"] = self.error_id
        if self.headers and "Retry-After" in self.headers:
            out["retry_after_s"] = float(self.headers["Retry-After"])
        return out


class SetMaker:
    """The ingress's state and its set-making logic (a base of the ingress deployment)."""

    def __init__(self, generator, config: dict):
        self.generator = generator
        self.cfg = ServeAppConfig.model_validate(config)
        self.store = RunStore(self.cfg.store)
        self._info: dict | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}
        # set id -> (file stamp, meta): a bounded cache of stored sets' metadata
        self._meta: OrderedDict[str, tuple[tuple[int, int], dict]] = OrderedDict()

    # -- the handle door -------------------------------------------------------------------
    async def make_set(self, request: dict) -> dict:
        """Make (or find) the set of ``request`` (a :class:`GenerateRequest` as a dict) for a
        trusted caller: no token, no limits. Returns the reply of ``POST /v1/generate`` or
        ``{"error", "status", ...}`` (:meth:`SetFailed.as_dict`); a 503 may be retried."""
        try:
            req = GenerateRequest.model_validate(request)
        except ValidationError as e:
            return {"error": str(e), "status": 422}
        try:
            return await self.set_for(req)
        except SetFailed as e:
            return e.as_dict()

    # -- shared ----------------------------------------------------------------------------
    async def set_for(
        self,
        req: GenerateRequest,
        limits: Limits | None = None,
        charge: Callable[[int], None] | None = None,
    ) -> dict:
        """The reply for ``req``; raises :class:`SetFailed`. ``limits`` bounds the resolved
        request's pixels; ``charge(pixels)`` is told what a new set costs before it is made
        (and raises SetFailed to refuse)."""
        info = await self._backend_info()
        resolved = req.resolved(info["defaults"])
        if limits is not None:
            try:
                check_pixels(resolved, limits)
            except ValueError as e:
                raise SetFailed(422, str(e)) from None
        request_hash = request_key(resolved, info["backend"])
        set_id = req.set_id or f"set-{request_hash}"
        # One generation per set id: in this replica a repeat waits on the lock; across replicas
        # the claim file in the store decides, and a repeat waits for the set to appear.
        lock = self._locks.setdefault(set_id, asyncio.Lock())
        self._users[set_id] = self._users.get(set_id, 0) + 1
        try:
            async with lock:
                if (done := await self._claim(set_id, request_hash, req.return_images)) is not None:
                    return done
                try:
                    return await self._make_claimed(req, resolved, request_hash, set_id, charge)
                finally:
                    await asyncio.to_thread(release_claim, self.store, set_id)
        finally:
            self._users[set_id] -= 1
            if not self._users[set_id]:
                del self._users[set_id], self._locks[set_id]

    async def _backend_info(self) -> dict:
        if self._info is None:
            self._info = await self.generator.info.remote()
        return self._info

    def _retry_after(self) -> dict:
        return {"Retry-After": str(max(1, round(self.cfg.retry_after_s)))}

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
    ) -> SetFailed:
        """Record ``reason`` in errors.parquet under a new error id; the SetFailed to raise."""
        eid = uuid.uuid4().hex[:12]
        log.error("error %s for set %s: %s", eid, set_id, reason)
        try:
            self.store.record_errors(
                [{"stage": "serve", "item": set_id, "reason": f"error {eid}: {reason}"}]
            )
        except Exception:  # noqa: BLE001 - reporting must not mask the original error (a full disk)
            log.exception("could not record error %s", eid)
        return SetFailed(status, f"{what} (error id {eid})", headers, error_id=eid)

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

    async def stored_reply(self, set_id: str, request_hash: str, return_images: bool):
        """The reply of the stored set ``set_id`` (None when there is none); raises SetFailed
        when it is unreadable (500) or holds another request (409)."""
        try:
            meta = await self._set_meta(set_id)
        except SetUnreadable as e:
            raise self._fail(
                set_id,
                str(e),
                f"set {set_id!r} is stored but unreadable; delete it or use another set_id",
            ) from None
        if meta is None:
            return None
        if meta["request_hash"] != request_hash:
            raise SetFailed(
                409,
                f"set_id {set_id!r} already holds a different request (generator {meta['generator']}, "
                f"request {meta['request']}); use another set_id or repeat that request",
            )
        return await self._reply(meta, cached=True, return_images=return_images)

    async def _claim(self, set_id: str, request_hash: str, return_images: bool) -> dict | None:
        """Claim ``set_id``: None once this replica holds the claim, or the stored set's reply
        when the set is (or becomes, made by another replica) stored."""
        while True:
            if (done := await self.stored_reply(set_id, request_hash, return_images)) is not None:
                return done
            try:
                held = await asyncio.to_thread(
                    claim_set, self.store, set_id, request_hash, self.cfg.claim_timeout_s
                )
            except Exception as e:  # noqa: BLE001 - a full disk, a read-only store
                raise self._fail(set_id, f"cannot claim the set id: {type(e).__name__}: {e}") from e
            if held is None:
                return None  # ours
            if held.get("request_hash") != request_hash:
                raise SetFailed(
                    409,
                    f"set_id {set_id!r} is being generated for a different request; use another set_id",
                )
            await asyncio.sleep(0.1)  # the same request, generating in another replica: wait

    async def _make_claimed(
        self, req, resolved: dict, request_hash: str, set_id: str, charge
    ) -> dict:
        """Generate and store the claimed set ``set_id``; its reply."""
        # the set may have been stored (and its claim released) between our check and our claim
        if (done := await self.stored_reply(set_id, request_hash, req.return_images)) is not None:
            return done
        k = resolved["images_per_prompt"]
        h, w = resolved["size"]
        if charge is not None:
            charge(len(resolved["prompts"]) * k * h * w)
        job = {
            "prompts": [p for p in resolved["prompts"] for _ in range(k)],
            "seeds": request_seeds(resolved["prompts"], k, resolved["seed"]),
            "steps": resolved["steps"],
            "guidance": resolved["guidance"],
            "size": resolved["size"],
        }
        pngs = await self._generate(job, set_id)
        backend = (await self._backend_info())["backend"]
        try:
            meta = await asyncio.to_thread(
                write_set, self.store, set_id, resolved, request_hash, backend, job["seeds"], pngs
            )
        except Exception as e:  # noqa: BLE001 - a full disk: the temporary is gone, the id stays free
            raise self._fail(set_id, f"cannot store the set: {type(e).__name__}: {e}") from e
        if meta is None:  # stored meanwhile by a holder of a stale claim: that set stands
            stored = await self.stored_reply(set_id, request_hash, req.return_images)
            if stored is None:
                raise self._fail(set_id, "the set's path holds something that is not a set")
            return stored
        return await self._reply({**meta, "_pngs": pngs}, False, req.return_images)

    async def _generate(self, job: dict, set_id: str) -> list[bytes]:
        """The job's PNGs from the generator; raises SetFailed (503 when it may be retried)."""
        try:
            result = await self.generator.generate.remote(job)
        except BackPressureError:
            raise SetFailed(
                503, "generator queue is full; retry later", self._retry_after()
            ) from None
        except (RayActorError, ActorUnavailableError) as e:
            # the generator's replica (or its node) is gone: Serve starts another, so the caller retries
            raise self._fail(
                set_id,
                f"{type(e).__name__}: {e}",
                "the generator was lost; nothing was stored; retry",
                status=503,
                headers=self._retry_after(),
            ) from e
        except Exception as e:  # noqa: BLE001 - timeout, a failing backend, ...
            raise self._fail(set_id, f"{type(e).__name__}: {e}") from e
        if "error" in result:
            if result["status"] == 422:
                backend = (await self._backend_info())["backend"]
                raise SetFailed(
                    422, f"the {backend} backend cannot render a prompt: {result['error']}"
                )
            raise self._fail(set_id, result["error"])
        return result["png"]
