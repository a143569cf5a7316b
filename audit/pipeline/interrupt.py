"""Stopping a run on Ctrl-C (SIGINT) or SIGTERM: the stage is recorded as interrupted and the
next run resumes.

Python turns SIGINT into ``KeyboardInterrupt`` only when the process did not inherit it
ignored; a run started in the background of a script (``zoo-audit run ... &`` without job
control) inherits SIGINT ignored, so Ctrl-C sent to its process group did nothing and the run
finished. :func:`stop_on_signals` therefore installs its own handler for SIGINT and SIGTERM
(whatever was inherited) that raises :class:`Interrupted`. ``ray.init`` replaces the SIGTERM
handler with its own (``sys.exit``); :func:`keep_handlers` puts ours back around such calls.
A library may also turn the ``KeyboardInterrupt`` raised inside it into an error of its own:
:func:`received` says whether a signal came in, so the runner still reports an interruption.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_STATE: dict = {"received": None, "installed": False}


class Interrupted(KeyboardInterrupt):
    """The run was stopped by signal ``signum``; a shell's exit code for it is ``exit_code``."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _handler(signum: int, frame) -> None:
    _STATE["received"] = signum
    raise Interrupted(signum)


def received() -> int | None:
    """The signal that arrived inside the :func:`stop_on_signals` block now running, or None."""
    return _STATE["received"] if _STATE["installed"] else None


def signal_of(e: BaseException) -> int | None:
    """The signal behind ``e`` when it (or the run) was interrupted, else None."""
    if isinstance(e, Interrupted):
        return e.signum
    # a library (Ray's ``ray.get``) may raise a plain KeyboardInterrupt for a SIGTERM we handled
    got = received()
    return got if got is not None or not isinstance(e, KeyboardInterrupt) else int(signal.SIGINT)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (a
    no-op in other threads, where Python cannot handle signals); the old handlers come back
    at the end."""
    if not _main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in SIGNALS}
    _STATE.update(received=None, installed=True)
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    except KeyboardInterrupt as e:
        got = _STATE["received"]
        if isinstance(e, Interrupted) or got is None:
            raise
        raise Interrupted(got) from e  # the signal that came, not always SIGINT
    finally:
        _STATE.update(received=None, installed=False)
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextlib.contextmanager
def keep_handlers() -> Iterator[None]:
    """Around a call that installs signal handlers of its own (``ray.init``): ours are put back
    after it, and its SIGTERM handler's ``sys.exit(SIGTERM)`` becomes :class:`Interrupted`."""
    if not (_main_thread() and _STATE["installed"]):
        yield
        return
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    try:
        yield
    except SystemExit as e:
        if e.code == signal.SIGTERM:
            _STATE["received"] = int(signal.SIGTERM)
            raise Interrupted(signal.SIGTERM) from None
        raise
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
