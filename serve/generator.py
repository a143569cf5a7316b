"""The generator deployment: one backend per replica, concurrent requests merged by
``@serve.batch`` into backend calls of at most ``max_batch_images`` images."""

import asyncio
import logging
import time
from typing import Any

from ray import serve

from audit.synthetic.sets import png_bytes
from serve.backends import create_backend

log = logging.getLogger("zoo_audit.serve")


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
                        results[ji]["png"][i] = png_bytes(img)
                except Exception as e:  # noqa: BLE001 - a failing call fails its jobs, not the replica
                    log.exception("backend %s failed", self.backend.name)
                    for ji in {ji for ji, _ in chunk}:
                        results[ji] = {"error": f"{type(e).__name__}: {e}", "status": 500}
        return results
