"""HTTP client for the generation service (what the audit calls to get targeted data).

    from serve.client import GenerationClient
    s = GenerationClient("http://127.0.0.1:8000", token=...).request_set(hard_captions, k=3)
    s.set_id, s.images  # uint8 [len(captions) * k, H, W, 3], s.prompts aligned

``request_set`` asks for one shared synthetic set for a list of hard captions (k images
per caption: arXiv 2312.05464 generates k=3 per failure mode and retrains a whole family
on the shared set), retrying on 503 (honouring Retry-After) and on refused connections
while the service starts, until ``timeout`` seconds have passed. The set id defaults to a
hash of the request, so asking again returns the stored set without regenerating.
"""

from __future__ import annotations

import base64
import io
import os
import time
from dataclasses import dataclass

import httpx
import numpy as np


@dataclass
class SyntheticSet:
    set_id: str
    image_ids: list[str]
    prompts: list[str]  # one per image, aligned with images
    images: np.ndarray  # uint8 [N, H, W, 3]
    generator: str
    cached: bool


class ServiceError(RuntimeError):
    """The service answered with an error status (the message carries its detail)."""

    def __init__(self, status: int, detail):
        super().__init__(f"generation service returned {status}: {detail}")
        self.status, self.detail = status, detail


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


class GenerationClient:
    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        token: str | None = None,
        timeout: float = 600.0,
        token_env: str = "ZOO_AUDIT_SERVE_TOKEN",
    ):
        token = token if token is not None else os.environ.get(token_env)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url, self.timeout = url.rstrip("/"), float(timeout)
        self.http = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(self.timeout, connect=10.0)
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> GenerationClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    #: how long a service that refuses connections is retried (it may be starting), not the whole timeout
    connect_retry_s: float = 30.0

    def _call(self, method: str, path: str, deadline: float, **kw) -> httpx.Response:
        delay = 0.5
        refused_until = time.monotonic() + self.connect_retry_s
        while True:
            try:
                r = self.http.request(method, path, **kw)
            except (httpx.ConnectError, httpx.RemoteProtocolError) as e:
                if time.monotonic() + delay > min(deadline, refused_until):
                    raise ConnectionError(
                        f"generation service {self.url} is unreachable ({type(e).__name__}: {e}); "
                        "start it (zoo-audit serve) or fix [generate] url"
                    ) from e
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            if r.status_code == 503 and time.monotonic() < deadline:
                wait = float(r.headers.get("retry-after") or delay)
                time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 10.0)
                continue
            if r.status_code >= 400:
                try:
                    detail = r.json().get("detail")
                except ValueError:
                    detail = r.text
                raise ServiceError(r.status_code, detail)
            return r

    def generate(
        self,
        prompts: list[str],
        images_per_prompt: int = 1,
        seed: int = 0,
        steps: int | None = None,
        guidance: float | None = None,
        size: int | list[int] | None = None,
        set_id: str | None = None,
        return_images: bool = False,
    ) -> dict:
        """``POST /v1/generate`` (retrying on 503 until the timeout); returns the JSON reply."""
        body = {
            "prompts": list(prompts),
            "images_per_prompt": images_per_prompt,
            "seed": seed,
            "return_images": return_images,
        }
        body |= {
            k: v
            for k, v in {
                "steps": steps,
                "guidance": guidance,
                "size": size,
                "set_id": set_id,
            }.items()
            if v is not None
        }
        return self._call("POST", "/v1/generate", time.monotonic() + self.timeout, json=body).json()

    def request_set(
        self, captions: list[str], k: int = 3, seed: int = 0, set_id: str | None = None, **params
    ) -> SyntheticSet:
        """One shared synthetic set: ``k`` images for each hard caption; waits until it is stored."""
        if not captions:
            raise ValueError("request_set needs at least one caption")
        if k < 1:
            raise ValueError(f"k (images per caption) must be >= 1, got {k}")
        r = self.generate(
            captions, images_per_prompt=k, seed=seed, set_id=set_id, return_images=True, **params
        )
        images = np.stack([decode_png(base64.b64decode(b)) for b in r["images"]])
        return SyntheticSet(
            set_id=r["set_id"],
            image_ids=r["image_ids"],
            prompts=[c for c in captions for _ in range(k)],
            images=images,
            generator=r["generator"],
            cached=r["cached"],
        )
