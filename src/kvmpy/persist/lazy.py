"""Lazy restore: guest RAM starts empty and each chunk is read from the snapshot the first time
anything touches it (the guest, KVM on the guest's behalf, or the VMM).

The page-fault handler runs in a forked child process, not in a thread. A thread would need
the GIL to serve a fault, and the VMM's own accesses to guest memory (a hypercall reading a
string, a device reading a buffer) fault while holding the GIL: measured here, the first such
access to an unserved page hangs the VMM for good. The child has its own interpreter state and
serves faults while the parent is blocked anywhere (Firecracker, too, serves faults from a
separate process). It is forked rather than spawned so it runs at once (no interpreter start).

On a fault the child reads the whole chunk (CHUNK_PAGES pages, the prefetch unit) around the
page, checks each extent's CRC, and copies the extents in with UFFDIO_COPY; a page that no
extent holds was zero in the snapshot and gets UFFDIO_ZEROPAGE. Counters live in a shared
anonymous page the parent reads.

If the child fails (a chunk that does not match its checksum, an unreadable file) or dies,
it leaves its error in the shared page and exits; its exit closes the last reference to the
userfaultfd (the parent closed its own right after the fork), so nothing can stay blocked on a
fault, and the parent's SIGCHLD handler stops the VM with that error.
"""

from __future__ import annotations

import ctypes as C
import gc
import logging
import mmap
import os
import select
import signal
import socket
import struct
import threading
import time
import weakref
import zlib
from collections import defaultdict
from collections.abc import Callable

from ..memory import PAGE_SIZE, GuestMemory
from . import memfile
from .errors import SnapshotError
from .format import Snapshot
from .uffd import MSG_SIZE, UFFD_EVENT_PAGEFAULT, Userfaultfd

log = logging.getLogger(__name__)

# Shared status page: counters, then an error message.
_COUNTERS = struct.Struct("<8Q")
_FAULTS, _COPIED, _ZEROED, _CHUNKS, _FIRST_NS, _STATE, _POPULATED, _PID = range(8)
_ERROR_AT = 256
STATE_RUNNING, STATE_FAILED = 0, 2

PR_SET_PDEATHSIG = 1
_MSG = struct.Struct("<B7xQQ8x")  # uffd_msg: event, then pagefault.flags, pagefault.address

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
    """Serves `memory` from `snap` on first touch. Create it before the vCPU state is set
    (KVM_SET_MSRS may already touch guest memory) and close it after the VM is done."""

    def __init__(
        self,
        memory: GuestMemory,
        snap: Snapshot,
        on_error: Callable[[str], None] | None = None,
    ):
        if threading.current_thread() is not threading.main_thread():
            # Without the SIGCHLD handler a dead handler process would go unnoticed and the
            # guest would read zero pages where its memory should be.
            raise SnapshotError("a lazy restore must be set up from the main thread")
        self.memory = memory
        self.closed = False
        self.on_error = on_error
        self._expect_exit = False
        self.pid = 0
        self._status = mmap.mmap(-1, PAGE_SIZE)  # anonymous and MAP_SHARED: seen by both
        uffd = Userfaultfd.open()
        try:
            regions = [(r.hva, r.size, base) for r, base in memfile.logical_layout(memory)]
            for hva, size, _ in regions:
                uffd.register(hva, size)
            by_chunk: dict[int, list[memfile.Extent]] = defaultdict(list)
            for e in snap.extents:
                by_chunk[e.page // memfile.CHUNK_PAGES].append(e)
            self._ctrl, child_ctrl = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            # Every page either process writes after the fork is copied first (copy-on-write);
            # a garbage collection would write to every tracked object. Freezing them keeps
            # the collector off the pages the two processes share.
            gc.freeze()
            # Installed before the fork, so a child that dies at once is noticed too.
            self._old_sigchld = signal.signal(signal.SIGCHLD, self._child_changed)
            self.pid = os.fork()
            if self.pid == 0:  # the handler process; it never returns
                code = 1
                try:
                    self._ctrl.close()
                    code = _Handler(
                        uffd, child_ctrl, regions, snap.memory_fd, by_chunk, self._status
                    ).run()
                finally:
                    os._exit(code)
        finally:
            # The parent keeps no reference: if the child dies, the registration goes with it.
            uffd.close()
        child_ctrl.close()
        _active[memory] = self

    # --- parent side ---------------------------------------------------------------------------

    def _child_changed(self, signum, frame) -> None:
        if self._expect_exit or self.closed or self.pid <= 0:
            return
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid = self.pid
        if pid == self.pid:
            self.closed = True
            _active.pop(self.memory, None)
            if self.on_error is not None:
                self.on_error(self.error or "the lazy-restore page-fault handler process died")

    @property
    def error(self) -> str | None:
        counters = _COUNTERS.unpack_from(self._status)
        if counters[_STATE] != STATE_FAILED:
            return None
        raw = self._status[_ERROR_AT:]
        return raw[: raw.find(b"\0")].decode(errors="replace") or "unknown error"

    def stats(self) -> dict[str, int | None]:
        c = _COUNTERS.unpack_from(self._status)
        return {
            "pages_faulted": c[_FAULTS],
            "pages_copied": c[_COPIED],
            "pages_zeroed": c[_ZEROED],
            "chunks_loaded": c[_CHUNKS],
            "first_fault_ns": c[_FIRST_NS] or None,
            "populated_all": bool(c[_POPULATED]),
        }

    def populate_all(self) -> None:
        """Bring in every page still in the snapshot and stop watching for faults."""
        if self.closed:
            if self.error:
                raise SnapshotError(self.error)
            return
        try:
            self._ctrl.sendall(b"P")
            reply = self._ctrl.recv(1)
        except OSError:
            reply = b""
        if reply != b"D":
            raise SnapshotError(
                self.error or "the lazy-restore handler process did not finish loading memory"
            )

    def close(self) -> None:
        if self.pid <= 0:
            return
        self._expect_exit = True
        self.closed = True
        _active.pop(self.memory, None)
        self._ctrl.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        self.pid = 0
        signal.signal(signal.SIGCHLD, self._old_sigchld)


class _Handler:
    """The child process: reads uffd messages and serves them."""

    def __init__(self, uffd, ctrl, regions, snap_fd, by_chunk, status):
        self.uffd = uffd
        self.ctrl = ctrl
        self.regions = regions
        self.fd = snap_fd
        self.by_chunk = by_chunk
        self.loaded: set[int] = set()
        self.status = status
        self.counters = [0] * 8
        self.buf = (C.c_char * memfile.CHUNK_BYTES)()
        self.buf_addr = C.addressof(self.buf)
        self.view = memoryview(self.buf).cast("B")

    def run(self) -> int:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        try:
            from ..kvm._sys import libc

            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() == 1:
                return 0
            self.counters[_PID] = os.getpid()
            self._loop()
            return 0
        except Exception as e:  # the parent reports it; there is no one else to tell
            msg = str(e) if isinstance(e, SnapshotError) else f"lazy restore failed: {e!r}"
            self.counters[_STATE] = STATE_FAILED
            self._publish()
            data = msg.encode()[: PAGE_SIZE - _ERROR_AT - 1] + b"\0"
            self.status[_ERROR_AT : _ERROR_AT + len(data)] = data
            return 1

    def _publish(self) -> None:
        _COUNTERS.pack_into(self.status, 0, *self.counters)

    def _loop(self) -> None:
        poller = select.poll()
        ufd, cfd = self.uffd.fd, self.ctrl.fileno()
        poller.register(ufd, select.POLLIN)
        poller.register(cfd, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == cfd:
                    cmd = self.ctrl.recv(16)
                    if not cmd:
                        return
                    if b"P" in cmd:
                        self._populate_all()
                        self.ctrl.sendall(b"D")
                    continue
                try:
                    data = os.read(ufd, MSG_SIZE * 64)
                except BlockingIOError:
                    continue
                for event, _flags, address in _MSG.iter_unpack(data):
                    if event == UFFD_EVENT_PAGEFAULT:
                        self._fault(address)

    def _where(self, address: int) -> tuple[int, int, int]:
        """(region hva, region size, logical page) of a faulting address."""
        for hva, size, base in self.regions:
            if hva <= address < hva + size:
                return hva, size, (base + address - hva) // PAGE_SIZE
        raise SnapshotError(f"lazy restore: a fault at {address:#x} outside guest memory")

    def _hva(self, page: int) -> int:
        offset = page * PAGE_SIZE
        for hva, size, base in self.regions:
            if base <= offset < base + size:
                return hva + offset - base
        raise SnapshotError(f"lazy restore: logical page {page} is outside guest memory")

    def _fault(self, address: int) -> None:
        if not self.counters[_FIRST_NS]:
            self.counters[_FIRST_NS] = time.monotonic_ns()
        self.counters[_FAULTS] += 1
        hva, size, page = self._where(address)
        chunk = page // memfile.CHUNK_PAGES
        if chunk not in self.loaded:
            self._load_chunk(chunk)
        in_snapshot = any(e.page <= page < e.page + e.pages for e in self.by_chunk.get(chunk, ()))
        # A page no extent holds was zero in the snapshot (or never touched): a zero page.
        if not in_snapshot and self.uffd.zeropage(address & ~(PAGE_SIZE - 1), PAGE_SIZE, False):
            self.counters[_ZEROED] += 1
        # Wake everything that waits in this chunk: its pages are all there now.
        page_hva = address & ~(PAGE_SIZE - 1)
        in_chunk = page % memfile.CHUNK_PAGES
        start = max(hva, page_hva - in_chunk * PAGE_SIZE)
        end = min(hva + size, page_hva + (memfile.CHUNK_PAGES - in_chunk) * PAGE_SIZE)
        self._publish()  # before the wake: whoever faulted may read the counters at once
        self.uffd.wake(start, end - start)

    def _load_chunk(self, chunk: int) -> None:
        for e in self.by_chunk.get(chunk, ()):
            view = self.view[: e.size]
            got = os.preadv(self.fd, [view], e.offset)
            if got != e.size:
                raise SnapshotError(
                    f"the snapshot's memory file is truncated at page {e.page + got // PAGE_SIZE}"
                )
            if zlib.crc32(view) != e.crc:
                raise SnapshotError(
                    f"the snapshot's memory is corrupted: pages {e.page}-{e.page + e.pages - 1} "
                    "do not match their checksum; the restored VM was stopped"
                )
            dst, src, left = self._hva(e.page), self.buf_addr, e.size
            while left:
                n = self.uffd.copy(dst, src, left, wake=False)
                self.counters[_COPIED] += n // PAGE_SIZE
                if n < left:  # that page exists already (the VMM wrote it): skip it
                    n += PAGE_SIZE
                dst, src, left = dst + n, src + n, left - n
        self.loaded.add(chunk)
        self.counters[_CHUNKS] += 1

    def _populate_all(self) -> None:
        for chunk in sorted(set(self.by_chunk) - self.loaded):
            self._load_chunk(chunk)
        for hva, size, _ in self.regions:
            self.uffd.wake(hva, size)
            # Pages that were zero now fault the normal way (a fresh shmem page).
            self.uffd.unregister(hva, size)
        self.counters[_POPULATED] = 1
        self._publish()
