"""A machine's vCPUs, each in its own host thread, and the events that steer them.

As in Firecracker (`VcpuEvent`) each vCPU thread runs its backend vCPU's `run()` (KVM_RUN
releases the GIL, so the threads run guest code in parallel) and between runs obeys events:

* pause: every vCPU leaves the guest, completes its pending I/O and waits (`pause_all`
  returns once all have: the barrier a snapshot or a migration needs);
* call: a job runs in one vCPU's thread while it is out of the guest (reading or writing its
  state there, as KVM prefers vCPU ioctls from the vCPU's own thread);
* resume; and stop, for every vCPU at once.

A vCPU can also be *blocked* by the guest itself: a parked SMP secondary waiting to be started,
or a vCPU waiting in a blocking hypercall (kvmpy/smp.h's `smp_wait`). A blocked vCPU's thread
sleeps here, outside the guest, and costs no host CPU. Blocking is decided by `blocked(i)`
(the machine's SMP state), so the single-thread schedulers, which drive vCPUs without these
threads, see the same thing.

The first vCPU to stop (exit hypercall, fault, hlt) stops the machine: the others are kicked
out of the guest and their own stops are discarded. When every vCPU is blocked by the guest,
none can ever wake the others: the machine stops with `deadlock`.

`end()` lets every thread finish without stopping the machine (a later run continues it): a
driver that runs a machine for a while, such as the scheduler's threads baseline, uses it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from ..errors import KvmpyError
from ..hv.base import VcpuBackend
from ..hv.signals import vcpu_thread_signals
from ..result import Stop, StopReason

log = logging.getLogger(__name__)

#: How long pause_all waits for the vCPUs to leave the guest.
PAUSE_TIMEOUT_S = 10.0

#: What _wait_turn returns when the set ends without a stop.
_ENDED = Stop(StopReason.INTERRUPTED, 0, "the vCPU threads ended")

DEADLOCK_MESSAGE = (
    "deadlock: every vCPU is parked or waiting in a blocking hypercall, and none can wake "
    "the others"
)


class VcpuError(KvmpyError):
    """A vCPU event that cannot be carried out (the VM stopped, a pause timed out...)."""


class _Slot:
    """The thread of one vCPU and what the others know about it."""

    __slots__ = ("vcpu", "index", "thread", "state", "jobs")

    def __init__(self, vcpu: VcpuBackend):
        self.vcpu = vcpu
        self.index = vcpu.index
        self.thread: threading.Thread | None = None
        #: created, running (in or about to enter the guest), waiting (outside the guest:
        #: paused, blocked or serving jobs), stopped, ended (end(): finished, not stopped)
        self.state = "created"
        self.jobs: deque[tuple[Callable[[], Any], Future]] = deque()


class VcpuSet:
    def __init__(
        self,
        vcpus: Sequence[VcpuBackend],
        *,
        blocked: Callable[[int], bool] = lambda i: False,
        on_resume: Callable[[int], None] | None = None,
        name: str = "vm",
        thread_init: Callable[[int], None] | None = None,
        thread_exit: Callable[[int], None] | None = None,
    ):
        self._slots = [_Slot(v) for v in vcpus]
        self._blocked = blocked
        #: Called in vCPU i's thread each time it is about to re-enter the guest after waiting
        #: (the SMP layer loads a started secondary's registers there).
        self._on_resume = on_resume
        #: Called first (after the signal mask) and last in vCPU i's thread: a driver's own
        #: setup and accounting (CPU affinity, nice value, the thread's CPU time).
        self._thread_init = thread_init
        self._thread_exit = thread_exit
        self.name = name
        # Re-entrant: the main thread's signal handlers (Ctrl-C, --timeout) call request_stop,
        # which takes this lock, possibly while the interrupted main thread holds it.
        self._cond = threading.Condition(threading.RLock())
        self._held = False  # paused until resume()
        self._pausing = 0  # pause_all calls under way
        self._requested: Stop | None = None  # a stop asked for from outside
        self._end: Stop | None = None  # a stop for when the current pause ends
        self.first_stop: Stop | None = None
        self._ending = False  # end() was called
        self.started = False
        #: time.monotonic() when the last vCPU left the guest for the current pause.
        self.paused_at = 0.0

    # --- life cycle --------------------------------------------------------------------------

    def start(self, *, paused: bool = False) -> None:
        """Start the vCPU threads; with `paused` they wait outside the guest until `resume()`
        (a VM restored or configured paused never runs a single guest instruction before)."""
        with self._cond:
            if self.started:
                raise VcpuError("the vCPUs have been started already")
            self.started = True
            if paused:
                self._held = True
        for s in self._slots:
            s.state = "running"
            s.thread = threading.Thread(
                target=self._thread, args=(s,), name=f"{self.name}-vcpu{s.index}", daemon=True
            )
            s.thread.start()

    def wait(self, timeout: float | None = None) -> Stop | None:
        """Block (in a way signals interrupt, so Ctrl-C and --timeout handlers run) until the
        machine stopped; returns the stop, or None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._all_stopped():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                # A bounded wait: a signal handler's notify can race with this thread's own
                # sleep, so look again every 100 ms rather than rely on it alone.
                self._cond.wait(0.1 if left is None else min(left, 0.1))
        for s in self._slots:
            if s.thread is not None:
                s.thread.join()
        return self.first_stop

    def _all_stopped(self) -> bool:
        return all(s.state in ("stopped", "ended") for s in self._slots)

    @property
    def running(self) -> bool:
        return self.started and not self._all_stopped()

    # --- events from other threads --------------------------------------------------------

    def request_stop(self, stop: Stop) -> None:
        """Stop every vCPU with `stop` as the machine's reason (unless one stopped first).
        Safe from the main thread's signal handlers."""
        with self._cond:
            if self._requested is None:
                self._requested = stop
            self._cond.notify_all()
        for s in self._slots:
            s.vcpu.request_stop(stop.reason, stop.message, kick=True)

    def end(self, timeout: float | None = None) -> bool:
        """Bring every vCPU out of the guest and end its thread without stopping the machine
        (pending I/O completed; a later run goes on from there). Returns whether every thread
        ended within `timeout` (a vCPU that stopped the machine meanwhile has ended too)."""
        with self._cond:
            self._ending = True
            for s in self._slots:
                if s.state == "running":
                    s.vcpu.request_pause(kick=True)
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for s in self._slots:
            t = s.thread
            while t is not None and t.is_alive():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                t.join(0.05 if left is None else min(left, 0.05))
                # It may have been between two runs when the pause came: ask again.
                if t.is_alive() and s.state == "running":
                    s.vcpu.request_pause(kick=True)
        return True

    def end_run(self, stop: Stop) -> None:
        """While paused: the machine ends with `stop` once the pause is over (not before: the
        one who paused it may still be reading it, or handing it over)."""
        with self._cond:
            self._end = stop
            self._cond.notify_all()

    def pause_all(self, *, hold: bool = True, timeout: float = PAUSE_TIMEOUT_S) -> None:
        """Bring every vCPU out of the guest (pending I/O completed) and keep them out until
        `resume()` (with `hold`) or until the caller's `release()`."""
        self._check_caller()
        with self._cond:
            self._check_live()
            if hold:
                self._held = True
            self._pausing += 1
            for s in self._slots:
                if s.state == "running":
                    s.vcpu.request_pause(kick=True)
            deadline = time.monotonic() + timeout
            while any(s.state == "running" for s in self._slots):
                if self._all_stopped():
                    self._pausing -= 1
                    raise VcpuError("the VM stopped")
                left = deadline - time.monotonic()
                if left <= 0:
                    self._pausing -= 1
                    raise VcpuError(f"the vCPUs did not stop within {timeout:g} s")
                self._cond.wait(min(left, 0.1))
            self.paused_at = time.monotonic()

    def hold(self) -> None:
        """Pause every vCPU and keep them paused until `resume()`, without waiting: usable from
        a vCPU thread (a hypercall handler: "stop the world here"). `wait_paused` waits."""
        me = threading.current_thread()
        with self._cond:
            self._held = True
            for s in self._slots:
                if s.state == "running":
                    s.vcpu.request_pause(kick=s.thread is not me)
            self._cond.notify_all()

    def wait_paused(self, timeout: float = PAUSE_TIMEOUT_S) -> None:
        """Wait until every vCPU is out of the guest after `hold()` (not from a vCPU thread)."""
        self._check_caller()
        deadline = time.monotonic() + timeout
        with self._cond:
            while any(s.state == "running" for s in self._slots) or not self._held:
                if self._all_stopped():
                    raise VcpuError("the VM stopped")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VcpuError(f"the vCPUs did not stop within {timeout:g} s")
                self._cond.wait(min(left, 0.1))
            self.paused_at = time.monotonic()

    def release(self) -> None:
        """End a `pause_all(hold=False)`."""
        with self._cond:
            self._pausing = max(0, self._pausing - 1)
            self._cond.notify_all()

    def resume(self) -> None:
        with self._cond:
            self._held = False
            self._pausing = 0
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._held

    def call(self, index: int, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run `fn()` in vCPU `index`'s thread while it is out of the guest, and return its
        result (or raise its exception). Outside a pause the vCPU is paused for the job and
        goes on after it. Before start() or after the machine stopped, `fn` runs here."""
        slot = self._slots[index]
        if threading.current_thread() is slot.thread:
            return fn()
        fut: Future = Future()
        with self._cond:
            if slot.state in ("created", "stopped"):
                fut = None  # type: ignore[assignment]
            else:
                slot.jobs.append((fn, fut))
                if slot.state == "running":
                    slot.vcpu.request_pause(kick=True)
                self._cond.notify_all()
        if fut is None:
            return fn()
        return fut.result(timeout)

    def wake(self) -> None:
        """Re-check blocked vCPUs (the SMP layer started or released one)."""
        with self._cond:
            self._cond.notify_all()

    def cpu_times(self) -> list[float]:
        """Host CPU seconds each vCPU thread has used (guest time included), or 0.0 for one
        not started or gone: its thread's CPU-time clock, read without disturbing it."""
        out = []
        for s in self._slots:
            t = s.thread
            try:
                alive = t is not None and t.ident is not None and t.is_alive()
                out.append(
                    time.clock_gettime(time.pthread_getcpuclockid(t.ident)) if alive else 0.0
                )
            except OSError:  # the thread ended between the check and the read
                out.append(0.0)
        return out

    def states(self) -> list[str]:
        return [s.state for s in self._slots]

    def _check_caller(self) -> None:
        me = threading.current_thread()
        if any(s.thread is me for s in self._slots):
            raise VcpuError("a vCPU thread cannot wait for the vCPUs to pause")

    def _check_live(self) -> None:
        if not self.started:
            raise VcpuError("the VM has not started yet")
        if self._all_stopped() or self.first_stop is not None:
            raise VcpuError("the VM has stopped")

    # --- the vCPU thread --------------------------------------------------------------------

    def _thread(self, slot: _Slot) -> None:
        vcpu_thread_signals()
        vcpu = slot.vcpu
        stop: Stop | None = None
        try:
            if self._thread_init is not None:
                self._thread_init(slot.index)
            stop = self._wait_turn(slot)
            while stop is None:
                stop = vcpu.run()
                if stop is not None:
                    break
                vcpu.complete_pending_io()
                stop = self._wait_turn(slot)
        except KvmpyError as e:  # a device or handler gave up with a reason: that is the stop
            stop = Stop(StopReason.VMM_ERROR, 0, str(e), cpu=slot.index)
        except BaseException as e:  # a bug in the VMM: stop the machine, say what it was
            log.exception("vCPU %d thread failed", slot.index)
            stop = Stop(StopReason.VMM_ERROR, 0, f"vCPU {slot.index} thread failed: {e!r}",
                        cpu=slot.index)  # fmt: skip
        if self._thread_exit is not None:
            try:
                self._thread_exit(slot.index)
            except Exception:
                log.exception("vCPU %d thread's exit hook failed", slot.index)
        if stop is _ENDED:
            vcpu.cancel_pause()  # a pause that landed after its last run
            with self._cond:
                slot.state = "ended"
                self._cond.notify_all()
            return
        self._stopped(slot, stop)

    def _wait_turn(self, slot: _Slot) -> Stop | None:
        """Between two runs: serve jobs, wait out pauses and blocks. Returns a stop to end the
        thread, or None to enter the guest again."""
        i = slot.index
        with self._cond:
            while True:
                while slot.jobs:
                    fn, fut = slot.jobs.popleft()
                    slot.state = "waiting"
                    self._cond.notify_all()
                    if fut.set_running_or_notify_cancel():
                        try:
                            fut.set_result(fn())
                        except BaseException as e:  # the caller gets it
                            fut.set_exception(e)
                if self._requested is not None or self.first_stop is not None:
                    return self._requested or self.first_stop
                if self._ending:
                    return _ENDED
                if self._held or self._pausing or (self._end is None and self._blocked(i)):
                    if slot.state != "waiting":
                        slot.state = "waiting"
                        self._cond.notify_all()
                    if self._deadlocked():
                        self._requested = Stop(StopReason.DEADLOCK, 0, DEADLOCK_MESSAGE, cpu=i)
                        self._cond.notify_all()
                        continue
                    self._cond.wait(0.5)
                    continue
                if self._end is not None:
                    self._requested = self._end
                    return self._end
                break
            # A pause asked for before now has been served (or was a stray timer signal);
            # one asked for from here on sees "running" and is kept.
            slot.vcpu.cancel_pause()
            slot.state = "running"
            self._cond.notify_all()
        # Also when it never had to wait: a secondary started before its thread first got
        # here still has its start registers to load.
        if self._on_resume is not None:
            self._on_resume(i)
        return None

    def _deadlocked(self) -> bool:
        """Every vCPU out of the guest and blocked by the guest itself (under the lock): only a
        running vCPU can start, kick or release another, so nothing will ever run again."""
        if self._held or self._pausing or self._end is not None:
            return False
        for s in self._slots:
            if s.state == "stopped":
                continue
            if s.state != "waiting" or s.jobs or not self._blocked(s.index):
                return False
        return True

    def _stopped(self, slot: _Slot, stop: Stop) -> None:
        others = []
        with self._cond:
            if self.first_stop is None:
                self.first_stop = self._requested if self._requested is not None else stop
                others = [s for s in self._slots if s is not slot]
            slot.state = "stopped"
            jobs, slot.jobs = list(slot.jobs), deque()
            self._cond.notify_all()
        for _fn, fut in jobs:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(VcpuError("the VM stopped before the request could run"))
        for s in others:
            s.vcpu.request_stop(StopReason.INTERRUPTED, "the machine stopped", kick=True)
