"""The one place that decides which thread gets which signal.

Python runs signal handlers only in the main thread, and a process-directed signal goes to any
thread that does not block it. So: the main thread takes Ctrl-C (SIGINT), SIGTERM, --timeout
(SIGALRM) and child exits (SIGCHLD, the lazy-restore handler); every other thread blocks them.
vCPU threads additionally leave KICK_SIGNAL unblocked: a kick (`pthread_kill`) makes their
KVM_RUN return EINTR, the only way to stop a guest that never exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import threading

#: The signal a kick sends to interrupt KVM_RUN in a vCPU thread.
KICK_SIGNAL = signal.SIGUSR1
#: Handled by the main thread only.
MAIN_THREAD_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGCHLD})


def _ignore_kick(signum, frame) -> None:
    pass


def install_kick_handler() -> bool:
    """Give KICK_SIGNAL a no-op handler unless the program set its own (main thread only): an
    ignored signal would not interrupt the ioctl, a default one would kill the process.
    Returns whether a usable handler is in place."""
    if threading.current_thread() is not threading.main_thread():
        return signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, signal.SIG_IGN, None)
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(KICK_SIGNAL, _ignore_kick)
    return True


def vcpu_thread_signals() -> None:
    """Call first thing in a vCPU thread."""
    signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {KICK_SIGNAL})


def helper_thread_signals() -> None:
    """Call first thing in any other thread (I/O, control channel, event loop)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS | {KICK_SIGNAL, TIMER_SIGNAL})


def main_thread_signals() -> None:
    """A parent that spawned kvmpy from a thread blocking these would leave a VM that no
    timeout can stop: the CLI unblocks them at start."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, MAIN_THREAD_SIGNALS | {KICK_SIGNAL})


# --- timers aimed at one thread ----------------------------------------------------------------

#: The signal of ThreadTimer: a real-time signal nothing else in kvmpy uses (glibc keeps the
#: two below SIGRTMIN for itself).
TIMER_SIGNAL = signal.SIGRTMIN + 1

_CLOCK_MONOTONIC = 1
_SIGEV_THREAD_ID = 4


class _Sigevent(ctypes.Structure):
    # struct sigevent on 64-bit Linux: sigev_value, sigev_signo, sigev_notify, then a union
    # whose first member is the thread id for SIGEV_THREAD_ID (64 bytes in all).
    _fields_ = [
        ("sigev_value", ctypes.c_uint64),
        ("sigev_signo", ctypes.c_int),
        ("sigev_notify", ctypes.c_int),
        ("tid", ctypes.c_int),
        ("_pad", ctypes.c_int * 11),
    ]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _librt(use_errno: bool):
    name = ctypes.util.find_library("c") or "libc.so.6"
    lib = ctypes.CDLL(name, use_errno=use_errno)
    if hasattr(lib, "timer_create"):  # glibc 2.34 and later
        return lib
    return ctypes.CDLL(ctypes.util.find_library("rt") or "librt.so.1", use_errno=use_errno)


class ThreadTimer:
    """A one-shot CLOCK_MONOTONIC timer whose TIMER_SIGNAL goes to the thread that made it.

    ITIMER_REAL signals the process, and a process-directed signal may land in any thread that
    does not block it; and a signal that arrives just before KVM_RUN (its Python handler not
    run yet) is lost, leaving a guest that never exits running for good. So a driver that
    preempts vCPUs from its own thread (kvmpy.sched) aims a POSIX timer at that thread, keeps
    TIMER_SIGNAL blocked there and lets KVM unblock it only inside KVM_RUN
    (`VcpuBackend.set_run_signals`): a timer that expires before KVM_RUN stays pending and
    makes KVM_RUN return at once; no Python handler is involved. Call `drain()` after
    `disarm()` to drop an expiry that landed outside KVM_RUN.
    """

    def __init__(self) -> None:
        rt = _librt(use_errno=True)
        # timer_settime runs once per slice: no errno saving (it cannot fail on a valid
        # timer) and no argtypes (every argument is already a ctypes object or a small int;
        # ctypes' per-argument conversion and errno swap would double its cost).
        self._settime = _librt(use_errno=False).timer_settime
        self._create, self._delete = rt.timer_create, rt.timer_delete
        ev = _Sigevent(sigev_signo=int(TIMER_SIGNAL), sigev_notify=_SIGEV_THREAD_ID)
        ev.tid = threading.get_native_id()
        self._id = ctypes.c_void_p()
        if self._create(_CLOCK_MONOTONIC, ctypes.byref(ev), ctypes.byref(self._id)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timer_create: {os.strerror(err)}")
        self._spec = _Itimerspec()
        self._value = self._spec.it_value
        self._ref = ctypes.byref(self._spec)

    def arm(self, ns: int) -> None:
        """Fire once, `ns` nanoseconds from now (at least 1)."""
        value = self._value
        value.tv_sec, value.tv_nsec = divmod(max(int(ns), 1), 1_000_000_000)
        self._settime(self._id, 0, self._ref, None)

    def disarm(self) -> None:
        value = self._value
        value.tv_sec = value.tv_nsec = 0
        self._settime(self._id, 0, self._ref, None)

    @staticmethod
    def drain() -> bool:
        """Consume a pending TIMER_SIGNAL of the calling thread (it must block it); returns
        whether there was one."""
        return signal.sigtimedwait({TIMER_SIGNAL}, 0) is not None

    def close(self) -> None:
        if self._id is not None:
            self._delete(self._id)
            self._id = None  # type: ignore[assignment]


def _no_timer_handler(signum, frame) -> None:
    pass


def install_timer_handler() -> None:
    """Give TIMER_SIGNAL a no-op handler (main thread only): it is blocked wherever it is used,
    but a real-time signal's default action would kill the process, and an ignored one would
    not interrupt KVM_RUN."""
    if signal.getsignal(TIMER_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(TIMER_SIGNAL, _no_timer_handler)
