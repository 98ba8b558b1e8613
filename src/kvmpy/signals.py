"""SIGINT and SIGTERM, handled the same way everywhere: a running VM stops (stop reason
`interrupted`), the command says so in one line, prints its summary or JSON if asked, removes
its sockets, and exits with 128 + the signal number (130, 143), as a shell would report it.

Both are set explicitly, whatever the process inherited: a shell starts `kvmpy ... &` from a
script with SIGINT ignored, and Python keeps an ignored SIGINT ignored.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived where no VM was running to stop (building, waiting)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signum)
        self.signum = signum


def describe(signum: int) -> str:
    if signum == signal.SIGINT:
        return "interrupted (SIGINT, Ctrl-C)"
    return f"interrupted ({signal.Signals(signum).name})"


def exit_status(e: BaseException | int | None) -> int:
    """128 + the signal number, for an Interrupted, a plain KeyboardInterrupt or a number."""
    if isinstance(e, int):
        return 128 + e
    return 128 + int(getattr(e, "signum", signal.SIGINT))


def _raise(signum, frame) -> None:
    raise Interrupted(signum)


def install() -> None:
    """Make SIGINT and SIGTERM raise Interrupted (main thread only): the CLI's default."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise)


@contextlib.contextmanager
def handled(on_signal: Callable[[int], None]) -> Iterator[None]:
    """Call `on_signal(signum)` (from the signal handler) for SIGINT and SIGTERM meanwhile."""
    old = {sig: signal.signal(sig, lambda signum, frame: on_signal(signum)) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
