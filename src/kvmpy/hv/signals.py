"""The one place that decides which thread gets which signal.

Python runs signal handlers only in the main thread, and a process-directed signal goes to any
thread that does not block it. So: the main thread takes Ctrl-C (SIGINT), SIGTERM, --timeout
(SIGALRM) and child exits (SIGCHLD, the lazy-restore handler); every other thread blocks them.
vCPU threads additionally leave KICK_SIGNAL unblocked: a kick (`pthread_kill`) makes their
KVM_RUN return EINTR, the only way to stop a guest that never exits.
"""

from __future__ import annotations

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
    signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS | {KICK_SIGNAL})


def main_thread_signals() -> None:
    """A parent that spawned kvmpy from a thread blocking these would leave a VM that no
    timeout can stop: the CLI unblocks them at start."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, MAIN_THREAD_SIGNALS | {KICK_SIGNAL})
