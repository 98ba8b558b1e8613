"""Lazy restore, the VMM's side: guest RAM starts empty, registered with userfaultfd, and a
handler process (handler.py) brings each chunk in from the snapshot the first time anything
touches it: the guest, KVM on the guest's behalf (the instruction emulator, get_user_pages for
shadow paging), or the VMM itself.

The VMM keeps no copy of the userfaultfd: if the handler fails (a chunk that does not match
its checksum, an unreadable file) or dies, its exit releases the registration, so nothing
stays blocked on a fault, and the SIGCHLD handler installed here stops the VM with the
handler's error.
"""

from __future__ import annotations

import logging
import mmap
import os
import signal
import threading
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
    ):
        if threading.current_thread() is not threading.main_thread():
            # Without the SIGCHLD handler a dead handler process would go unnoticed and the
            # guest would read zero pages where its memory should be.
            raise SnapshotError("a lazy restore must be set up from the main thread")
        self.memory = memory
        self.closed = False
        self.on_error = on_error
        self._reported = False
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
            header = {"regions": regions, "chunk_pages": memfile.CHUNK_PAGES}
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
            # The handler holds the only copies now: if it goes, the registration goes.
            if uffd is not None:
                uffd.close()
            os.close(status_fd)
        _active[memory] = self
        self._child_changed(signal.SIGCHLD, None)  # it may have died already

    def _child_changed(self, signum, frame) -> None:
        pid = self.process.pid
        if self._expect_exit or self.closed or pid <= 0:
            return
        # A failed check: the handler keeps the faults blocked until the vCPUs are told to
        # stop (handler.py, _hold_until_stopped), then exits.
        error = self.error
        if error is not None and not self._reported:
            self._report(error)
            self._status[H.STOPPING_AT] = 1
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done == pid:
            self.process.pid = 0  # reaped
            self.closed = True
            _active.pop(self.memory, None)
            self._report(self.error or "the lazy-restore handler process died")

    def _report(self, message: str) -> None:
        if not self._reported:
            self._reported = True
            if self.on_error is not None:
                self.on_error(message)

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
