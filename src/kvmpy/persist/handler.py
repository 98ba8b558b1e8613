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

On a fault it reads the whole chunk around the page (the prefetch unit), checks each extent's
CRC-32 (or, from a page store, each page's SHA-256: STORE_RECORD is logical page, pack, page
within the pack, SHA-256) and copies the extents in with UFFDIO_COPY; a page no extent holds was zero in the
snapshot and gets UFFDIO_ZEROPAGE. Between faults it works through the rest of the file in the
background (unless told not to): it checks that the file holds no data its index does not list
(a damaged hole), then checks and copies every chunk nobody has touched yet, so a corrupted page
stops the VM within about a second even if the guest never reads it; once everything is in, it
unregisters guest memory and the VM runs without faults.

A failure (a checksum that does not match, a short read, anything) never lets a page through:
the handler writes its message to the status page and signals the VMM (SIGCHLD, whose handler
reads the status page and stops the vCPU) *before* it resolves any fault again. A signal that
is pending on the vCPU thread keeps KVM from entering the guest, and the stop request keeps
the next KVM_RUN from doing so, so from then on it answers every fault with a zero page: the
VMM's own accesses (the fault report reads the faulting instruction) must not hang. If this
process dies instead (killed), a guardian it forked at the start, which holds the
userfaultfd too, does the same once the VMM has been signalled (see `_start_guardian`).
"""

from __future__ import annotations

import contextlib
import ctypes as C
import errno
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
STATUS_SIZE = PAGE_SIZE
STATE_FAILED = 2
SETUP = struct.Struct("<III")  # JSON length, index length, data descriptors
EXTENT = struct.Struct("<QII")  # as memfile.EXTENT
STORE_RECORD = struct.Struct("<QII32s")  # logical page, pack, slot in the pack, SHA-256
#: Descriptors per message after the first two (SCM_RIGHTS passes at most 253).
FDS_PER_MESSAGE = 200
MSG = struct.Struct("<B7xQQ8x")  # uffd_msg: event, pagefault.flags, pagefault.address
PR_SET_PDEATHSIG = 1
SEEK_DATA, SEEK_HOLE = 3, 4


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

    def notify_stopped(self) -> None:
        """Tell a failed handler, or the guardian of a dead one, that every vCPU has been asked
        to stop: it may answer faults with zero pages now (`wait_stopped`)."""
        with contextlib.suppress(OSError):
            self.sock.sendall(STOPPED)

    def close(self) -> None:
        """End the process (it, and its guardian, exit when the socket closes) and reap it."""
        self.sock.close()  # also if it died already: its guardian holds the other end
        if self.pid <= 0:
            return
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass  # reaped already (the SIGCHLD handler)
        self.pid = 0


def unlisted_data(fd: int, extents, size: int, buf: memoryview) -> tuple[int, int] | None:
    """The first run of pages (first, last) of the memory file that holds non-zero data where its
    index lists nothing: a page of a hole that was damaged. `extents` are (page, pages) pairs
    in order; `buf` is scratch space of at least one page. Holes cost one SEEK_DATA each; only
    data the index does not list is read (normally none)."""
    listed = [(p * PAGE_SIZE, (p + n) * PAGE_SIZE) for p, n in extents]
    i, pos = 0, 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return None
            if e.errno == errno.EINVAL:  # no hole support: every byte counts as data
                start = pos
            else:
                raise
        end = min(_next_hole(fd, start), size)
        # Walk [start, end) and read what no extent covers.
        at = start
        while at < end:
            while i < len(listed) and listed[i][1] <= at:
                i += 1
            if i < len(listed) and listed[i][0] <= at:
                at = listed[i][1]
                continue
            stop = min(end, listed[i][0] if i < len(listed) else end)
            while at < stop:
                n = min(len(buf), stop - at)
                got = os.preadv(fd, [buf[:n]], at)
                if got <= 0:
                    break
                data = buf[:got].tobytes()
                if data.count(0) != got:
                    page = (at + len(data) - len(data.lstrip(b"\0"))) // PAGE_SIZE
                    return page, page
                at += got
            at = stop
        pos = end
    return None


def _next_hole(fd: int, pos: int) -> int:
    try:
        return os.lseek(fd, pos, SEEK_HOLE)
    except OSError:
        return 1 << 62


def main() -> None:
    """Entry point of the handler process: argv = [socket fd, the VMM's pid]."""
    ready = time.monotonic_ns()  # started, imports done: from here it waits for its work
    # Ctrl-C and SIGTERM (to the process group) are the VMM's to handle; the VMM ends this
    # process (and PR_SET_PDEATHSIG does if it dies).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
    header = json.loads(rest[:json_len])
    bye = _start_guardian(uffd, sock, [tuple(r) for r in header["regions"]])
    handler = _Handler(Userfaultfd(uffd), sock, data_fds, status, header, rest[json_len:],
                       parent)  # fmt: skip
    handler.counters[READY] = ready
    code = handler.run()
    os.write(bye, b"x")  # a normal end: the guardian leaves too
    os._exit(code)


def _start_guardian(uffd: int, sock: socket.socket, regions) -> int:
    """Fork the guardian: a process that holds the userfaultfd too, idle while this one lives.
    If this process dies (killed) the guardian answers the faults with zero pages, so that a
    vCPU waiting on one is released: KVM then finds the VMM's SIGCHLD pending and returns to
    it before running the guest (the VMM stops the VM). Without it the faults would stay
    pending for ever (KVM-PVM retries them in the kernel without returning) or, had nobody
    kept the userfaultfd, turn into zero pages before the VMM had heard of the death.
    Returns the write end of the pipe this process says "bye" on when it ends normally."""
    r, w = os.pipe()
    if os.fork() != 0:
        os.close(r)
        return w
    try:
        os.close(w)
        _guard(r, Userfaultfd(uffd), sock, regions)
    finally:
        os._exit(0)


def _guard(bye: int, uffd: Userfaultfd, sock: socket.socket, regions) -> None:
    if os.read(bye, 1):  # blocks until the handler says bye, or dies (EOF)
        return
    # The handler died; nobody else reads the socket now: its EOF is the VMM closing.
    serve_zero_pages(uffd, sock, regions)


def serve_zero_pages(uffd: Userfaultfd, sock: socket.socket, regions) -> None:
    """After a failure (the handler's, or its death seen by the guardian): once the VMM has
    said its vCPUs are stopping, answer every fault with a zero page (the VMM's own reads for
    the report must not hang) until the VMM closes the socket."""
    wait_stopped(sock)
    poller = select.poll()
    ufd, cfd = uffd.fd, sock.fileno()
    poller.register(ufd, select.POLLIN)
    poller.register(cfd, select.POLLIN)
    # Faults read before the failure were never answered: wake them, so that they fault
    # again and are answered below.
    for hva, size, _ in regions:
        with contextlib.suppress(OSError):
            uffd.wake(hva, size)
    while True:
        for fd, _ in poller.poll():
            if fd == cfd:
                try:
                    cmd = sock.recv(16)
                except OSError:
                    return
                if not cmd:
                    return
                if b"P" in cmd:
                    with contextlib.suppress(OSError):
                        sock.sendall(b"F")
                continue
            try:
                data = os.read(ufd, MSG_SIZE * 64)
            except BlockingIOError:
                continue
            for event, _flags, address in MSG.iter_unpack(data):
                if event == UFFD_EVENT_PAGEFAULT:
                    page = address & ~(PAGE_SIZE - 1)
                    with contextlib.suppress(OSError):
                        uffd.zeropage(page, PAGE_SIZE, wake=False)
                    with contextlib.suppress(OSError):  # also when the page existed already
                        uffd.wake(page, PAGE_SIZE)


#: How long a failed handler (or the guardian of a dead one) waits for the VMM to say its
#: vCPUs are stopped before it answers faults with zero pages anyway.
STOPPED_TIMEOUT_S = 5.0
STOPPED = b"S"


def wait_stopped(sock: socket.socket, timeout: float = STOPPED_TIMEOUT_S) -> bool:
    """Wait until the VMM says (STOPPED on the socket) that it has asked every vCPU to stop.

    The vCPUs run in their own threads and the VMM learns of the failure in its main thread
    (SIGCHLD); its stop request leaves a kick pending on every vCPU thread, so that a vCPU
    released from a fault by a zero page returns to the VMM before the guest runs another
    instruction. Answering before that would let the guest run on a zero page. Returns False
    on timeout or when the VMM is gone (the faults are answered then all the same: a vCPU
    stuck in a fault is out of reach of every signal on some hosts)."""
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            data = sock.recv(16)
            if not data:
                return False
            if STOPPED in data:
                return True
            if b"P" in data:
                sock.sendall(b"F")
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(None)
    return False


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            os._exit(0)
        buf += chunk
    return bytes(buf)


def corrupted(first: int, last: int, why: str = "do not match their checksum") -> str:
    """The one message for a damaged memory file, eager (memfile.py) or lazy (here)."""
    return f"the memory file is corrupted: pages {first}-{last} {why}"


def truncated(page: int) -> str:
    return f"the memory file is truncated (page {page} is missing)"


class _Handler:
    def __init__(self, uffd, sock, data_fds, status, header: dict, index: bytes, parent: int = 0):
        self.uffd = uffd
        self.sock = sock
        self.fds = data_fds
        self.status = status
        self.parent = parent
        self.regions = [tuple(r) for r in header["regions"]]  # (hva, size, logical base)
        self.chunk_pages = header["chunk_pages"]
        self.background = bool(header.get("background", True))
        self.size = sum(size for _, size, _ in self.regions)
        self.store = header.get("store")  # the page store's path, for messages
        # Items of a chunk start with (first page, pages): an extent (+ CRC-32), or one page of
        # a page store (+ pack, slot, SHA-256).
        self.by_chunk: dict[int, list[tuple]] = {}
        self.extents: list[tuple[int, int, int]] = []
        if self.store is None:
            self.fd = data_fds[0]
            self.extents = list(EXTENT.iter_unpack(index))
            for page, pages, crc in self.extents:
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
        # Background work still to do: the hole check, then every chunk, in order.
        self.todo = iter([None, *sorted(self.by_chunk)]) if self.background else iter(())

    def run(self) -> int:
        try:
            self._publish()
            self._loop()
            return 0
        except Exception as e:
            msg = str(e) if isinstance(e, SnapshotError) else f"lazy restore failed: {e!r}"
            self._fail(msg)
            with contextlib.suppress(Exception):
                serve_zero_pages(self.uffd, self.sock, self.regions)
            return 1

    def _fail(self, msg: str) -> None:
        """Tell the VMM, before any fault is resolved again (see the module docstring)."""
        self.counters[STATE] = STATE_FAILED
        self._publish()
        data = msg.encode()[: STATUS_SIZE - ERROR_AT - 1] + b"\0"
        self.status[ERROR_AT : ERROR_AT + len(data)] = data
        if self.parent:
            with contextlib.suppress(OSError):
                os.kill(self.parent, signal.SIGCHLD)

    def _publish(self) -> None:
        COUNTERS.pack_into(self.status, 0, *self.counters)

    def _loop(self) -> None:
        poller = select.poll()
        ufd, cfd = self.uffd.fd, self.sock.fileno()
        poller.register(ufd, select.POLLIN)
        poller.register(cfd, select.POLLIN)
        busy = self.background
        while True:
            # Faults first: background work only when nothing waits.
            events = poller.poll(0 if busy else None)
            if not events and busy:
                busy = self._background_step()
                continue
            for fd, _ in events:
                if fd == cfd:
                    cmd = self.sock.recv(16)
                    if not cmd:
                        return
                    if b"P" in cmd:
                        self._populate_all()
                        busy = False
                        self.sock.sendall(b"D")
                    continue
                try:
                    data = os.read(ufd, MSG_SIZE * 64)
                except BlockingIOError:
                    continue
                for event, _flags, address in MSG.iter_unpack(data):
                    if event == UFFD_EVENT_PAGEFAULT:
                        self._fault(address)

    def _background_step(self) -> bool:
        """One piece of background work; False when there is none left."""
        if self.counters[POPULATED]:
            return False
        try:
            chunk = next(self.todo)
        except StopIteration:
            self._finish()
            return False
        if chunk is None:
            if self.store is not None:
                return True  # a page store has no holes to check: every page has a digest
            bad = unlisted_data(self.fd, [(p, n) for p, n, _ in self.extents], self.size,
                                self.view)  # fmt: skip
            if bad is not None:
                raise SnapshotError(corrupted(*bad, "hold data its index does not list"))
        elif chunk not in self.loaded:
            self._load_chunk(chunk)
            self._publish()
        return True

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
        # Read and check the whole chunk before copying any of it in: a bad extent must not
        # let its chunk's good ones through either (they would wake a waiting vCPU).
        pos = 0
        pieces = []
        for page, pages, crc in self.by_chunk.get(chunk, ()):
            size = pages * PAGE_SIZE
            view = self.view[pos : pos + size]
            got = os.preadv(self.fd, [view], page * PAGE_SIZE)
            if got != size:
                raise SnapshotError(truncated(page + got // PAGE_SIZE))
            if zlib.crc32(view) != crc:
                raise SnapshotError(corrupted(page, page + pages - 1))
            pieces.append((page, size, pos))
            pos += size
        for page, size, at in pieces:
            self._copy(page, size, at)
        self.loaded.add(chunk)
        self.counters[CHUNKS] += 1

    def _copy(self, page: int, size: int, at: int = 0) -> None:
        """UFFDIO_COPY `size` checked bytes from the buffer (at offset `at`) to logical page
        `page` on."""
        dst, src, left = self._hva(page), self.buf_addr + at, size
        while left:
            n = self.uffd.copy(dst, src, left, wake=False)
            self.counters[COPIED] += n // PAGE_SIZE
            if n < left:  # that page exists already (the VMM wrote it): skip it
                n += PAGE_SIZE
            dst, src, left = dst + n, src + n, left - n

    def _load_store_chunk(self, chunk: int) -> None:
        """Pages of a page store: each run that is contiguous in the guest and in one pack is
        one read; every page of the chunk is checked against its SHA-256 before any of it is
        copied in (as for extents)."""
        items = self.by_chunk.get(chunk, ())
        runs = []
        i = pos = 0
        while i < len(items):
            page, _, pack, slot, _ = items[i]
            j = i + 1
            while (j < len(items) and items[j][0] == items[j - 1][0] + 1
                   and items[j][2] == pack and items[j][3] == items[j - 1][3] + 1):  # fmt: skip
                j += 1
            size = (j - i) * PAGE_SIZE
            view = self.view[pos : pos + size]
            if not 0 <= pack < len(self.fds):
                raise SnapshotError("lazy restore: a page names a pack it was not given")
            got = os.preadv(self.fds[pack], [view], slot * PAGE_SIZE)
            if got != size:
                raise SnapshotError(
                    f"the page store {self.store} is truncated (a pack ends before guest page "
                    f"{page + got // PAGE_SIZE})"
                )
            for k in range(j - i):
                if (
                    hashlib.sha256(view[k * PAGE_SIZE : (k + 1) * PAGE_SIZE]).digest()
                    != items[i + k][4]
                ):
                    raise SnapshotError(
                        f"the page store {self.store} is corrupted: guest page {page + k} does "
                        "not match its checksum"
                    )
            runs.append((page, size, pos))
            pos += size
            i = j
        for page, size, at in runs:
            self._copy(page, size, at)

    def _populate_all(self) -> None:
        if self.counters[POPULATED]:
            return
        if self.store is None:
            bad = unlisted_data(self.fd, [(p, n) for p, n, _ in self.extents], self.size,
                                self.view)  # fmt: skip
            if bad is not None:
                raise SnapshotError(corrupted(*bad, "hold data its index does not list"))
        for chunk in sorted(set(self.by_chunk) - self.loaded):
            self._load_chunk(chunk)
        self._finish()

    def _finish(self) -> None:
        """Everything is in: wake whoever waits, and stop watching guest memory."""
        for hva, size, _ in self.regions:
            self.uffd.wake(hva, size)
            # Pages that were zero now fault the normal way (a fresh shmem page).
            self.uffd.unregister(hva, size)
        self.counters[POPULATED] = 1
        self._publish()
