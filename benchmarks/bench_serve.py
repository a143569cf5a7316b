"""Benchmark the generation service on 127.0.0.1 (bounded in requests and time).

    python benchmarks/bench_serve.py [--backend world|null|diffusers:MODEL] [--requests 16]

A tiny random Stable Diffusion pipeline (offline, the real diffusers path) is a directory
made by the tests' fixture: ``python tests/tiny_sd.py /tmp/tiny-sd`` then
``--backend diffusers:/tmp/tiny-sd``.

1. throughput: images/s through HTTP (concurrent clients, @serve.batch merging them)
   versus calling the same backend directly in this process at the same batch size
   (images per backend call); target ratio >= 0.9.
2. overhead: median latency of sequential one-image requests to the ``null`` backend
   (constant image: what is left is HTTP, proxy, ingress, handle, batching, PNG and the
   Parquet write); target < 5 ms.
3. overload: a burst of concurrent requests above the generator's ongoing + queued bound
   (null backend with a delay): only 200s and 503s, no failed connections, and every
   200 has its set stored with all its images.

Each phase warms up first; results, the machine and package versions are printed (and
written as JSON with --out). Figures of the ``world`` backend (the data's own generator) are
labelled ``oracle``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import tempfile
import time

from _common import machine_record

ORACLE = "the world renderer, the data's own generator: not a user's generator's speed"


def _oracle(spec: str) -> dict:
    """The label of a figure made with the world renderer (empty for any other backend)."""
    return {"oracle": ORACLE} if spec == "world" else {}


def _prompts(backend: str) -> list[str]:
    if backend == "world":
        return ["a photo of a red sandal on grass", "a photo of a blue pullover on moon"]
    return ["a photo of a red sandal on grass", "a blue pullover on the moon"]


def _http_rate(
    url: str, prompts: list[str], k: int, concurrency: int, n_requests: int, size, steps
):
    """(images, seconds) of ``n_requests`` timed POSTs from ``2 * concurrency`` clients."""
    import httpx

    def post(seed: int) -> int:
        with httpx.Client(base_url=f"{url}/tp", timeout=600) as c:
            body = {"prompts": prompts, "images_per_prompt": k, "seed": seed}
            r = c.post("/v1/generate", json=body | {"size": size, "steps": steps})
            r.raise_for_status()
            return r.json()["n_images"]

    # 2x as many clients as requests per batch: the next batch queues while one computes,
    # as under real load (with exactly one batch of clients the generator idles while they
    # read their replies and send again).
    with cf.ThreadPoolExecutor(2 * concurrency) as ex:
        list(ex.map(post, range(10_000, 10_000 + 2 * concurrency)))  # warm-up
        t = time.perf_counter()
        n = sum(ex.map(post, range(n_requests)))
        return n, time.perf_counter() - t


def _direct_rate(spec: str, options: dict, prompts: list[str], n_calls: int, size, steps):
    """(images, seconds) of ``n_calls`` backend calls on ``prompts`` in this process."""
    from audit.synthetic.sets import image_seed
    from serve.backends import create_backend

    be = create_backend(spec, **options)
    guidance = 0.0 if spec == "world" else 7.5
    seeds = [image_seed(1, i) for i in range(len(prompts))]
    be.generate(prompts, seeds, steps, guidance, (size, size))  # warm-up
    n, t = 0, time.perf_counter()
    for b in range(n_calls):
        seeds = [image_seed(b, i) for i in range(len(prompts))]
        n += len(be.generate(prompts, seeds, steps, guidance, (size, size)))
    return n, time.perf_counter() - t


def throughput(
    url: str,
    backend_spec: str,
    options: dict,
    n_requests: int,
    concurrency: int,
    per_request: int,
    size: int,
    steps: int,
    run_app,
) -> dict:
    """HTTP images/s vs the backend called directly with batches of concurrency * per_request images."""
    from ray import serve

    from serve.app import build_app
    from serve.config import ServeAppConfig

    cfg = ServeAppConfig(
        backend=backend_spec,
        backend_options=options,
        store=tempfile.mkdtemp(prefix="bench-serve-"),
        generator={
            "max_batch_size": concurrency,
            "max_ongoing_requests": 2 * concurrency,
            "max_queued_requests": 4 * concurrency,
            "max_batch_images": concurrency * per_request,
            "batch_wait_timeout_s": 0.05,
        },
        limits={"max_images": max(256, per_request), "max_images_per_prompt": per_request},
    )
    run_app(build_app(cfg), "tp")
    prompts = _prompts(backend_spec)
    k = max(1, per_request // len(prompts))
    n_http, http_s = _http_rate(url, prompts, k, concurrency, n_requests, size, steps)
    batches = serve.get_deployment_handle("Generator", app_name="tp").batch_sizes.remote().result()
    flat_p = [p for p in prompts for _ in range(k)] * concurrency
    n_calls = max(1, n_requests // concurrency)
    n_direct, direct_s = _direct_rate(backend_spec, options, flat_p, n_calls, size, steps)
    http_ips, direct_ips = n_http / http_s, n_direct / direct_s
    return {
        "backend": backend_spec,
        "clients": 2 * concurrency,
        "images_per_backend_call": len(flat_p),
        "http_images": n_http,
        "http_images_per_s": round(http_ips, 2),
        "direct_images": n_direct,
        "direct_images_per_s": round(direct_ips, 2),
        "ratio": round(http_ips / direct_ips, 3),
        "requests_per_batch_mean": round(statistics.mean(batches), 2),
        **_oracle(backend_spec),
    }


def overhead(url: str, n_requests: int, run_app) -> dict:
    """Per-request latency with the null backend, sequential requests on one connection."""
    import httpx

    from serve.app import build_app
    from serve.config import ServeAppConfig

    cfg = ServeAppConfig(
        backend="null",
        store=tempfile.mkdtemp(prefix="bench-serve-"),
        generator={"batch_wait_timeout_s": 0.0},
    )
    run_app(build_app(cfg), "oh")
    lat = []
    with httpx.Client(base_url=f"{url}/oh", timeout=60) as c:
        for i in range(n_requests + 20):
            t = time.perf_counter()
            r = c.post("/v1/generate", json={"prompts": ["x"], "seed": i, "size": 8})
            dt = time.perf_counter() - t
            r.raise_for_status()
            if i >= 20:  # warm-up
                lat.append(dt * 1000)
        t = time.perf_counter()
        for _ in range(n_requests):
            c.get("/healthz")
        health_ms = (time.perf_counter() - t) * 1000 / n_requests
    lat.sort()
    return {
        "requests": n_requests,
        "median_ms": round(statistics.median(lat), 2),
        "p90_ms": round(lat[int(0.9 * len(lat))], 2),
        "healthz_mean_ms": round(health_ms, 2),
    }


def overload(url: str, n_requests: int, concurrency: int, run_app) -> dict:
    """A burst above max_ongoing + max_queued: count statuses and check what was stored."""
    import httpx

    from audit.store import RunStore
    from audit.synthetic.sets import read_set_meta
    from serve.app import build_app
    from serve.config import ServeAppConfig

    cfg = ServeAppConfig(
        backend="null",
        backend_options={"delay_s": 0.1},
        store=tempfile.mkdtemp(prefix="bench-serve-"),
        generator={"max_batch_size": 2, "max_ongoing_requests": 2, "max_queued_requests": 4},
    )
    run_app(build_app(cfg), "ol")

    def post(i: int):
        try:
            with httpx.Client(base_url=f"{url}/ol", timeout=120) as c:
                r = c.post(
                    "/v1/generate",
                    json={
                        "prompts": ["a", "b"],
                        "images_per_prompt": 2,
                        "seed": i,
                        "set_id": f"burst-{i}",
                    },
                )
                return i, r.status_code, r.headers.get("retry-after")
        except httpx.HTTPError as e:
            return i, f"{type(e).__name__}", None

    t = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as ex:
        res = list(ex.map(post, range(n_requests)))
    secs = time.perf_counter() - t
    codes: dict[str, int] = {}
    for _, code, _ in res:
        codes[str(code)] = codes.get(str(code), 0) + 1
    store = RunStore(cfg.store)
    ok = {f"burst-{i}" for i, code, _ in res if code == 200}
    stored = {n for n in store.listdir("synthetic") if n.startswith("burst-")}
    complete = sum((read_set_meta(store, s) or {}).get("n_images") == 4 for s in stored)
    bound = cfg.generator.max_ongoing_requests + cfg.generator.max_queued_requests
    return {
        "requests": n_requests,
        "concurrency": concurrency,
        "bound_ongoing_plus_queued": bound,
        "statuses": codes,
        "retry_after_on_all_503": all(ra for _, c, ra in res if c == 503),
        "only_200_503": set(codes) <= {"200", "503"},
        "stored_sets": len(stored),
        "complete_sets": complete,
        "lost_or_extra_sets": len(ok ^ stored),
        "seconds": round(secs, 2),
    }


def direct_only(spec: str, options: dict, size: int, steps: int, seconds: float = 3.0) -> dict:
    """No Ray: the backend alone (device, dtype, attention processors, determinism, images/s by batch).

    For machines that have the backend's stack but not Ray (e.g. a GPU box checking the
    fp16 + attention-slicing path of the diffusers backend).
    """
    import numpy as np

    from serve.backends import create_backend

    be = create_backend(spec, **options)
    out: dict = {"info": {k: str(v) for k, v in be.info().items()}, **_oracle(spec)}
    pipe = getattr(be, "pipe", None)
    if pipe is not None:
        out["attn_processors"] = sorted(
            {type(p).__name__ for p in pipe.unet.attn_processors.values()}
        )
    g = 0.0 if spec == "world" else 7.5
    pair = be.generate(
        ["a photo of a red sandal on grass", "a photo of a blue bag"],
        [11, 12],
        steps,
        g,
        (size, size),
    )
    alone = be.generate(["a photo of a red sandal on grass"], [11], steps, g, (size, size))
    again = be.generate(["a photo of a red sandal on grass"], [11], steps, g, (size, size))
    out["repeat_equal"] = bool(np.array_equal(alone, again))
    out["batch_vs_alone_max_abs_diff"] = int(np.abs(pair[0].astype(int) - alone[0]).max())
    rates = {}
    for bs in (1, 8, 32):
        prompts, seeds = ["a photo of a red sandal on grass"] * bs, list(range(bs))
        be.generate(prompts, seeds, steps, g, (size, size))
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            n += len(be.generate(prompts, seeds, steps, g, (size, size)))
        rates[bs] = round(n / (time.perf_counter() - t), 2)
    out["images_per_s_by_batch"] = rates
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--backend",
        default="world",
        help="world | null | diffusers:MODEL_OR_DIR (a tiny one: python tests/tiny_sd.py DIR)",
    )
    p.add_argument(
        "--requests", type=int, default=16, help="timed requests in the throughput phase"
    )
    p.add_argument(
        "--concurrency", type=int, default=4, help="requests merged per batch (clients: twice this)"
    )
    p.add_argument("--per-request", type=int, default=8, help="images per request")
    p.add_argument(
        "--size", type=int, default=None, help="default: 512 for diffusers on CUDA, else 32"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="default: 25 for diffusers on CUDA, 8 on CPU"
    )
    p.add_argument("--overhead-requests", type=int, default=200)
    p.add_argument("--overload-requests", type=int, default=64)
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument(
        "--skip", default="", help="comma list of phases to skip: throughput,overhead,overload"
    )
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument(
        "--direct-only",
        action="store_true",
        help="no Ray: measure the backend alone (device check)",
    )
    p.add_argument(
        "--max-seconds", type=int, default=900, help="abort the whole benchmark after this long"
    )
    return p


def _backend_params(a) -> tuple[dict, int, int]:
    """(backend options, size, steps) for the chosen backend on this machine."""
    if not a.backend.startswith("diffusers:"):
        return {}, a.size or 32, a.steps or 1
    import torch

    cuda = torch.cuda.is_available()
    # one intra-op thread per process on CPU: the driver and the replica share the cores
    options = {} if cuda else {"num_threads": 1}
    return options, a.size or (512 if cuda else 32), a.steps or (25 if cuda else 8)


def _machine() -> dict:
    from audit import versions

    return {"machine": machine_record(), "versions": versions()}


def _phases(a, options: dict, size: int, steps: int) -> dict:
    """The three phases against one Serve on a free loopback port (started and stopped here)."""
    import ray
    from ray import serve

    from serve.main import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(
        num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    def run_app(app, name):
        serve.run(app, name=name, route_prefix=f"/{name}")

    results = _machine()
    skip = set(filter(None, a.skip.split(",")))
    spec = a.backend
    try:
        if "throughput" not in skip:
            results["throughput"] = throughput(
                url, spec, options, a.requests, a.concurrency, a.per_request, size, steps, run_app
            )
            results["throughput"].update(size=size, steps=steps)
            serve.delete("tp")
            print("throughput:", json.dumps(results["throughput"]), flush=True)
        if "overhead" not in skip:
            results["overhead"] = overhead(url, a.overhead_requests, run_app)
            serve.delete("oh")
            print("overhead:", json.dumps(results["overhead"]), flush=True)
        if "overload" not in skip:
            results["overload"] = overload(url, a.overload_requests, 32, run_app)
            print("overload:", json.dumps(results["overload"]), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def main(argv: list[str] | None = None) -> dict:
    a = _parser().parse_args(argv)
    import signal

    def _abort(*_):
        raise TimeoutError(
            f"bench_serve: over --max-seconds={a.max_seconds}; lower --requests or --per-request"
        )

    signal.signal(signal.SIGALRM, _abort)
    signal.alarm(a.max_seconds)
    options, size, steps = _backend_params(a)
    if a.direct_only:
        res = {"backend": a.backend, "size": size, "steps": steps}
        res |= direct_only(a.backend, options, size, steps)
    else:
        res = _phases(a, options, size, steps)
    print(json.dumps(res, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
