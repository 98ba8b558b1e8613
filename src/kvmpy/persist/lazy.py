"""Lazy restore, the VMM's side: guest RAM starts empty, registered with userfaultfd, and a
handler process (handler.py) brings each chunk in from the snapshot the first time anything
touches it: the guest, KVM on the guest's behalf (the instruction emulator, get_user_pages for
shadow paging), or the VMM itself.

The guest never runs on a page that did not pass its checksum. A handler that finds one (on a
fault, or in its background pass over the whole file) writes why on the status page and
signals this process; the SIGCHLD handler installed here (the main thread takes it) reads the
status page and stops the VM (VMM_ERROR with the handler's one-line message), which leaves a
kick pending on every vCPU thread, and only then tells the handler it may answer faults again
(with zero pages: `HandlerProcess.notify_stopped`): a vCPU released from a fault meets its
kick before it runs another guest instruction. `failure` keeps the message for the caller.
The VMM keeps no copy of the userfaultfd: the handler's guardian (handler.py) holds one, so a
killed handler's faults are not left pending for ever (KVM-PVM retries them in the kernel, out
of reach of any signal handler); the guardian, too, waits for the VMM's word before it answers
them. (If the guardian is killed too, the registration goes, the faults become zero pages, and
the VM is stopped when SIGCHLD is handled: the one case left.)
"""

from __future__ import annotations

import logging
import mmap
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable

from ..memory import GuestMemory
from . import handler as H
from . import memfile
from .errors import SnapshotError
from .format import Snapshot
from .uffd import Userfaultfd

log = logging.getLogger(__name__)

_active: weakref.WeakKeyDictionary[GuestMemory, LazyLoader] = weakref.WeakKeyDictionary()


def active(memory: GuestMemory) -> LazyLoader | None:
    """The lazy loader still serving `memory`, if any."""
    loader = _active.get(memory)
    return loader if loader is not None and not loader.closed else None


def settle(memory: GuestMemory) -> None:
    """Make every page of a lazily restored memory resident (before reading it from its memfd,
    as a snapshot or a migration does). A no-op for other memory."""
    loader = active(memory)
    if loader is not None:
        loader.populate_all()


#: How long a restore waits for the handler process to take its work.
READY_TIMEOUT_S = 10.0


class LazyLoader:
    """Serves `memory` from `snap` on first touch. Create it before the vCPU state is set and
    close it after the VM is done. `process` is a handler started earlier
    (`handler.HandlerProcess.start()`, so it is waiting when the restore begins); without one
    it is started here and the first fault waits for it to start (~30 ms)."""

    def __init__(
        self,
        memory: GuestMemory,
        snap: Snapshot,
        on_error: Callable[[str], None] | None = None,
        process: H.HandlerProcess | None = None,
        background: bool = True,
    ):
        if threading.current_thread() is not threading.main_thread():
            # Without the SIGCHLD handler a dead handler process would go unnoticed and the
            # guest would read zero pages where its memory should be.
            raise SnapshotError("a lazy restore must be set up from the main thread")
        self.memory = memory
        self.closed = False
        self.on_error = on_error
        #: Why the lazy restore failed (the handler's message), if it did.
        self.failure: str | None = None
        self._expect_exit = False
        self._old_sigchld = None
        self.process = process or H.HandlerProcess.start()
        status_fd = os.memfd_create("kvmpy-lazy-status", os.MFD_CLOEXEC)
        uffd = None
        try:
            os.ftruncate(status_fd, H.STATUS_SIZE)
            self._status = mmap.mmap(status_fd, H.STATUS_SIZE)
            uffd = Userfaultfd.open()
            regions = [(r.hva, r.size, base) for r, base in memfile.logical_layout(memory)]
            for hva, size, _ in regions:
                uffd.register(hva, size)
            self._old_sigchld = signal.signal(signal.SIGCHLD, self._child_changed)
            header = {"regions": regions, "chunk_pages": memfile.CHUNK_PAGES,
                      "background": background}  # fmt: skip
            if snap.located is not None:  # memory in a page store: its packs, page by page
                from .store import lazy_records

                header["store"] = str(snap.store)
                data_fds, index = snap.located.fds, lazy_records(snap.located)
            else:
                data_fds, index = [snap.memory_fd], snap.index
            self.process.setup(uffd.fd, status_fd, data_fds, header, index)
        except BaseException:
            self._expect_exit = True
            self.process.close()
            if self._old_sigchld is not None:
                signal.signal(signal.SIGCHLD, self._old_sigchld)
            raise
        finally:
            # The handler and its guardian hold the only copies now (module docstring).
            if uffd is not None:
                uffd.close()
            os.close(status_fd)
        self._wait_ready()
        _active[memory] = self

    def _wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until the handler has its work and its guardian: from then on the userfaultfd
        outlives the handler. Before, a handler killed with the descriptor still in flight on
        the socket would take the registration with it, and the guest would run on empty
        memory with no fault to stop it."""
        deadline = time.monotonic() + timeout
        while not H.COUNTERS.unpack_from(self._status)[H.READY]:
            if self.process.pid > 0:
                try:
                    done, _ = os.waitpid(self.process.pid, os.WNOHANG)
                except ChildProcessError:
                    done = self.process.pid
                if done:
                    self.process.pid = 0
                    self._give_up("the lazy-restore handler process died before it was ready")
            if time.monotonic() > deadline:
                self._give_up(f"the lazy-restore handler was not ready within {timeout:g} s")
            time.sleep(0.0002)

    def _give_up(self, message: str) -> None:
        self._expect_exit = True
        self.process.close()
        if self._old_sigchld is not None:
            signal.signal(signal.SIGCHLD, self._old_sigchld)
        self._status.close()
        raise SnapshotError(message)
        self._child_changed(signal.SIGCHLD, None)  # it may have died already

    def _child_changed(self, signum, frame) -> None:
        """SIGCHLD: the handler failed (it says so on the status page and signals) or died."""
        pid = self.process.pid
        if self._expect_exit or self.closed or pid <= 0:
            return
        error = self.error
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done, status = pid, 0
        if done == pid:
            self.process.pid = 0  # reaped
        elif error is None:
            return  # another child of this process
        if error is None and done == pid and self.stats()["populated_all"]:
            log.warning("the lazy-restore handler exited after loading all memory")
            return
        if error is None:
            how = f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else "exited"
            error = f"the lazy-restore handler process died ({how}); the restored VM was stopped"
        self.failure = error
        self.closed = True
        _active.pop(self.memory, None)
        if self.on_error is not None:
            self.on_error(error)  # stops the vCPUs: a kick is pending on each vCPU thread now
        # Only now may the handler (or the guardian of a dead one) resolve faults with zero
        # pages: a vCPU released by one meets its pending kick before running the guest.
        self.process.notify_stopped()

    @property
    def error(self) -> str | None:
        counters = H.COUNTERS.unpack_from(self._status)
        if counters[H.STATE] != H.STATE_FAILED:
            return None
        raw = self._status[H.ERROR_AT :]
        return raw[: raw.find(b"\0")].decode(errors="replace") or "unknown error"

    def stats(self) -> dict[str, int | bool | None]:
        c = H.COUNTERS.unpack_from(self._status)
        return {
            "pages_faulted": c[H.FAULTS],
            "pages_copied": c[H.COPIED],
            "pages_zeroed": c[H.ZEROED],
            "chunks_loaded": c[H.CHUNKS],
            "first_fault_ns": c[H.FIRST_NS] or None,
            "handler_ready_ns": c[H.READY] or None,
            "populated_all": bool(c[H.POPULATED]),
        }

    def populate_all(self) -> None:
        """Bring in every page still in the snapshot and stop watching for faults."""
        if self.closed:
            if self.error:
                raise SnapshotError(self.error)
            return
        try:
            self.process.sock.sendall(b"P")
            reply = self.process.sock.recv(1)
        except OSError:
            reply = b""
        if reply != b"D":
            raise SnapshotError(
                self.error or "the lazy-restore handler process did not finish loading memory"
            )

    def close(self) -> None:
        if self._expect_exit:
            return
        self._expect_exit = True
        self.closed = True
        _active.pop(self.memory, None)
        self.process.close()
        signal.signal(signal.SIGCHLD, self._old_sigchld)
