"""virtio-vsock without KVM: a Python driver plays the guest's vsock stack on a GuestMemory,
and the host side is real Unix sockets (Firecracker's convention), served by a real I/O loop."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

from kvmpy.devices.virtio import mmio as M
from kvmpy.devices.virtio import vsock as V
from kvmpy.devices.virtio.constants import F_VERSION_1, STATUS_DEVICE_NEEDS_RESET
from kvmpy.devices.virtio.driver import Arena, MmioRegs, start
from kvmpy.devices.virtio.wiring import CallbackIrq
from kvmpy.errors import ConfigError
from kvmpy.memory import GuestMemory
from kvmpy.vmm.event_loop import EventLoop

MEM = 8 << 20
ARENA = 0x10000
RXBUF = 0x200000
TXBUF = 0x400000
CID = 7
GPORT = 5555


class Guest:
    """The guest's side of vsock over the device's queues (a test driver)."""

    def __init__(self, dev, mem, buf_alloc=1 << 20, rx_size=4096):
        self.dev, self.mem = dev, mem
        self.t = M.VirtioMmio(dev, mem, CallbackIrq(), base=0xD000_0000)
        self.regs = MmioRegs(self.t)
        self.rxq, self.txq, self.evq = start(self.regs, Arena(mem, ARENA, 0x20000), 3, size=64,
                                             features=F_VERSION_1)  # fmt: skip
        self.rx_size = rx_size
        self.rx_at = {}
        for i in range(32):
            self._post(i)
        self.tx_slot = 0
        self.buf_alloc = buf_alloc
        self.fwd_cnt = 0
        self.events = []
        self.inbox = []
        self.ev_at = self.evq.add([], [(0x7F0000, 8)])
        self.regs.notify(2)

    def _post(self, i):
        addr = RXBUF + i * self.rx_size
        self.rx_at[self.rxq.add([], [(addr, self.rx_size)])] = (addr, i)
        self.regs.notify(0)

    def send(self, op, port, dport=0, data=b"", flags=0, src_cid=CID, dst_cid=2, type_=1,
             length=None):  # fmt: skip
        addr = TXBUF + 0x11000 * (self.tx_slot % 16)
        self.tx_slot += 1
        hdr = struct.pack("<QQIIIHHIII", src_cid, dst_cid, port, dport,
                          len(data) if length is None else length, type_, op, flags,
                          self.buf_alloc, self.fwd_cnt)  # fmt: skip
        self.mem.write(addr, hdr + data)
        while not self.txq.free:
            self.txq.take_used()
            time.sleep(0.001)
        self.txq.add([(addr, 44 + len(data))], [])
        self.regs.notify(1)

    def packets(self):
        done = []
        for head, n in self.rxq.take_used():
            addr, i = self.rx_at.pop(head)
            raw = self.mem.read(addr, n)
            fields = struct.unpack_from("<QQIIIHHIII", raw)
            self.inbox.append((fields, raw[44 : 44 + fields[4]]))
            done.append(i)
        for i in done:  # re-post only now: the driver hands freed heads out again at once
            self._post(i)
        for _head, _n in self.evq.take_used():
            self.events.append(self.mem.read_u32(0x7F0000))
        out, self.inbox = self.inbox, []
        return out

    def wait(self, pred, timeout=10.0):
        got = []
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got += self.packets()
            if pred(got):
                return got
            time.sleep(0.002)
        raise AssertionError(f"timed out; packets so far: {[p[0] for p in got]}")


@pytest.fixture
def env(tmp_path):
    mem = GuestMemory()
    mem.add_region(0, MEM)
    loop = EventLoop("vsock-test")
    loop.start()
    path = str(tmp_path / "v.sock")
    dev = V.VirtioVsock(CID, path)
    dev.use_loop(loop)
    g = Guest(dev, mem)
    yield g, dev, path
    g.t.close()
    loop.stop()
    mem.close()


def ops(pkts):
    return [f[6] for f, _ in pkts]


def closed(sock) -> bool:
    """The peer closed (with unread data, Unix sockets report a reset)."""
    sock.settimeout(5)
    try:
        for _ in range(10000):  # what is still buffered, then the end
            if sock.recv(1 << 16) == b"":
                return True
    except ConnectionResetError:
        return True
    return False


def listen(path, port):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(f"{path}_{port}")
    s.listen(4)
    s.settimeout(10)
    return s


def test_config_and_cid_checks(env):
    g, dev, path = env
    assert struct.unpack("<Q", g.regs.config(0, 8))[0] == CID
    for bad in (0, 1, 2, 0xFFFF_FFFF, -1, True, "3"):
        with pytest.raises(ConfigError):
            V.check_cid(bad)


def test_guest_connects_to_host_port_and_echoes(env):
    g, dev, path = env
    srv = listen(path, 1234)
    g.send(V.OP_REQUEST, GPORT, 1234)
    got = g.wait(lambda p: V.OP_RESPONSE in ops(p))
    ((f, _),) = [p for p in got if p[0][6] == V.OP_RESPONSE]
    assert f[:4] == (2, CID, 1234, GPORT) and f[8] == V.CONN_BUF
    conn, _ = srv.accept()
    g.send(V.OP_RW, GPORT, 1234, b"hello host")
    assert conn.recv(100) == b"hello host"
    conn.sendall(b"hello guest")
    got = g.wait(lambda p: any(d for _, d in p))
    assert b"".join(d for f, d in got if f[6] == V.OP_RW) == b"hello guest"
    # The host closes: the guest hears SHUTDOWN, answers RST, the connection is gone.
    conn.close()
    got = g.wait(lambda p: V.OP_SHUTDOWN in ops(p))
    g.send(V.OP_RST, GPORT, 1234)
    deadline = time.monotonic() + 5
    while dev.conns and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not dev.conns and dev.stats()["connections"] == 1


def test_connect_to_nobody_is_reset(env):
    g, dev, path = env
    g.send(V.OP_REQUEST, GPORT, 999)
    got = g.wait(lambda p: V.OP_RST in ops(p))
    assert got[0][0][2:4] == (999, GPORT)


def test_host_connects_to_guest_listener(env):
    g, dev, path = env
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(10)
    c.connect(path)
    c.sendall(b"CONNECT 52\n")
    got = g.wait(lambda p: V.OP_REQUEST in ops(p))
    f = got[0][0]
    assert f[0] == 2 and f[1] == CID and f[3] == 52 and f[2] >= V.FIRST_HOST_PORT
    host_port = f[2]
    g.send(V.OP_RESPONSE, 52, host_port)
    assert c.recv(100) == b"OK %d\n" % host_port
    c.sendall(b"ping")
    got = g.wait(lambda p: any(d for _, d in p))
    assert b"".join(d for _, d in got) == b"ping"
    g.send(V.OP_RW, 52, host_port, b"pong")
    assert c.recv(100) == b"pong"
    # The guest shuts down both ways: kvmpy answers RST and closes the host socket.
    g.send(V.OP_SHUTDOWN, 52, host_port, flags=3)
    g.wait(lambda p: V.OP_RST in ops(p))
    assert c.recv(100) == b""


def test_bad_connect_lines_are_closed(env):
    g, dev, path = env
    for line in (b"HELLO 5\n", b"CONNECT x\n", b"CONNECT 99999999999\n", b"X" * 64):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(10)
        c.connect(path)
        c.sendall(line)
        assert closed(c)
        c.close()
    assert not dev.conns


def test_bad_packets_reset_the_connection(env):
    g, dev, path = env
    srv = listen(path, 77)
    g.send(V.OP_REQUEST, GPORT, 77)
    g.wait(lambda p: V.OP_RESPONSE in ops(p))
    conn, _ = srv.accept()
    # A payload length longer than the buffer: reset, host socket closed.
    g.send(V.OP_RW, GPORT, 77, b"abc", length=1000)
    g.wait(lambda p: V.OP_RST in ops(p))
    assert closed(conn)
    # Wrong source CID, a packet for no connection, an unknown type: RSTs, nothing breaks.
    g.send(V.OP_RW, 1, 77, b"x", src_cid=99)
    g.send(V.OP_RW, 2, 77, b"x")
    g.send(V.OP_REQUEST, 3, 77, type_=2)
    g.wait(lambda p: ops(p).count(V.OP_RST) >= 3)
    assert dev.stats()["bad_packets"] >= 3 and dev.broken is None


def test_guest_beyond_credit_is_reset(env):
    g, dev, path = env
    srv = listen(path, 78)
    g.send(V.OP_REQUEST, GPORT, 78)
    g.wait(lambda p: V.OP_RESPONSE in ops(p))
    conn, _ = srv.accept()  # never reads: the socket buffer fills, then our CONN_BUF
    chunk = os.urandom(V.MAX_PKT)
    sent = 0
    while sent < 8 << 20 and not dev.stats()["resets_sent"]:
        g.send(V.OP_RW, GPORT, 78, chunk)
        sent += len(chunk)
        g.packets()
    deadline = time.monotonic() + 5
    while not dev.stats()["resets_sent"] and time.monotonic() < deadline:
        time.sleep(0.01)
    # One bad packet (data beyond the credit) reset the connection; what the guest sent
    # after that met RSTs for a connection that no longer exists.
    assert dev.stats()["bad_packets"] == 1 and dev.stats()["resets_sent"] >= 1
    assert not dev.conns and closed(conn)


def test_host_to_guest_respects_credit(env):
    g, dev, path = env
    g.buf_alloc = 10000  # the guest has room for 10,000 bytes
    srv = listen(path, 79)
    g.send(V.OP_REQUEST, GPORT, 79)
    g.wait(lambda p: V.OP_RESPONSE in ops(p))
    conn, _ = srv.accept()
    payload = os.urandom(50000)
    threading.Thread(target=conn.sendall, args=(payload,), daemon=True).start()
    got = g.wait(lambda p: V.OP_CREDIT_REQUEST in ops(p))
    data = b"".join(d for f, d in got if f[6] == V.OP_RW)
    assert len(data) == 10000  # no more than the credit
    received = data
    while len(received) < len(payload):
        g.fwd_cnt = len(received)
        g.send(V.OP_CREDIT_UPDATE, GPORT, 79)
        got = g.wait(lambda p: any(f[6] == V.OP_RW for f, _ in p))
        received += b"".join(d for f, d in got if f[6] == V.OP_RW)
        assert len(received) - g.fwd_cnt <= 10000
    assert received == payload


def test_transport_reset_event_after_restore(env):
    g, dev, path = env
    srv = listen(path, 80)
    g.send(V.OP_REQUEST, GPORT, 80)
    g.wait(lambda p: V.OP_RESPONSE in ops(p))
    conn, _ = srv.accept()
    state = g.t.state()
    g.t.restore_state(state)  # as a restore does
    deadline = time.monotonic() + 5
    while not g.events and time.monotonic() < deadline:
        g.packets()
        time.sleep(0.01)
    assert g.events == [V.EVENT_TRANSPORT_RESET] and not dev.conns
    assert closed(conn)  # the host side of the old connection is closed
    srv2 = listen(path, 81)  # and new connections work
    g.send(V.OP_REQUEST, GPORT + 1, 81)
    g.wait(lambda p: V.OP_RESPONSE in ops(p))
    srv2.accept()


def test_small_receive_buffer_needs_reset(tmp_path):
    mem = GuestMemory()
    mem.add_region(0, MEM)
    dev = V.VirtioVsock(CID, str(tmp_path / "s"))
    try:
        g = Guest(dev, mem, rx_size=16)
        g.send(V.OP_REQUEST, GPORT, 5)  # answered by an RST that cannot fit
        assert dev.broken and g.regs.status() & STATUS_DEVICE_NEEDS_RESET
        g.t.close()
    finally:
        mem.close()


def test_uds_path_in_use_or_not_a_socket(tmp_path):
    path = str(tmp_path / "v.sock")
    dev = V.VirtioVsock(CID, path)
    try:
        with pytest.raises(ConfigError, match="another process listens"):
            V.VirtioVsock(CID, path)
    finally:
        dev.close()
    assert not os.path.exists(path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # bound, never listening: what a crashed VMM leaves behind
    stale.close()
    V.VirtioVsock(CID, path).close()  # replaced
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        V.VirtioVsock(CID, str(tmp_path / "file"))


def test_guest_close_delivers_what_the_host_has_not_read_yet(env, monkeypatch):
    """The guest sends more than the host socket holds and shuts down at once: kvmpy keeps
    the rest (within the credit), writes it as the host reads, then resets."""
    monkeypatch.setattr(V, "_buffers", lambda sock: None)  # the default 208 KiB send buffer
    g, dev, path = env
    srv = listen(path, 82)
    g.send(V.OP_REQUEST, GPORT, 82)
    g.wait(lambda p: V.OP_RESPONSE in ops(p))
    conn, _ = srv.accept()
    data = os.urandom(V.MAX_PKT)
    for _ in range(8):  # 512 KiB: more than a Unix socket buffers
        g.send(V.OP_RW, GPORT, 82, data)
    g.send(V.OP_SHUTDOWN, GPORT, 82, flags=3)
    time.sleep(0.2)
    assert dev.conns  # still writing
    got = bytearray()
    conn.settimeout(5)
    while chunk := conn.recv(1 << 16):
        got += chunk
    assert got == data * 8
    g.wait(lambda p: V.OP_RST in ops(p))
    assert not dev.conns
