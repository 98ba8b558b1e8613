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

Protocol on the unix socket it is started with: one setup message carrying the userfaultfd, a
shared status page and the first data descriptors (the snapshot's memory file; or, for a
snapshot in a page store, the packs that hold its pages, further ones in messages of their
own: SCM_RIGHTS passes at most 253 at a time), with a JSON header and the memory index; then
b"P" (populate everything, answered with b"D"); EOF ends it.

On a fault it reads the whole chunk around the page (the prefetch unit) and checks it before
any of it reaches the guest: each extent's CRC-32, or, from a page store, each page's SHA-256
(STORE_RECORD: logical page, pack, page within the pack, SHA-256). It copies the checked
pages in with UFFDIO_COPY; a page the snapshot does not hold was zero and gets
UFFDIO_ZEROPAGE. Its counters and, if it fails, its error message go to the
status page; a failure ends the process, which releases the userfaultfd (the VMM keeps no
copy), so nothing stays blocked, and the VMM's SIGCHLD handler stops the VM.
"""

from __future__ import annotations

import ctypes as C
import hashlib
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
#: A byte the VMM sets once it has asked its vCPUs to stop after a failure.
STOPPING_AT = 200
STATUS_SIZE = PAGE_SIZE
STATE_FAILED = 2
#: After a failure, how long the handler keeps faults blocked waiting for the VMM's stop.
FAIL_HOLD_S = 5.0
SETUP = struct.Struct("<III")  # JSON length, index length, data descriptors
EXTENT = struct.Struct("<QII")  # as memfile.EXTENT
STORE_RECORD = struct.Struct("<QII32s")  # logical page, pack, slot in the pack, SHA-256
#: Descriptors per message after the first two (SCM_RIGHTS passes at most 253).
FDS_PER_MESSAGE = 200
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

    def setup(self, uffd: int, status_fd: int, data_fds: list[int], header: dict, index: bytes):
        head = json.dumps(header).encode()
        payload = SETUP.pack(len(head), len(index), len(data_fds)) + head + index
        first = [uffd, status_fd, *data_fds[:FDS_PER_MESSAGE]]
        n = socket.send_fds(self.sock, [payload[: SETUP.size]], first)
        for i in range(FDS_PER_MESSAGE, len(data_fds), FDS_PER_MESSAGE):
            socket.send_fds(self.sock, [b"F"], data_fds[i : i + FDS_PER_MESSAGE])
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
        head, fds, _, _ = socket.recv_fds(sock, SETUP.size, 2 + FDS_PER_MESSAGE)
        if len(head) < SETUP.size or len(fds) < 2:
            os._exit(0)  # the VMM gave up before handing us anything
        json_len, index_len, nfds = SETUP.unpack(head)
        while len(fds) < 2 + nfds:
            _, more, _, _ = socket.recv_fds(sock, 1, FDS_PER_MESSAGE)
            if not more:
                os._exit(0)
            fds += more
    except OSError:
        os._exit(0)
    uffd, status_fd, data_fds = fds[0], fds[1], fds[2:]
    rest = _recv_exact(sock, json_len + index_len)
    status = mmap.mmap(status_fd, STATUS_SIZE)
    handler = _Handler(Userfaultfd(uffd), sock, data_fds, status, json.loads(rest[:json_len]),
                       rest[json_len:])  # fmt: skip
    handler.counters[READY] = ready
    handler.vmm_pid = parent
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
    def __init__(self, uffd, sock, data_fds, status, header: dict, index: bytes):
        self.uffd = uffd
        self.sock = sock
        self.fds = data_fds
        self.status = status
        self.vmm_pid = os.getppid()
        self.regions = [tuple(r) for r in header["regions"]]  # (hva, size, logical base)
        self.chunk_pages = header["chunk_pages"]
        self.store = header.get("store")  # the page store's path, for messages
        # Items of a chunk start with (first page, pages): an extent (+ CRC-32), or one page of
        # a page store (+ pack, slot, SHA-256).
        self.by_chunk: dict[int, list[tuple]] = {}
        if self.store is None:
            for page, pages, crc in EXTENT.iter_unpack(index):
                self.by_chunk.setdefault(page // self.chunk_pages, []).append((page, pages, crc))
        else:
            for page, pack, slot, digest in STORE_RECORD.iter_unpack(index):
                item = (page, 1, pack, slot, digest)
                self.by_chunk.setdefault(page // self.chunk_pages, []).append(item)
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
            data = msg.encode()[: STATUS_SIZE - ERROR_AT - 1] + b"\0"
            self.status[ERROR_AT : ERROR_AT + len(data)] = data
            self.counters[STATE] = STATE_FAILED
            self._publish()
            self._hold_until_stopped()
            return 1

    def _hold_until_stopped(self) -> None:
        """Exiting releases the userfaultfd, and a fault still waiting would then get a zero
        page and the guest run on with it (seen here: a memsum line computed over zeros). So
        the unserved faults stay blocked until the VMM has asked its vCPUs to stop: it is
        told with SIGCHLD (which it handles) and says so in the status page; its kicks are
        then pending, and a vCPU leaves KVM_RUN before it runs the guest again."""
        try:
            os.kill(self.vmm_pid, signal.SIGCHLD)
        except OSError:
            return
        deadline = time.monotonic() + FAIL_HOLD_S
        while not self.status[STOPPING_AT] and time.monotonic() < deadline:
            time.sleep(0.001)

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
        if not any(e[0] <= page < e[0] + e[1] for e in extents) and self.uffd.zeropage(
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
        if self.store is not None:
            self._load_store_chunk(chunk)
            self.loaded.add(chunk)
            self.counters[CHUNKS] += 1
            return
        for page, pages, crc in self.by_chunk.get(chunk, ()):
            size = pages * PAGE_SIZE
            view = self.view[:size]
            got = os.preadv(self.fds[0], [view], page * PAGE_SIZE)
            if got != size:
                raise SnapshotError(
                    f"the snapshot's memory file is truncated at page {page + got // PAGE_SIZE}"
                )
            if zlib.crc32(view) != crc:
                raise SnapshotError(
                    f"the snapshot's memory is corrupted: pages {page}-{page + pages - 1} "
                    "do not match their checksum; the restored VM was stopped"
                )
            self._copy(page, size)
        self.loaded.add(chunk)
        self.counters[CHUNKS] += 1

    def _copy(self, page: int, size: int) -> None:
        """UFFDIO_COPY `size` checked bytes from the buffer to logical page `page` on."""
        dst, src, left = self._hva(page), self.buf_addr, size
        while left:
            n = self.uffd.copy(dst, src, left, wake=False)
            self.counters[COPIED] += n // PAGE_SIZE
            if n < left:  # that page exists already (the VMM wrote it): skip it
                n += PAGE_SIZE
            dst, src, left = dst + n, src + n, left - n

    def _load_store_chunk(self, chunk: int) -> None:
        """Pages of a page store: each run that is contiguous in the guest and in one pack is
        one read; every page is checked against its SHA-256 before any of the run is copied."""
        items = self.by_chunk.get(chunk, ())
        i = 0
        while i < len(items):
            page, _, pack, slot, _ = items[i]
            j = i + 1
            while (j < len(items) and items[j][0] == items[j - 1][0] + 1
                   and items[j][2] == pack and items[j][3] == items[j - 1][3] + 1):  # fmt: skip
                j += 1
            size = (j - i) * PAGE_SIZE
            view = self.view[:size]
            if not 0 <= pack < len(self.fds):
                raise SnapshotError("lazy restore: a page names a pack it was not given")
            got = os.preadv(self.fds[pack], [view], slot * PAGE_SIZE)
            if got != size:
                raise SnapshotError(
                    f"the page store {self.store} is truncated (a pack ends before guest page "
                    f"{page + got // PAGE_SIZE}); the restored VM was stopped"
                )
            for k in range(j - i):
                if (
                    hashlib.sha256(view[k * PAGE_SIZE : (k + 1) * PAGE_SIZE]).digest()
                    != items[i + k][4]
                ):
                    raise SnapshotError(
                        f"the page store {self.store} is corrupted: guest page {page + k} does "
                        "not match its checksum; the restored VM was stopped"
                    )
            self._copy(page, size)
            i = j

    def _populate_all(self) -> None:
        for chunk in sorted(set(self.by_chunk) - self.loaded):
            self._load_chunk(chunk)
        for hva, size, _ in self.regions:
            self.uffd.wake(hva, size)
            # Pages that were zero now fault the normal way (a fresh shmem page).
            self.uffd.unregister(hva, size)
        self.counters[POPULATED] = 1
        self._publish()
