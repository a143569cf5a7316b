"""Connecting to Ray once per run, and keeping its log lines out of the console.

Without ``verbose``, Ray's and Serve's own log lines go to ``LOG_DIR/ray.log`` (in the
run directory) instead of the terminal, and worker output is not forwarded to the
driver; with ``verbose`` everything shows as Ray prints it.
"""

from __future__ import annotations

import logging
import os

RAY_LOGGERS = ("ray", "ray.serve", "ray.data", "ray.train", "ray.tune", "filelock")
_SETTINGS: dict = {"log_dir": None, "verbose": True}


def quiet_ray_logs(log_dir: str | None, verbose: bool) -> None:
    """Send Ray's driver-side loggers to ``log_dir/ray.log`` (or drop them below WARNING).

    Call :func:`requiet` after importing a Ray library that installs its own console
    handler on import (``ray.serve`` does)."""
    _SETTINGS.update(log_dir=log_dir, verbose=verbose)
    if verbose:
        return
    handler: logging.Handler
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        handler = logging.FileHandler(os.path.join(log_dir, "ray.log"))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.NullHandler()
    for name in RAY_LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
        lg.propagate = False


def requiet() -> None:
    """Apply the last :func:`quiet_ray_logs` settings again."""
    quiet_ray_logs(_SETTINGS["log_dir"], _SETTINGS["verbose"])


def connect(
    address: str | None = None,
    num_cpus: int | None = None,
    *,
    verbose: bool = False,
    log_dir: str | None = None,
) -> bool:
    """Join ``address`` (or ``$RAY_ADDRESS``), or start an embedded local Ray.

    Returns True when this call started (or joined) Ray, so the caller shuts it down.
    """
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    import ray

    if ray.is_initialized():
        return False
    quiet_ray_logs(log_dir, verbose)
    address = address or os.environ.get("RAY_ADDRESS") or None
    kw = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(num_cpus=num_cpus or None, include_dashboard=False, **kw)
        reap_with_driver()
    quiet_ray_logs(log_dir, verbose)  # ray.init may have (re)installed its handlers
    return True


def reap_with_driver() -> None:
    """Embedded Ray outlives a driver killed with SIGKILL by about a minute (its processes
    and its agents wait for heartbeats). A small watchdog in its own session kills this run's
    Ray processes (gcs, raylet, monitors, dashboard) and their children (agents, workers) as
    soon as the driver is gone. Best effort: without the process list (another Ray version)
    nothing is started. See :mod:`cluster.watchdog`."""
    import subprocess
    import sys

    try:
        import ray

        node = ray._private.worker._global_node  # the processes this driver started (no public API)
        pids = [str(p.process.pid) for procs in node.all_processes.values() for p in procs]
    except Exception:  # noqa: BLE001
        return
    if pids:
        subprocess.Popen(
            [sys.executable, "-m", "cluster.watchdog", str(os.getpid()), *pids],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
