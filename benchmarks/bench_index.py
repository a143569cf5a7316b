"""Query latency and recall@100 of the FAISS index kinds versus exact search.

    python benchmarks/bench_index.py --sizes 100000 1000000 --dim 512

For each size: random unit vectors (``--data gaussian``: i.i.d., the hardest case for any
partitioning index; ``clustered``: a Gaussian mixture, closer to real embeddings), the
exact ``IndexFlatIP`` baseline, then HNSW and IVF-Flat at several search breadths. Per
configuration: build seconds, single-query latency p50/p99 (one query per call, after a
warm-up), batched throughput, and recall@k against the exact top-k on the same queries.
Prints a table and writes JSON (machine, versions, thread count) with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
from _common import ratio


def make_data(n: int, d: int, kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    centres = (
        rng.standard_normal((max(1, n // 1000), d)).astype(np.float32)
        if kind == "clustered"
        else None
    )
    for i in range(0, n, 100_000):  # chunks keep the float64 temporaries small
        m = min(100_000, n - i)
        x = rng.standard_normal((m, d), dtype=np.float32)
        if centres is not None:
            x = centres[rng.integers(0, len(centres), m)] + 0.5 * x
        out[i : i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def make_queries(x: np.ndarray, n: int, seed: int = 1) -> np.ndarray:
    """Perturbed database vectors: a query has real near neighbours, as a caption does."""
    rng = np.random.default_rng(seed)
    q = x[rng.choice(len(x), n, replace=False)] + 0.5 * rng.standard_normal((n, x.shape[1])).astype(
        np.float32
    ) / np.sqrt(x.shape[1])
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def latency(
    index, queries: np.ndarray, k: int, params=None, warmup: int = 20
) -> tuple[float, float, float]:
    """(p50 ms, p99 ms) of single-query calls and batched queries per second."""
    kw = {} if params is None else {"params": params}
    for q in queries[:warmup]:
        index.search(q[None], k, **kw)
    times = []
    for q in queries:
        t = time.perf_counter()
        index.search(q[None], k, **kw)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    index.search(queries, k, **kw)
    qps = len(queries) / (time.perf_counter() - t)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3), qps


def _row(n: int, data: str, kind: str, param: str, build: float, lat: tuple, rec: float) -> dict:
    p50, p99, qps = lat
    return {
        "n": n,
        "data": data,
        "kind": kind,
        "param": param,
        "build_s": build,
        "p50_ms": p50,
        "p99_ms": p99,
        "qps": qps,
        "recall": rec,
    }


def _line(label: str, r: dict) -> str:
    return (
        f"  {label}p50 {r['p50_ms']:8.3f} ms  p99 {r['p99_ms']:8.3f} ms  {r['qps']:9.0f} q/s  "
        f"recall {r['recall']:.3f}"
    )


def _flat(x, q, k: int, n: int, data: str) -> dict:
    import faiss

    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    row = _row(n, data, "flat", "", 0.0, latency(flat, q, k), 1.0)
    print(_line("flat (exact)          ", row), flush=True)
    return row


def _hnsw(x, q, k: int, n: int, data: str, truth, ef_values) -> list[dict]:
    import faiss

    from audit.index import recall_at_k

    t = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 64
    hnsw.add(x)
    build = time.perf_counter() - t
    print(f"  hnsw M=32 efC=64 built in {build:.1f}s", flush=True)
    rows = []
    for ef in ef_values:
        params = faiss.SearchParametersHNSW(efSearch=max(ef, k))
        lat = latency(hnsw, q, k, params)
        rec = recall_at_k(hnsw.search(q, k, params=params)[1], truth)
        rows.append(_row(n, data, "hnsw", f"efSearch={max(ef, k)}", build, lat, rec))
        print(_line(f"hnsw efSearch={max(ef, k):<5d}    ", rows[-1]), flush=True)
    return rows


def _ivf(x, q, k: int, n: int, data: str, truth, nprobe_values, nlist: int) -> list[dict]:
    import faiss

    from audit.index import recall_at_k

    d = x.shape[1]
    nlist = int(nlist or max(1, np.sqrt(n)))
    t = time.perf_counter()
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    ivf.train(x[rng.choice(n, min(n, 39 * nlist), replace=False)])
    ivf.add(x)
    build = time.perf_counter() - t
    print(f"  ivf nlist={nlist} built in {build:.1f}s", flush=True)
    rows = []
    for npr in (p for p in nprobe_values if p <= nlist):
        params = faiss.SearchParametersIVF(nprobe=npr)
        lat = latency(ivf, q, k, params)
        rec = recall_at_k(ivf.search(q, k, params=params)[1], truth)
        rows.append(_row(n, data, "ivf", f"nlist={nlist},nprobe={npr}", build, lat, rec))
        print(_line(f"ivf nprobe={npr:<5d}         ", rows[-1]), flush=True)
    return rows


def run(
    n: int,
    d: int,
    data: str,
    k: int,
    n_queries: int,
    ef_values,
    nprobe_values,
    kinds,
    nlist: int = 0,
) -> list[dict]:
    """Exact search, then each index kind in ``kinds``, on ``n`` vectors of ``d`` dimensions."""
    from audit.index import exact_search

    t = time.perf_counter()
    x = make_data(n, d, data)
    q = make_queries(x, n_queries)
    print(
        f"\n== n={n:,} d={d} data={data}: generated in {time.perf_counter() - t:.1f}s", flush=True
    )
    t = time.perf_counter()
    _, truth = exact_search(x, q, k)
    print(f"exact ground truth for {n_queries} queries: {time.perf_counter() - t:.1f}s", flush=True)
    rows = [_flat(x, q, k, n, data)]
    if "hnsw" in kinds:
        rows += _hnsw(x, q, k, n, data, truth, ef_values)
    if "ivf" in kinds:
        rows += _ivf(x, q, k, n, data, truth, nprobe_values, nlist)
    return rows


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument(
        "--data", nargs="+", default=["gaussian", "clustered"], choices=["gaussian", "clustered"]
    )
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--ef", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 64, 128, 256])
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (0: sqrt(n))")
    p.add_argument("--kinds", nargs="+", default=["hnsw", "ivf"], choices=["hnsw", "ivf"])
    p.add_argument("--threads", type=int, default=0, help="OpenMP threads for faiss (0: all cores)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def _info(a) -> dict:
    import faiss

    info = {
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "threads": faiss.omp_get_max_threads(),
        "k": a.k,
        "queries": a.queries,
        "dim": a.dim,
    }
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def print_fastest(rows: list[dict], k: int) -> None:
    """Per size and data, the fastest index with recall >= 0.95, as a ratio to exact search."""
    best = {}
    for r in rows:
        if r["kind"] != "flat" and r["recall"] >= 0.95:
            key = (r["n"], r["data"])
            if key not in best or r["p50_ms"] < best[key]["p50_ms"]:
                best[key] = r
    print(f"\nFastest configuration with recall@{k} >= 0.95 (ratio = exact p50 / its p50):")
    for (n, data), r in sorted(best.items()):
        exact = next(x for x in rows if x["n"] == n and x["data"] == data and x["kind"] == "flat")
        print(
            f"  n={n:>9,} {data:9s} {r['kind']} {r['param']:22s} p50 {r['p50_ms']:.3f} ms  recall {r['recall']:.3f}  {ratio(exact['p50_ms'], r['p50_ms'])} faster than exact"
        )


def main(argv=None) -> int:
    a = _args(argv)
    import faiss

    if a.threads:
        faiss.omp_set_num_threads(a.threads)
    info = _info(a)
    print(json.dumps(info))
    rows = []
    for n in a.sizes:
        for data in a.data:
            rows += run(n, a.dim, data, a.k, a.queries, a.ef, a.nprobe, a.kinds, a.nlist)
    print_fastest(rows, a.k)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
