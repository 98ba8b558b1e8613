"""The lazy-restore page-fault handler: a separate process that serves guest memory from a
snapshot, one chunk at a time, through userfaultfd (lazy.py is the VMM's side).

Why a process: a handler thread would need the GIL to serve a fault, and the VMM touches guest
memory while holding the GIL (a hypercall reading a string); tried here, the first such access
to an unserved page hung the VMM for good. A process has its own interpreter and serves
faults whoever takes them (Firecracker, too, serves them from a separate process).

Why spawned, and early: the handler is a fresh interpreter started with posix_spawn (no
copy-on-write link to the VMM, whose every write after a fork would first copy the page) and,
in `kvmpy restore --lazy`, started before the VMM imports its heavy modules, so it is waiting
by the time the restore begins. It imports nothing but the standard library and uffd.py.

Protocol on the unix socket it is started with: one setup message carrying three descriptors
(the userfaultfd, the snapshot's memory file, a shared status page) with a JSON header and the
snapshot's memory index; then b"P" (populate everything, answered with b"D"); EOF ends it.

On a fault it reads the whole chunk around the page (the prefetch unit), checks each extent's
CRC-32 and copies the extents in with UFFDIO_COPY; a page no extent holds was zero in the
snapshot and gets UFFDIO_ZEROPAGE. Its counters and, if it fails, its error message go to the
status page; a failure ends the process, which releases the userfaultfd (the VMM keeps no
copy), so nothing stays blocked, and the VMM's SIGCHLD handler stops the VM.
"""

from __future__ import annotations

import ctypes as C
import json
import mmap
import os
import select
import signal
import socket
import struct
import sys
import time
import zlib

from .errors import SnapshotError
from .uffd import MSG_SIZE, UFFD_EVENT_PAGEFAULT, Userfaultfd, libc

PAGE_SIZE = 4096
# The status page: counters, then (from ERROR_AT) a NUL-terminated error message.
COUNTERS = struct.Struct("<8Q")
FAULTS, COPIED, ZEROED, CHUNKS, FIRST_NS, STATE, POPULATED, READY = range(8)
ERROR_AT = 256
STATUS_SIZE = PAGE_SIZE
STATE_FAILED = 2
SETUP = struct.Struct("<II")  # JSON length, index length
EXTENT = struct.Struct("<QII")  # as memfile.EXTENT
MSG = struct.Struct("<B7xQQ8x")  # uffd_msg: event, pagefault.flags, pagefault.address
PR_SET_PDEATHSIG = 1


class HandlerProcess:
    """The VMM's handle on a handler process: start it, hand it its work, talk to it."""

    def __init__(self, pid: int, sock: socket.socket):
        self.pid = pid
        self.sock = sock

    @classmethod
    def start(cls) -> HandlerProcess:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            child.set_inheritable(True)
            code = "from kvmpy.persist.handler import main; main()"
            argv = [sys.executable, "-c", code, str(child.fileno()), str(os.getpid())]
            pid = os.posix_spawn(sys.executable, argv, os.environ)
        except OSError as e:
            parent.close()
            raise SnapshotError(f"cannot start the lazy-restore handler process: {e}") from None
        finally:
            child.close()
        return cls(pid, parent)

    def setup(self, uffd: int, memory_fd: int, status_fd: int, header: dict, index: bytes):
        head = json.dumps(header).encode()
        payload = SETUP.pack(len(head), len(index)) + head + index
        n = socket.send_fds(self.sock, [payload[: SETUP.size]], [uffd, memory_fd, status_fd])
        self.sock.sendall(payload[n:])

    def close(self) -> None:
        """End the process (it exits when its socket closes) and reap it."""
        if self.pid <= 0:
            return
        self.sock.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass  # reaped already (the SIGCHLD handler)
        self.pid = 0


def main() -> None:
    """Entry point of the handler process: argv = [socket fd, the VMM's pid]."""
    ready = time.monotonic_ns()  # started, imports done: from here it waits for its work
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the VMM's to handle
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    fd, parent = int(sys.argv[1]), int(sys.argv[2])
    if os.getppid() != parent:  # the VMM is gone already
        os._exit(0)
    sock = socket.socket(fileno=fd)
    try:
        head, fds, _, _ = socket.recv_fds(sock, SETUP.size, 3)
    except OSError:
        os._exit(0)
    if len(head) < SETUP.size or len(fds) != 3:
        os._exit(0)  # the VMM gave up before handing us anything
    uffd, memory_fd, status_fd = fds
    json_len, index_len = SETUP.unpack(head)
    rest = _recv_exact(sock, json_len + index_len)
    status = mmap.mmap(status_fd, STATUS_SIZE)
    handler = _Handler(Userfaultfd(uffd), sock, memory_fd, status, json.loads(rest[:json_len]),
                       rest[json_len:])  # fmt: skip
    handler.counters[READY] = ready
    os._exit(handler.run())


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            os._exit(0)
        buf += chunk
    return bytes(buf)


class _Handler:
    def __init__(self, uffd, sock, memory_fd, status, header: dict, index: bytes):
        self.uffd = uffd
        self.sock = sock
        self.fd = memory_fd
        self.status = status
        self.regions = [tuple(r) for r in header["regions"]]  # (hva, size, logical base)
        self.chunk_pages = header["chunk_pages"]
        self.by_chunk: dict[int, list[tuple[int, int, int]]] = {}
        for page, pages, crc in EXTENT.iter_unpack(index):
            self.by_chunk.setdefault(page // self.chunk_pages, []).append((page, pages, crc))
        self.loaded: set[int] = set()
        self.counters = [0] * 8
        self.buf = (C.c_char * (self.chunk_pages * PAGE_SIZE))()
        self.buf_addr = C.addressof(self.buf)
        self.view = memoryview(self.buf).cast("B")

    def run(self) -> int:
        try:
            self._publish()
            self._loop()
            return 0
        except Exception as e:  # the VMM reports it; there is no one else to tell
            msg = str(e) if isinstance(e, SnapshotError) else f"lazy restore failed: {e!r}"
            self.counters[STATE] = STATE_FAILED
            self._publish()
            data = msg.encode()[: STATUS_SIZE - ERROR_AT - 1] + b"\0"
            self.status[ERROR_AT : ERROR_AT + len(data)] = data
            return 1

    def _publish(self) -> None:
        COUNTERS.pack_into(self.status, 0, *self.counters)

    def _loop(self) -> None:
        poller = select.poll()
        ufd, cfd = self.uffd.fd, self.sock.fileno()
        poller.register(ufd, select.POLLIN)
        poller.register(cfd, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == cfd:
                    cmd = self.sock.recv(16)
                    if not cmd:
                        return
                    if b"P" in cmd:
                        self._populate_all()
                        self.sock.sendall(b"D")
                    continue
                try:
                    data = os.read(ufd, MSG_SIZE * 64)
                except BlockingIOError:
                    continue
                for event, _flags, address in MSG.iter_unpack(data):
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
        if not self.counters[FIRST_NS]:
            self.counters[FIRST_NS] = time.monotonic_ns()
        self.counters[FAULTS] += 1
        hva, size, page = self._where(address)
        chunk = page // self.chunk_pages
        if chunk not in self.loaded:
            self._load_chunk(chunk)
        extents = self.by_chunk.get(chunk, ())
        page_hva = address & ~(PAGE_SIZE - 1)
        # A page no extent holds was zero in the snapshot (or never touched): a zero page.
        if not any(p <= page < p + n for p, n, _ in extents) and self.uffd.zeropage(
            page_hva, PAGE_SIZE, wake=False
        ):
            self.counters[ZEROED] += 1
        # Wake everything that waits in this chunk: its pages are all there now.
        in_chunk = page % self.chunk_pages
        start = max(hva, page_hva - in_chunk * PAGE_SIZE)
        end = min(hva + size, page_hva + (self.chunk_pages - in_chunk) * PAGE_SIZE)
        self._publish()  # before the wake: whoever faulted may read the counters at once
        self.uffd.wake(start, end - start)

    def _load_chunk(self, chunk: int) -> None:
        for page, pages, crc in self.by_chunk.get(chunk, ()):
            size = pages * PAGE_SIZE
            view = self.view[:size]
            got = os.preadv(self.fd, [view], page * PAGE_SIZE)
            if got != size:
                raise SnapshotError(
                    f"the snapshot's memory file is truncated at page {page + got // PAGE_SIZE}"
                )
            if zlib.crc32(view) != crc:
                raise SnapshotError(
                    f"the snapshot's memory is corrupted: pages {page}-{page + pages - 1} "
                    "do not match their checksum; the restored VM was stopped"
                )
            dst, src, left = self._hva(page), self.buf_addr, size
            while left:
                n = self.uffd.copy(dst, src, left, wake=False)
                self.counters[COPIED] += n // PAGE_SIZE
                if n < left:  # that page exists already (the VMM wrote it): skip it
                    n += PAGE_SIZE
                dst, src, left = dst + n, src + n, left - n
        self.loaded.add(chunk)
        self.counters[CHUNKS] += 1

    def _populate_all(self) -> None:
        for chunk in sorted(set(self.by_chunk) - self.loaded):
            self._load_chunk(chunk)
        for hva, size, _ in self.regions:
            self.uffd.wake(hva, size)
            # Pages that were zero now fault the normal way (a fresh shmem page).
            self.uffd.unregister(hva, size)
        self.counters[POPULATED] = 1
        self._publish()
