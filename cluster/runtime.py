"""Connecting to Ray once per run, and keeping its log lines out of the console.

Without ``verbose``, Ray's and Serve's own log lines go to ``LOG_DIR/ray.log`` (in the
run directory) instead of the terminal, and worker output is not forwarded to the
driver; with ``verbose`` everything shows as Ray prints it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from audit.pipeline.interrupt import keep_handlers

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
    ray = _import_ray()
    if ray.is_initialized():
        return False
    quiet_ray_logs(log_dir, verbose)
    address = address or os.environ.get("RAY_ADDRESS") or None
    kw = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    with keep_handlers():  # ray.init replaces the SIGTERM handler with its own sys.exit
        if address:
            ray.init(address=address, **kw)
        else:
            with _sessions_of_their_own(ray):
                ray.init(num_cpus=num_cpus or None, include_dashboard=False, **kw)
            reap_with_driver()
    quiet_ray_logs(log_dir, verbose)  # ray.init may have (re)installed its handlers
    return True


def _import_ray():
    """``import ray`` without Ray's C++ failure-signal handler in this driver: with it, SIGTERM
    during ``ray.init`` printed a C++ stack dump and aborted instead of stopping the run (the
    variable is read once, on import, and not passed on to the processes Ray starts)."""
    import sys

    if "ray" in sys.modules:
        return sys.modules["ray"]
    key = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"
    old = os.environ.get(key)
    os.environ[key] = "1"
    try:
        import ray
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
    return ray


@contextlib.contextmanager
def _sessions_of_their_own(ray) -> Iterator[None]:
    """The embedded Ray's processes (gcs, raylet and, through the raylet, its workers) start in a
    session of their own. In the driver's process group, Ctrl-C or SIGTERM sent to the run's
    group reached them too: they died under the driver, which then waited half a minute on a
    dead GCS instead of stopping. Now only the driver gets the signal; it records the stage as
    interrupted and shuts its Ray down (if it is killed outright, the watchdog and Ray's own
    fate sharing take them). Best effort: without Ray's ``ConsolePopen`` nothing changes."""
    services = getattr(ray._private, "services", None)
    popen = getattr(services, "ConsolePopen", None)
    if popen is None:
        yield
        return

    class _Detached(popen):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("start_new_session", True)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = _Detached
    try:
        yield
    finally:
        services.ConsolePopen = popen


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
