"""Failure statistics at zoo scale: pairwise overlap, conditional failure and error
consistency, and a clustering of the models, for M models x N examples.

A synthetic failure matrix with family structure (models of one family share most of their
failures) is built bit-packed, then timed: the pair counts as blocked 0/1 matrix products
(``audit.stats_blocks.pair_counts``: int8 products through torch, or float32 through
scipy's BLAS with ``--method float32``; memory bounded by the block), the statistics of every
pair (``audit.failures``) and average-linkage clustering of the models. Peak memory is the
process's peak resident set (``ru_maxrss``): each size runs in a fresh process, so the
figure is that size's own, the packed matrix and the runtime (Python, numpy, torch's
libraries: ~700 MiB of this CUDA build) included; "above runtime" leaves the runtime out.

    python benchmarks/bench_overlap.py                                   # 40, 200, 1,000 models x 1e6
    python benchmarks/bench_overlap.py --models 1000 --examples 1000000  # one size; last line:
    # overlap 1000x1000000: <seconds> s, peak <MiB> MiB
    python benchmarks/bench_overlap.py --models 1000 --examples 1000000 --ray   # blocks as Ray tasks

Baseline, measured in the same run for sizes up to 200 models: the bit-packed AND + popcount
per pair that the counts used before (``--baseline`` forces or ``--no-baseline`` skips it).
Bootstrap intervals are not in the timing unless ``--n-boot`` is given (their cost is
n_boot x M^2 / 2 multinomial draws, computed in chunks of pairs that bound memory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
from _common import machine_line, ratio, timed


def synthetic_packed(m: int, n: int, n_families: int = 10, seed: int = 0) -> np.ndarray:
    """Bit-packed uint8 ``[M, 8 * ceil(N / 64)]``: each model fails on its family's ~12.5% of
    examples (keeping each with p = 7/8) plus ~6% of its own; padding bits 0."""
    rng = np.random.default_rng(seed)
    n_bytes, words = (n + 7) // 8, (n + 63) // 64
    packed = np.zeros((m, words * 8), np.uint8)

    def rand():
        return rng.integers(0, 256, n_bytes, dtype=np.uint8)

    bases = [rand() & rand() & rand() for _ in range(n_families)]
    for i in range(m):
        keep = rand() | rand() | rand()
        own = rand() & rand() & rand() & rand()
        packed[i, :n_bytes] = (bases[i % n_families] & keep) | own
    if n % 8:  # clear the bits past the last example
        packed[:, n_bytes - 1] &= np.uint8((0xFF << (8 - n % 8)) & 0xFF)
    return packed


def popcount_counts(packed: np.ndarray, block_words: int = 1 << 15) -> np.ndarray:
    """The baseline: AND + popcount of 64-bit words, pair row by pair row."""
    w = packed.view(np.uint64)
    m = w.shape[0]
    both = np.zeros((m, m), np.int64)
    for s in range(0, w.shape[1], block_words):
        blk = w[:, s : s + block_words]
        for i in range(m):
            both[i, i:] += np.bitwise_count(blk[i] & blk[i:]).sum(axis=1, dtype=np.int64)
    return np.triu(both) + np.triu(both, 1).T


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


ORACLE_KEYS = ("clusters_match_families", "kappa_within_family")  # against the planted families


def _statistics(packed: np.ndarray, m: int, n: int, block: int, executor, method: str, row):
    """Time the counts, the pair statistics and the clustering into ``row``; returns
    ``(n_fail, n_both, kappa, cluster labels)``."""
    from audit.failures import cluster_models, error_consistency, pair_rates
    from audit.stats_blocks import pair_counts

    (n_fail, n_both), row["counts_s"] = timed(
        lambda: pair_counts(packed, n, block, executor, method=method)
    )
    t = time.perf_counter()
    rates = pair_rates(n_fail, n_both)
    kappa = error_consistency(n_fail[:, None], n_fail[None, :], n_both, n)
    row["pair_stats_s"] = time.perf_counter() - t
    t = time.perf_counter()
    sim = np.nan_to_num(rates["jaccard"], nan=0.0)
    np.fill_diagonal(sim, 1.0)
    labels = cluster_models(sim, n_clusters=min(m, 10), method="average")
    row["cluster_s"] = time.perf_counter() - t
    return n_fail, n_both, kappa, labels


def _ray_executor():
    """``(executor, started)``: Ray tasks on RAY_ADDRESS or an embedded Ray started here."""
    from cluster.executor import RayExecutor
    from cluster.runtime import connect

    started = connect()
    return RayExecutor(), started


def one_size(
    m: int, n: int, block: int, use_ray: bool, n_boot: int, baseline: bool, method: str
) -> dict:
    import scipy.cluster.hierarchy  # noqa: F401 - imports count in the runtime, not the timed work

    from audit.failures import bootstrap_error_consistency
    from audit.stats_blocks import resolve_method

    # imports torch for int8: its libraries count in the runtime, not the work
    method = resolve_method(method)
    rss_runtime = peak_mib()
    packed, t_gen = timed(lambda: synthetic_packed(m, n))
    row = {"models": m, "examples": n, "method": method, "generate_s": t_gen}
    row |= {"rss_runtime_mib": rss_runtime, "rss_after_data_mib": peak_mib()}
    executor, started = _ray_executor() if use_ray else (None, False)
    t0 = time.perf_counter()
    n_fail, n_both, kappa, labels = _statistics(packed, m, n, block, executor, method, row)
    if n_boot:
        _, row["bootstrap_s"] = timed(
            lambda: bootstrap_error_consistency(n_fail, n_both, n, n_boot=n_boot)
        )
    row["total_s"] = time.perf_counter() - t0
    if use_ray and started:
        from cluster.runtime import shutdown

        shutdown()
    row["peak_mib"] = peak_mib()
    row["peak_above_runtime_mib"] = row["peak_mib"] - rss_runtime
    # the planted answer: models of one family (i % 10) land in one cluster
    fam = np.arange(m) % min(m, 10)
    row["clusters_match_families"] = bool(
        all(len(set(labels[fam == f])) == 1 for f in range(min(m, 10)))
    )
    row["kappa_within_family"] = float(np.nanmean(kappa[fam[:, None] == fam[None, :]]))
    if baseline:
        ref, row["baseline_counts_s"] = timed(lambda: popcount_counts(packed))
        assert np.array_equal(ref, n_both), "blocked counts differ from the popcount baseline"
    return row


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models", type=int, default=None, help="one size (default: 40, 200 and 1,000)"
    )
    ap.add_argument("--examples", type=int, default=1_000_000)
    ap.add_argument(
        "--block", type=int, default=1 << 15, help="examples per block (multiple of 64)"
    )
    ap.add_argument(
        "--method",
        default="auto",
        choices=["auto", "int8", "float32"],
        help="block product: int8 (torch) or float32 (scipy BLAS)",
    )
    ap.add_argument(
        "--ray", action="store_true", help="blocks as Ray tasks (RAY_ADDRESS or an embedded Ray)"
    )
    ap.add_argument(
        "--n-boot", type=int, default=0, help="also time bootstrap intervals with this many draws"
    )
    ap.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time the popcount baseline (default: up to 200 models)",
    )
    # one size, as JSON (the table's children)
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    return ap


def _child(a, m: int) -> dict:
    """One size in a fresh process (for its own peak memory): its JSON row."""
    cmd = [sys.executable, os.path.abspath(__file__), "--models", str(m)]
    cmd += ["--examples", str(a.examples), "--block", str(a.block), "--n-boot", str(a.n_boot)]
    cmd += ["--method", a.method, "--json"]
    if a.ray:
        cmd.append("--ray")
    if a.baseline is not None:
        cmd.append("--baseline" if a.baseline else "--no-baseline")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def scaling_table(a) -> None:
    """40, 200 and 1,000 models, each in a fresh process, with the baseline's ratio."""
    print(machine_line("numpy", prefix="#") + f"; block {a.block}, method {a.method}")
    print(
        f"{'models':>7} {'examples':>10} {'counts s':>9} {'pairs s':>8} {'cluster s':>9} {'total s':>8} "
        f"{'peak MiB':>9} {'above rt':>8} {'popcount s':>10} {'speedup':>7}"
    )
    for m in (40, 200, 1000):
        r = _child(a, m)
        base = r.get("baseline_counts_s")
        b_txt, speedup = ("-", "-") if base is None else (f"{base:.2f}", ratio(base, r["counts_s"]))
        print(
            f"{m:>7} {a.examples:>10,} {r['counts_s']:>9.2f} {r['pair_stats_s']:>8.2f} {r['cluster_s']:>9.2f} "
            f"{r['total_s']:>8.2f} {r['peak_mib']:>9.0f} {r['peak_above_runtime_mib']:>8.0f} {b_txt:>10} {speedup:>7}"
        )


def main(argv=None) -> None:
    a = _parser().parse_args(argv)
    if a.models is None:
        scaling_table(a)
        return
    baseline = a.baseline if a.baseline is not None else a.models <= 200
    r = one_size(a.models, a.examples, a.block, a.ray, a.n_boot, baseline, a.method)
    if a.json:
        print(json.dumps(r))
        return
    for k, v in r.items():
        label = "  (oracle: the synthetic matrix's planted families)" if k in ORACLE_KEYS else ""
        print((f"  {k:>24s}: {v:.3f}" if isinstance(v, float) else f"  {k:>24s}: {v}") + label)
    print(f"overlap {a.models}x{a.examples}: {r['total_s']:.1f} s, peak {r['peak_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
