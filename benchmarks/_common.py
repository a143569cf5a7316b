"""What the benchmarks share: the machine and versions a figure was measured on, timing with
a warm-up and repeats, and a ratio against a baseline measured in the same run.

A benchmark run as ``python benchmarks/NAME.py`` imports it as ``_common`` (the script's own
directory is on the path); nothing outside ``benchmarks/`` imports it.
"""

from __future__ import annotations

import importlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any


def versions(*modules: str) -> dict[str, str]:
    """``{module: __version__}`` of the named modules, imported here (``sklearn``, ``torch``...)."""
    return {m: str(getattr(importlib.import_module(m), "__version__", "?")) for m in modules}


def machine_line(*modules: str, prefix: str = "machine:") -> str:
    """One line: the processor, the cores, python and the named modules' versions."""
    cpu = platform.processor() or platform.machine()
    libs = "".join(f", {m} {v}" for m, v in versions(*modules).items())
    return f"{prefix} {cpu}, {os.cpu_count()} cores; python {platform.python_version()}{libs}"


def machine_record() -> dict[str, Any]:
    """The machine as a JSON-ready dict (platform, cores, GPU when torch sees one, load)."""
    rec: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import torch

        rec["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        rec["gpu"] = None
    rec["load_avg_1m"] = os.getloadavg()[0]
    return rec


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)``."""
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def best_of(fn: Callable[[], float], repeats: int) -> float:
    """The smallest of ``repeats`` wall times that ``fn`` returns (``fn`` times itself)."""
    return min(fn() for _ in range(max(1, repeats)))


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 0) -> tuple[Any, float, int]:
    """``(last result, median seconds, runs timed)`` of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    runs = [timed(fn) for _ in range(max(1, repeats))]
    return runs[-1][0], statistics.median(s for _, s in runs), len(runs)


def ratio(baseline: float, new: float, fmt: str = ".1f") -> str:
    """``baseline / new`` as ``"12.3x"``: how many times faster ``new`` is than the baseline
    (pass throughputs the other way round)."""
    return f"{baseline / new:{fmt}}x"
