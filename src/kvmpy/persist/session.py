"""A running machine that other threads can pause, inspect, snapshot and migrate.

The machine runs its vCPUs in their own threads (vmm/vcpus.py); `VmSession.run()` waits for the
end in the calling thread (the main thread, where kvmpy's signal handling lives). Other threads
(a control-channel connection, a migration) pause every vCPU at a barrier, do their work (each
vCPU's state is read in its own thread) and let the VM go on, or hand it over and end the run.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..hv.signals import helper_thread_signals
from ..ksm.usage import vm_memory
from ..machine import Machine
from ..result import RunResult, Stop
from ..stats import ExitStats
from ..vmm.vcpus import VcpuError
from .errors import ControlError

log = logging.getLogger(__name__)

#: How long pause() waits for the vCPUs to leave the guest before giving up.
PAUSE_TIMEOUT_S = 10.0


def helper_thread(target: Callable[..., Any], *args, name: str) -> threading.Thread:
    """A daemon thread that leaves the main thread's and the vCPU threads' signals to them."""

    def body() -> None:
        helper_thread_signals()
        target(*args)

    t = threading.Thread(target=body, name=name, daemon=True)
    t.start()
    return t


class VmSession:
    """One machine, run by `run()` in the calling thread, controlled from any other thread."""

    def __init__(self, machine: Machine):
        self.machine = machine
        self.state = "created"  # created, running, stopped
        self.result: RunResult | None = None
        #: Filled in by operations for the final report (e.g. "migration").
        self.extra: dict[str, Any] = {}
        self.started_at: float | None = None
        self._cond = threading.Condition()
        self._busy: str | None = None
        #: Called (in the calling thread) just before the vCPUs start.
        self.before_first_run: Callable[[], None] | None = None

    def run(
        self, timeout: float | None = None, handle_sigint: bool = False, paused: bool = False
    ) -> RunResult:
        with self._cond:
            if self.state != "created":
                raise ControlError("this session has run already")
            self.state = "running"
            self._cond.notify_all()
        self.started_at = time.monotonic()
        if self.before_first_run is not None:
            self.before_first_run()
        try:
            result = self.machine.run(timeout, handle_sigint=handle_sigint, paused=paused)
        finally:
            with self._cond:
                self.state = "stopped"
                self._cond.notify_all()
        result.extra.update(self.extra)
        self.result = result
        return result

    # --- any other thread ------------------------------------------------------------------

    def _started(self) -> None:
        """Wait (briefly) until the vCPU threads exist: `running` is set just before."""
        deadline = time.monotonic() + 5.0
        while not self.machine.running and self.state == "running":
            if time.monotonic() > deadline:
                raise ControlError("the VM did not start")
            time.sleep(0.001)

    def pause(self) -> None:
        """Stop every vCPU and keep them stopped until `resume()`."""
        self.check_live()
        self._started()
        try:
            self.machine.pause(hold=True, timeout=PAUSE_TIMEOUT_S)
        except VcpuError as e:
            raise ControlError(str(e)) from None

    def resume(self) -> None:
        self.check_live()
        try:
            self.machine.resume()
        except VcpuError as e:
            raise ControlError(str(e)) from None

    def call_paused(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` while every vCPU is out of the guest with its I/O completed; return its
        result (or raise its exception). The VM goes on afterwards unless it is held paused
        or `fn` ended the run with `end_run`."""
        self.check_live()
        self._started()
        try:
            self.machine.pause(hold=False, timeout=PAUSE_TIMEOUT_S)
        except VcpuError as e:
            raise ControlError(str(e)) from None
        try:
            return fn()
        finally:
            with contextlib.suppress(VcpuError):
                self.machine.release()

    @property
    def paused_at(self) -> float:
        """time.monotonic() when the last vCPU left the guest for the latest pause."""
        return self.machine.paused_at

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
        """From a paused call: end the run with `stop` once the vCPUs go on."""
        self.machine.end_run(stop)

    def check_live(self) -> None:
        if self.state == "stopped":
            raise ControlError("the VM has stopped")
        if self.state == "created":
            raise ControlError("the VM has not started yet")

    @property
    def paused(self) -> bool:
        return self.machine.paused

    def wait_started(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.state == "created":
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    raise ControlError("the VM did not start")

    def status(self) -> dict[str, Any]:
        m = self.machine
        per = [v.stats for v in list(m.vcpus)]
        d: dict[str, Any] = {
            "state": "paused" if self.paused and self.state == "running" else self.state,
            "mode": m.mode.value,
            "memory": m.config.memory,
            "vcpus": m.config.vcpus,
            "uptime_s": round(time.monotonic() - self.started_at, 3) if self.started_at else 0.0,
            "output_bytes": m.output_bytes,
            "exits": ExitStats.merged(per).to_dict() if per else None,
            "vcpu_time_s": [round(t, 6) for t in m.vcpu_cpu_times()],
        }
        if len(per) > 1:
            d["vcpu_exits"] = [s.to_dict() for s in per]
        d["mergeable"] = m.config.mergeable
        # What guest RAM occupies and shares (KSM) in this process: one VM per VMM process.
        d["ram"] = vm_memory(m.memory.regions)
        return d
