"""``zoo-audit serve``: the generation app on this machine, embedded Ray, until Ctrl-C."""

from __future__ import annotations

import socket
import sys
import time

from audit.store import RunStore
from serve.config import AUTH_OFF, ServeAppConfig, load_config


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at ``host`` now (for a service started on loopback by a
    test or a benchmark; the one helper for it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def startup_lines(cfg: ServeAppConfig, port: int) -> list[str]:
    """What ``zoo-audit serve`` prints when it is up; a loud warning first when auth is off."""
    auth = cfg.resolve_token_hash() is not None
    lines = [] if auth else [f"WARNING: {AUTH_OFF}"]
    return [
        *lines,
        f"zoo-audit serve: backend {cfg.backend}, store {RunStore(cfg.store).uri}, auth {'on' if auth else 'OFF'}",
        f"  listening on http://127.0.0.1:{port}  (GET /healthz, POST /v1/generate); Ctrl-C stops",
    ]


_CLI_DEFAULTS = {"backend": "world", "store": "runs/serve", "token_file": None}


def serve_main(args) -> None:
    """``zoo-audit serve``: start Ray embedded and the app on 127.0.0.1:PORT, block until Ctrl-C.

    With ``--config F`` the file's values hold unless a flag is given a non-default value.
    """
    import ray
    from ray import serve

    from serve.app import build_app

    over = {k: getattr(args, k, None) for k in _CLI_DEFAULTS}
    file_cfg = {"config": args.config} if getattr(args, "config", None) else {}
    if file_cfg:
        over = {k: v for k, v in over.items() if v != _CLI_DEFAULTS[k]}
    cfg = load_config({**file_cfg, **{k: v for k, v in over.items() if v is not None}})
    app = build_app(cfg)
    port = int(getattr(args, "port", 8000) or 8000)
    ray.init(include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name="zoo-audit", route_prefix="/")
    for line in startup_lines(cfg, port):
        print(line, file=sys.stderr if line.startswith("WARNING") else sys.stdout)
    import signal

    def _stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)  # `kill PID` shuts down as cleanly as Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
