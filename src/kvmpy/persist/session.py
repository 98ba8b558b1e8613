"""A running machine that other threads can pause, inspect, snapshot and migrate.

The vCPU runs in the thread that calls `VmSession.run()` (the main thread, where kvmpy's
signal handling lives). Other threads (a control-channel connection, a migration) ask it to
pause, and the work that needs a stopped vCPU runs *in the vCPU thread*, inside
`Machine.run`'s `on_pause` hook, as a job: every vCPU ioctl then comes from the thread that owns
the vCPU, and the VM goes on as soon as the job returns (unless it is held paused).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ..machine import Machine
from ..result import RunResult, Stop
from .errors import ControlError

log = logging.getLogger(__name__)

#: How long pause() waits for the vCPU to leave KVM_RUN before giving up.
PAUSE_TIMEOUT_S = 10.0

# Signals the vCPU thread handles (Ctrl-C, --timeout, the lazy-restore handler's exit, kicks).
# A process-directed signal goes to any thread that does not block it, and Python runs its
# handlers only in the main thread; helper threads block them so they interrupt KVM_RUN.
VCPU_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGCHLD, signal.SIGUSR1}


def helper_thread(target: Callable[..., Any], *args, name: str) -> threading.Thread:
    """A daemon thread that leaves the vCPU thread's signals to it."""

    def body() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, VCPU_SIGNALS)
        target(*args)

    t = threading.Thread(target=body, name=name, daemon=True)
    t.start()
    return t


class VmSession:
    """One machine, run by `run()` in the calling thread, controlled from any other thread."""

    def __init__(self, machine: Machine):
        self.machine = machine
        self.state = "created"  # created, running, paused, stopped
        self.result: RunResult | None = None
        #: Filled in by operations for the final report (e.g. "migration").
        self.extra: dict[str, Any] = {}
        self.started_at: float | None = None
        #: time.monotonic() when the vCPU last left KVM_RUN for a pause.
        self.paused_at = 0.0
        self._cond = threading.Condition()
        self._jobs: deque[tuple[Callable[[], Any], Future]] = deque()
        self._held = False  # paused by request, until resume()
        self._in_pause = False
        self._end: Stop | None = None
        self._busy: str | None = None
        self._vcpu_thread: int | None = None
        #: Called (in the vCPU thread) just before the first KVM_RUN.
        self.before_first_run: Callable[[], None] | None = None

    # --- the vCPU thread -------------------------------------------------------------------------

    def run(self, timeout: float | None = None, handle_sigint: bool = False) -> RunResult:
        with self._cond:
            if self.state != "created":
                raise ControlError("this session has run already")
            self.state = "running"
            self._vcpu_thread = threading.get_ident()
            self._cond.notify_all()
        self.started_at = time.monotonic()
        if self.before_first_run is not None:
            self.before_first_run()
        try:
            result = self.machine.run(timeout, handle_sigint=handle_sigint, on_pause=self._on_pause)
        finally:
            with self._cond:
                self.state = "stopped"
                jobs, self._jobs = list(self._jobs), deque()
                self._cond.notify_all()
            for _fn, fut in jobs:
                fut.set_exception(ControlError("the VM stopped before the request could run"))
        result.extra.update(self.extra)
        self.result = result
        return result

    def _on_pause(self) -> Stop | None:
        vcpu_run = self.machine.vcpu.fd.run_struct
        self.paused_at = time.monotonic()
        with self._cond:
            self._in_pause = True
            self.state = "paused"
            self._cond.notify_all()
            try:
                while True:
                    while self._jobs:
                        fn, fut = self._jobs.popleft()
                        self._cond.release()
                        try:
                            if fut.set_running_or_notify_cancel():
                                try:
                                    fut.set_result(fn())
                                except BaseException as e:  # the caller gets it
                                    fut.set_exception(e)
                        finally:
                            self._cond.acquire()
                    if self._end is not None:
                        stop, self._end = self._end, None
                        return stop
                    if not self._held:
                        return None
                    if vcpu_run.immediate_exit:
                        # A signal handler asked for a stop (Ctrl-C, --timeout): let run() act
                        # on it; a held pause comes back here through the next request.
                        return None
                    self._cond.wait(0.1)
            finally:
                self._in_pause = False
                if self.state == "paused":
                    self.state = "running"
                self._cond.notify_all()

    # --- any other thread ------------------------------------------------------------------------

    def _check_caller(self) -> None:
        if threading.get_ident() == self._vcpu_thread:
            raise ControlError("the vCPU thread cannot wait for its own pause")

    def _ask_pause(self) -> None:
        if not self._in_pause:
            self.machine.vcpu.request_pause(kick=True)

    def pause(self) -> None:
        """Stop the vCPU and keep it stopped until `resume()`."""
        self._check_caller()
        with self._cond:
            self.check_live()
            self._held = True
            self._ask_pause()
            deadline = time.monotonic() + PAUSE_TIMEOUT_S
            while not self._in_pause:
                self.check_live()
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    raise ControlError("the vCPU did not stop within 10 s")

    def resume(self) -> None:
        with self._cond:
            self.check_live()
            self._held = False
            self._cond.notify_all()

    def call_paused(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run `fn()` in the vCPU thread while the vCPU is stopped; return its result (or raise
        its exception). The VM goes on afterwards unless it is held paused or `fn` ended the
        run with `end_run`."""
        self._check_caller()
        fut: Future = Future()
        with self._cond:
            self.check_live()
            self._jobs.append((fn, fut))
            self._ask_pause()
            self._cond.notify_all()
        return fut.result(timeout)

    @contextlib.contextmanager
    def exclusive(self, what: str):
        """Hold the session for one long operation (a migration) at a time."""
        with self._cond:
            if self._busy is not None:
                raise ControlError(f"{self._busy} is under way; try again when it is over")
            self._busy = what
        try:
            yield
        finally:
            with self._cond:
                self._busy = None

    def end_run(self, stop: Stop) -> None:
        """From a job: end the run with `stop` once the job returns."""
        self._end = stop

    def check_live(self) -> None:
        if self.state == "stopped":
            raise ControlError("the VM has stopped")
        if self.state == "created":
            raise ControlError("the VM has not started yet")

    @property
    def paused(self) -> bool:
        return self._in_pause and self._held

    def wait_started(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.state == "created":
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    raise ControlError("the VM did not start")

    def status(self) -> dict[str, Any]:
        m = self.machine
        stats = None
        with contextlib.suppress(IndexError):
            stats = m.vcpu.stats.to_dict()
        return {
            "state": "paused" if self.paused else self.state,
            "mode": m.mode.value,
            "memory": m.config.memory,
            "uptime_s": round(time.monotonic() - self.started_at, 3) if self.started_at else 0.0,
            "output_bytes": m.output_bytes,
            "exits": stats,
        }
