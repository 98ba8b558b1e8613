"""virtio-vsock (VIRTIO 1.2, 5.10): stream sockets between the guest and Unix sockets on the
host, with Firecracker's vsock-over-UDS convention, served by the device's I/O thread.

    guest connect(CID 2, port P)   ->  the host Unix socket PATH_P (it must be listening)
    host connect(PATH), "CONNECT P\\n"  ->  the guest's listener on port P; kvmpy answers
                                        "OK <host port>\\n" once the guest accepted

Packets are a 44-byte header (struct virtio_vsock_hdr) and up to MAX_PKT bytes of payload.
Flow control is the spec's credit scheme (5.10.6.3): each side advertises `buf_alloc` and
`fwd_cnt`, and a sender keeps what it has sent and the receiver has not yet forwarded within
the receiver's buf_alloc. kvmpy advertises CONN_BUF per connection and holds at most that
much of a connection's guest data the host socket has not taken yet; it reads a host socket
only while the guest has credit and receive buffers, straight into the guest's buffer. So
every connection costs a bounded amount of memory, and a guest or host that stops reading
only stops its own connection.

A bad packet (a header that does not fit the chain, a wrong CID or type, an unknown op, a
payload longer than MAX_PKT or than the chain, data beyond the credit kvmpy gave, a packet
for a connection that does not exist or is not in the state the op needs) resets its
connection (RST) and is counted; it never breaks the device. A receive buffer too small for a
header is a virtqueue protocol error (the device needs a reset).

Snapshots: open connections cannot be carried (their host sockets belong to this process), so
a restored device starts with none and sends the guest VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on
its event queue, as Firecracker does: the guest drops every connection, and new ones work.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import struct
from collections import deque
from collections.abc import Callable

from ...errors import ConfigError, GuestMemoryError
from .constants import ID_VSOCK, STATUS_DRIVER_OK
from .device import VirtioDevice
from .queue import QueueError, Virtqueue

log = logging.getLogger(__name__)

QUEUE_SIZE = 256
EVENT_QUEUE_SIZE = 16
RX, TX, EVENT = 0, 1, 2
HOST_CID = 2
#: CIDs 0-2 are the hypervisor, local and host; 0xFFFFFFFF is VMADDR_CID_ANY.
MIN_GUEST_CID = 3
MAX_GUEST_CID = 0xFFFF_FFFE

HDR = struct.Struct(
    "<QQIIIHHIII"
)  # src_cid dst_cid src_port dst_port len type op flags buf_alloc fwd_cnt
TYPE_STREAM = 1
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = range(
    1, 8
)
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
EVENT_TRANSPORT_RESET = 0

#: Largest payload of one packet (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
MAX_PKT = 64 * 1024
#: What kvmpy advertises as buf_alloc per connection, and the most it holds for one (1 MiB:
#: 16 packets of 64 KiB in flight before the guest waits for a credit update).
CONN_BUF = 1 << 20
MAX_CONNS = 1024
#: Resets queued for packets that have no connection to carry them.
MAX_QUEUED_RSTS = 256
#: The longest "CONNECT <port>\n" line a host client may send.
MAX_LINE = 32
#: After the host side closes, how long the guest has to acknowledge with RST.
CLOSE_TIMEOUT = 2.0
FIRST_HOST_PORT = 1 << 30

# pending control packets, highest priority first
_CTRL_ORDER = (OP_RST, OP_RESPONSE, OP_REQUEST, OP_SHUTDOWN, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST)

HANDSHAKE, REQUESTING, OPEN, CLOSING = "handshake", "requesting", "open", "closing"


def check_cid(cid) -> int:
    if (
        isinstance(cid, bool)
        or not isinstance(cid, int)
        or not MIN_GUEST_CID <= cid <= MAX_GUEST_CID
    ):
        raise ConfigError(f"vsock CID {cid!r} must be a number from 3 to {MAX_GUEST_CID}")
    return cid


class UdsHost:
    """The host side of Firecracker's convention: connect to PATH_<port>, listen on PATH."""

    def __init__(self, path: str):
        self.path = str(path)

    def connect(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.setblocking(False)
        try:
            # A Unix connect completes at once or fails (ECONNREFUSED, ENOENT; EAGAIN when
            # the listener's backlog is full): the I/O thread never waits for it.
            s.connect(f"{self.path}_{port}")
        except OSError:
            s.close()
            raise
        return s

    def listen(self) -> socket.socket:
        path = self.path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise ConfigError(f"--vsock uds={path}: exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                probe.connect(path)
                live = True
            except OSError:
                live = False  # nobody listens: a stale socket of an earlier VMM
            finally:
                probe.close()
            if live:
                raise ConfigError(f"--vsock uds={path}: another process listens there")
            os.unlink(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(path)
            s.listen(64)
        except OSError as e:
            s.close()
            raise ConfigError(f"--vsock uds={path}: cannot listen: {e.strerror}") from None
        s.setblocking(False)
        return s

    def close(self, listener: socket.socket | None) -> None:
        if listener is not None:
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)


class Conn:
    """One stream connection: guest (guest_port) <-> host socket (host_port on CID 2)."""

    __slots__ = ("sock", "fd", "host_port", "guest_port", "state", "peer_buf_alloc",
                 "peer_fwd_cnt", "tx_cnt", "rx_cnt", "fwd_cnt", "fwd_told", "out", "ctrl",
                 "shutdown_flags", "host_eof", "guest_shut", "data_ready", "reading",
                 "writing", "queued", "closed", "credit_asked", "reset_when_sent")  # fmt: skip

    def __init__(self, sock: socket.socket, host_port: int, guest_port: int, state: str):
        self.sock = sock
        self.fd = sock.fileno()
        self.host_port, self.guest_port = host_port, guest_port
        self.state = state
        self.peer_buf_alloc = self.peer_fwd_cnt = 0
        self.tx_cnt = 0  # payload bytes sent to the guest
        self.rx_cnt = 0  # payload bytes the guest sent
        self.fwd_cnt = 0  # of those, handed to the host socket
        self.fwd_told = 0  # the fwd_cnt the guest last heard
        self.out = bytearray()  # guest bytes the host socket has not taken yet
        self.ctrl = 0  # control packets to send: 1 << op
        self.shutdown_flags = 0
        self.host_eof = False
        self.guest_shut = 0
        self.data_ready = False
        self.reading = self.writing = self.queued = self.closed = False
        self.credit_asked = False
        #: The guest closed both ways with data still to write: reset once it is written.
        self.reset_when_sent = False

    @property
    def key(self) -> tuple[int, int]:
        return self.host_port, self.guest_port

    def peer_credit(self) -> int:
        return self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFF_FFFF)


class VirtioVsock(VirtioDevice):
    device_id = ID_VSOCK

    def __init__(self, cid: int, uds_path: str | None = None, name: str = "vsock0",
                 host: UdsHost | None = None):  # fmt: skip
        super().__init__(name, [QUEUE_SIZE, QUEUE_SIZE, EVENT_QUEUE_SIZE])
        self.cid = check_cid(cid)
        self.host = host if host is not None else UdsHost(uds_path or "")
        self.listener: socket.socket | None = None
        if uds_path:
            self.listener = self.host.listen()
        self._listening = False
        self.conns: dict[tuple[int, int], Conn] = {}
        self._handshakes: dict[int, Conn] = {}
        self._ready: deque[Conn] = deque()
        self._rsts: deque[tuple[int, int]] = deque()
        self._next_port = FIRST_HOST_PORT
        self._reset_event = False
        self.connections = 0
        self.resets_sent = 0
        self.bad_packets = 0
        self.rx_packets = self.tx_packets = 0
        self.rx_bytes = self.tx_bytes = 0
        self.dropped = 0
        self.transport_resets = 0

    def config_bytes(self) -> bytes:
        return struct.pack("<Q", self.cid)

    # --- life cycle ------------------------------------------------------------------------

    def activate(self) -> None:
        if self.listener is not None and self.loop is not None and not self._listening:
            self._listening = True
            self.loop.add_reader(self.listener.fileno(), lambda: self._locked(self._accept))

    def _unlisten(self) -> None:
        if self._listening and self.loop is not None and self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
        self._listening = False

    def on_reset(self) -> None:
        self._close_all()
        self._unlisten()
        self._reset_event = False

    def poll_host(self) -> None:
        """Without an I/O loop (tests, the fuzzer): look at every host socket once, as the
        loop would when they are ready."""
        if self.listener is not None and self.running:
            self._locked(self._accept)
        for c in [*self.conns.values(), *self._handshakes.values()]:
            if c.reading:
                self._locked(lambda c=c: self._readable(c))
            if c.writing:
                self._locked(lambda c=c: self._writable(c))

    def close(self) -> None:
        with self.lock:
            self._close_all()
            self._unlisten()
            self.host.close(self.listener)
            self.listener = None
        super().close()

    def _close_all(self) -> None:
        for c in [*self.conns.values(), *self._handshakes.values()]:
            self._drop(c)
        self.conns.clear()
        self._handshakes.clear()
        self._ready.clear()
        self._rsts.clear()

    def _locked(self, fn: Callable[[], None]) -> None:
        """Run host-socket work in the I/O thread with the device's lock and error rules."""
        with self.lock:
            if not self.running:
                # Reset or broken: its sockets must not keep waking a loop that ignores them.
                self._close_all()
                self._unlisten()
                return
            try:
                fn()
            except (QueueError, GuestMemoryError) as e:
                self.fail(str(e))
            except Exception as e:  # a kvmpy bug: stop this device, not the VMM
                self.internal_errors += 1
                log.exception("%s: internal error", self.name)
                self.fail(f"internal error: {type(e).__name__}: {e}")

    # --- queues ----------------------------------------------------------------------------

    def handle(self, q: Virtqueue) -> None:
        if q.index == TX:
            self._transmit(q)
            self._fill_rx()
        elif q.index == RX:
            self._fill_rx()
        elif q.index == EVENT:
            self._send_event(q)

    def _send_event(self, q: Virtqueue) -> None:
        if not self._reset_event:
            return
        chain = self.next_chain(q)
        if chain is None:
            return
        self._reset_event = False
        q.push(chain, chain.write(struct.pack("<I", EVENT_TRANSPORT_RESET)))
        self.transport_resets += 1
        self.signal_used(q)

    # guest -> host

    def _transmit(self, q: Virtqueue) -> None:
        pushed = False
        while True:
            chain = self.next_chain(q)
            if chain is None:
                break
            self._packet(chain)
            self.requests += 1
            q.push(chain, 0)
            pushed = True
        if pushed:
            self.signal_used(q)

    def _packet(self, chain) -> None:
        total = chain.readable_len
        if total < HDR.size:
            self.bad_packets += 1  # no header: nothing to reset, only to count
            return
        src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc, fwd_cnt = (
            HDR.unpack(chain.read(HDR.size))
        )
        self.tx_packets += 1
        key = (dst_port, src_port)
        conn = self.conns.get(key)
        if (src_cid != self.cid or dst_cid != HOST_CID or type_ != TYPE_STREAM
                or not OP_REQUEST <= op <= OP_CREDIT_REQUEST or length > MAX_PKT
                or length > total - HDR.size or (length and op != OP_RW)):  # fmt: skip
            self.bad_packets += 1
            if conn is not None:
                self._reset(conn)
            elif op != OP_RST:
                self._queue_rst(key)
            return
        if op == OP_REQUEST:
            if conn is not None:
                self.bad_packets += 1
                self._reset(conn)
            else:
                self._guest_connect(dst_port, src_port, buf_alloc, fwd_cnt)
            return
        if conn is None:
            if op != OP_RST:
                self._queue_rst(key)
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        if op == OP_RST:
            self._drop(conn)
            return
        if op == OP_RESPONSE:
            if conn.state != REQUESTING:
                self.bad_packets += 1
                self._reset(conn)
                return
            conn.state = OPEN
            try:
                conn.sock.send(b"OK %d\n" % conn.host_port)
            except OSError:
                self._reset(conn)
                return
            self._rearm(conn)
            return
        if conn.state not in (OPEN, CLOSING):
            self.bad_packets += 1
            self._reset(conn)
            return
        if op == OP_RW:
            self._guest_data(conn, chain, length)
        elif op == OP_SHUTDOWN:
            conn.guest_shut |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND)
            if conn.guest_shut == SHUTDOWN_RCV | SHUTDOWN_SEND:
                self._flush(conn)
                if conn.out:
                    # What the guest sent before closing still goes to the host: reset once
                    # it is written (or after CLOSE_TIMEOUT if the host never reads it).
                    conn.reset_when_sent = True
                    self._rearm(conn)
                    self._expire_later(conn)
                    return
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_WR)
                self._reset(conn)  # the guest closed: RST acknowledges (as Linux peers do)
                return
            if conn.guest_shut & SHUTDOWN_SEND and not conn.out:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_WR)
        elif op == OP_CREDIT_REQUEST:
            self._want(conn, OP_CREDIT_UPDATE)
        self._rearm(conn)

    def _guest_data(self, conn: Conn, chain, length: int) -> None:
        if conn.guest_shut & SHUTDOWN_SEND or len(conn.out) + length > CONN_BUF:
            self.bad_packets += 1  # data after its own shutdown, or beyond our credit
            self._reset(conn)
            return
        conn.rx_cnt = (conn.rx_cnt + length) & 0xFFFF_FFFF
        self.tx_bytes += length
        if not length:
            return
        if conn.host_eof and conn.state == CLOSING:
            conn.fwd_cnt = (conn.fwd_cnt + length) & 0xFFFF_FFFF  # nobody to give it to
            return
        sent = 0
        if not conn.out:
            try:
                sent = conn.sock.sendmsg(chain.readable_iov(HDR.size, length))
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:  # EPIPE, ECONNRESET: the host side is gone
                self._reset(conn)
                return
        if sent < length:
            conn.out += chain.read(length - sent, HDR.size + sent)
            self._watch_write(conn)
        self._forwarded(conn, sent)

    def _forwarded(self, conn: Conn, n: int) -> None:
        conn.fwd_cnt = (conn.fwd_cnt + n) & 0xFFFF_FFFF
        # The guest believes (rx_cnt - fwd_told) of our buffer is in use: tell it about the
        # room we made once that belief leaves it less than half the buffer.
        outstanding = (conn.rx_cnt - conn.fwd_told) & 0xFFFF_FFFF
        if n and CONN_BUF - outstanding < CONN_BUF // 2:
            self._want(conn, OP_CREDIT_UPDATE)

    def _flush(self, conn: Conn) -> None:
        while conn.out:
            try:
                n = conn.sock.send(conn.out)
            except OSError:
                return
            del conn.out[:n]
            self._forwarded(conn, n)

    def _guest_connect(self, host_port: int, guest_port: int, buf_alloc: int, fwd_cnt: int) -> None:
        if len(self.conns) + len(self._handshakes) >= MAX_CONNS:
            self._queue_rst((host_port, guest_port))
            return
        try:
            sock = self.host.connect(host_port)
        except OSError:
            self._queue_rst((host_port, guest_port))  # nobody listens on PATH_<port>
            return
        _buffers(sock)
        conn = Conn(sock, host_port, guest_port, OPEN)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        self.conns[conn.key] = conn
        self.connections += 1
        self._want(conn, OP_RESPONSE)
        self._rearm(conn)

    # host -> guest

    def _fill_rx(self) -> None:
        q = self.queues[RX]
        if not q.ready:
            return
        pushed = False
        rsts, ready = self._rsts, self._ready
        while rsts or ready:
            if ready and ready[0].closed:
                ready.popleft()
                continue
            chain = self.next_chain(q)
            if chain is None:
                break  # no buffers: the rest waits (their sockets are not watched meanwhile)
            if chain.writable_len < HDR.size:
                raise QueueError(f"{self.name}: a receive buffer of {chain.writable_len} bytes "
                                 f"cannot hold a {HDR.size}-byte header")  # fmt: skip
            if rsts:
                host_port, guest_port = rsts.popleft()
                chain.write(self._header(host_port, guest_port, OP_RST, 0, 0, 0, 0))
                self.resets_sent += 1
                q.push(chain, HDR.size)
                pushed = True
                continue
            conn = ready[0]
            n = self._next_packet(conn, chain)
            if n == 0:
                q.unpop(1)
                ready.popleft()
                conn.queued = False
                self._rearm(conn)
                continue
            q.push(chain, n)
            self.rx_packets += 1
            pushed = True
            ready.rotate(-1)  # round robin among busy connections
        if pushed:
            self.signal_used(q)

    def _header(self, host_port, guest_port, op, length, flags, fwd_cnt, buf_alloc=CONN_BUF):
        return HDR.pack(HOST_CID, self.cid, host_port, guest_port, length, TYPE_STREAM, op,
                        flags, buf_alloc, fwd_cnt)  # fmt: skip

    def _next_packet(self, conn: Conn, chain) -> int:
        if conn.ctrl:
            for op in _CTRL_ORDER:
                if conn.ctrl & (1 << op):
                    conn.ctrl &= ~(1 << op)
                    break
            flags = conn.shutdown_flags if op == OP_SHUTDOWN else 0
            chain.write(self._header(conn.host_port, conn.guest_port, op, 0, flags, conn.fwd_cnt))
            conn.fwd_told = conn.fwd_cnt
            if op == OP_RST:
                self.resets_sent += 1
                self._drop(conn)
            return HDR.size
        if not conn.data_ready or conn.state != OPEN or conn.host_eof:
            return 0
        credit = conn.peer_credit()
        if credit <= 0:
            if not conn.credit_asked:  # ask once; the guest's update re-arms the socket
                conn.credit_asked = True
                self._want(conn, OP_CREDIT_REQUEST)
                return self._next_packet(conn, chain)
            return 0
        room = min(credit, chain.writable_len - HDR.size, MAX_PKT)
        if room <= 0:
            return 0
        try:
            n = conn.sock.recvmsg_into(chain.writable_iov(HDR.size, room))[0]
        except (BlockingIOError, InterruptedError):
            conn.data_ready = False
            return 0
        except OSError:
            n = 0  # ECONNRESET: as an end of stream
        if n == 0:
            conn.host_eof = True
            conn.data_ready = False
            conn.state = CLOSING
            conn.shutdown_flags = SHUTDOWN_RCV | SHUTDOWN_SEND
            chain.write(self._header(conn.host_port, conn.guest_port, OP_SHUTDOWN, 0,
                                     conn.shutdown_flags, conn.fwd_cnt))  # fmt: skip
            conn.fwd_told = conn.fwd_cnt
            self._unwatch(conn)
            self._expire_later(conn)
            return HDR.size
        chain.write(self._header(conn.host_port, conn.guest_port, OP_RW, n, 0, conn.fwd_cnt))
        conn.fwd_told = conn.fwd_cnt
        conn.tx_cnt = (conn.tx_cnt + n) & 0xFFFF_FFFF
        conn.credit_asked = False
        self.rx_bytes += n
        return HDR.size + n

    def _expire_later(self, conn: Conn) -> None:
        if self.loop is not None:
            self.loop.call_later(CLOSE_TIMEOUT, lambda: self._locked(lambda: self._expire(conn)))

    def _expire(self, conn: Conn) -> None:
        if not conn.closed:
            self._reset(conn)
            self._fill_rx()

    # --- connection bookkeeping -------------------------------------------------------------

    def _want(self, conn: Conn, op: int) -> None:
        conn.ctrl |= 1 << op
        self._enqueue(conn)

    def _enqueue(self, conn: Conn) -> None:
        if not conn.queued and not conn.closed:
            conn.queued = True
            self._ready.append(conn)

    def _queue_rst(self, key: tuple[int, int]) -> None:
        if len(self._rsts) < MAX_QUEUED_RSTS:
            self._rsts.append(key)
        else:
            self.dropped += 1

    def _reset(self, conn: Conn) -> None:
        """Close the host side and tell the guest (RST)."""
        if conn.closed:
            return
        key = conn.key
        self._drop(conn)
        if conn.state != HANDSHAKE:
            self._queue_rst(key)

    def _drop(self, conn: Conn) -> None:
        """Forget a connection and close its host socket (no packet to the guest)."""
        if conn.closed:
            return
        conn.closed = True
        self._unwatch(conn)
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        if self._handshakes.get(conn.fd) is conn:
            del self._handshakes[conn.fd]
        conn.sock.close()

    def _unwatch(self, conn: Conn) -> None:
        loop = self.loop
        if conn.reading:
            conn.reading = False
            if loop is not None:
                loop.remove_reader(conn.fd)
        if conn.writing:
            conn.writing = False
            if loop is not None:
                loop.remove_writer(conn.fd)

    def _rearm(self, conn: Conn) -> None:
        """Watch the host socket for input exactly when a packet could carry it: the guest
        has credit, we are not already waiting to send it, and the stream is open."""
        if conn.closed:
            return
        want = (conn.state == OPEN and not conn.host_eof and not conn.data_ready
                and conn.peer_credit() > 0 and not conn.guest_shut & SHUTDOWN_RCV)  # fmt: skip
        if want and not conn.reading:
            conn.reading = True
            if self.loop is not None:
                self.loop.add_reader(conn.fd, lambda: self._locked(lambda: self._readable(conn)))
        elif not want and conn.reading:
            conn.reading = False
            if self.loop is not None:
                self.loop.remove_reader(conn.fd)
        if conn.state == OPEN and conn.data_ready and conn.peer_credit() > 0:
            self._enqueue(conn)

    def _readable(self, conn: Conn) -> None:
        if conn.closed:
            return
        if conn.state == HANDSHAKE:
            self._handshake(conn)
            return
        conn.data_ready = True
        self._rearm(conn)  # stop watching until the data is in guest buffers
        self._enqueue(conn)
        self._fill_rx()

    def _watch_write(self, conn: Conn) -> None:
        if not conn.writing and not conn.closed:
            conn.writing = True
            if self.loop is not None:
                self.loop.add_writer(conn.fd, lambda: self._locked(lambda: self._writable(conn)))

    def _writable(self, conn: Conn) -> None:
        if conn.closed:
            return
        try:
            n = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._reset(conn)
            self._fill_rx()
            return
        del conn.out[:n]
        self._forwarded(conn, n)
        if not conn.out:
            conn.writing = False
            if self.loop is not None:
                self.loop.remove_writer(conn.fd)
            if conn.guest_shut & SHUTDOWN_SEND:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_WR)
            if conn.reset_when_sent:
                self._reset(conn)
        self._fill_rx()

    # --- host-initiated connections ----------------------------------------------------------

    def _accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    log.warning("%s: cannot accept: %s", self.name, e.strerror)
                return
            if len(self.conns) + len(self._handshakes) >= MAX_CONNS:
                sock.close()
                self.dropped += 1
                continue
            self.host_connect(sock)

    def host_connect(self, sock: socket.socket) -> Conn:
        """A host client connected (to PATH): read its CONNECT line, then ask the guest."""
        sock.setblocking(False)
        _buffers(sock)
        conn = Conn(sock, self._alloc_port(), 0, HANDSHAKE)
        self._handshakes[conn.fd] = conn
        conn.reading = True
        if self.loop is not None:
            self.loop.add_reader(conn.fd, lambda: self._locked(lambda: self._readable(conn)))
        return conn

    def _alloc_port(self) -> int:
        used = {c.host_port for c in self.conns.values()} | {
            c.host_port for c in self._handshakes.values()
        }
        while True:
            port = self._next_port
            self._next_port = FIRST_HOST_PORT + ((port + 1 - FIRST_HOST_PORT) % (1 << 30))
            if port not in used:
                return port

    def _handshake(self, conn: Conn) -> None:
        try:
            peek = conn.sock.recv(MAX_LINE, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            peek = b""
        end = peek.find(b"\n")
        if not peek or (end < 0 and len(peek) >= MAX_LINE):
            self._drop(conn)  # closed, or not a CONNECT line
            return
        if end < 0:
            return  # wait for the rest of the line
        port = _parse_connect(conn.sock.recv(end + 1))
        if port is None or (conn.host_port, port) in self.conns:
            self._drop(conn)  # not "CONNECT <port>": the client gets a closed socket
            return
        del self._handshakes[conn.fd]
        conn.guest_port = port
        conn.state = REQUESTING
        self.conns[conn.key] = conn
        self.connections += 1
        self._rearm(conn)  # not OPEN: stop reading until the guest accepts
        self._want(conn, OP_REQUEST)
        self._fill_rx()

    # --- stats and snapshots -----------------------------------------------------------------

    def stats(self) -> dict:
        return {
            **super().stats(),
            "cid": self.cid,
            "uds": self.host.path,
            "connections": self.connections,
            "open": len(self.conns),
            "rx_packets": self.rx_packets,
            "tx_packets": self.tx_packets,
            "rx_bytes": self.rx_bytes,
            "tx_bytes": self.tx_bytes,
            "resets_sent": self.resets_sent,
            "bad_packets": self.bad_packets,
            "dropped": self.dropped,
            "transport_resets": self.transport_resets,
        }

    def device_state(self) -> dict:
        # Connections are not saved: their host sockets belong to this process.
        return {"cid": self.cid, "connections_reset": len(self.conns)}

    def restore_device_state(self, state: dict) -> None:
        self._close_all()
        self._reset_event = True

    def restore_state(self, state: dict) -> None:
        super().restore_state(state)
        with self.lock:
            if self.status & STATUS_DRIVER_OK and self.broken is None:
                self.activate()
                self.notify(EVENT)  # TRANSPORT_RESET, once the event queue has a buffer


def _buffers(sock: socket.socket) -> None:
    """A send buffer as large as the credit we give the guest: the kernel then holds what the
    guest may have in flight, and kvmpy rarely has to keep (and copy) any of it itself
    (measured: 0.13-0.15 of a Unix socket pair guest -> host with the default 208 KiB)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CONN_BUF)


def _parse_connect(line: bytes) -> int | None:
    parts = line.rstrip(b"\n").split(b" ")
    if len(parts) != 2 or parts[0] != b"CONNECT" or not parts[1].isdigit() or len(parts[1]) > 10:
        return None
    port = int(parts[1])
    return port if port <= 0xFFFF_FFFF else None
