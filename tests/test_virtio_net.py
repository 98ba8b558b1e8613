"""virtio-net without KVM: a Python driver plays the guest (kvmpy.devices.virtio.driver) and a
datagram socket plays the host network (SocketBackend); one test opens a real TAP."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from kvmpy.devices.virtio import mmio as M
from kvmpy.devices.virtio import net as N
from kvmpy.devices.virtio.constants import (
    F_EVENT_IDX,
    F_VERSION_1,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_FEATURES_OK,
)
from kvmpy.devices.virtio.driver import Arena, MmioRegs, start
from kvmpy.devices.virtio.tap import VNET_HDR_LEN, SocketBackend, TapBackend
from kvmpy.devices.virtio.wiring import CallbackIrq
from kvmpy.errors import ConfigError
from kvmpy.memory import GuestMemory

MEM = 4 << 20
ARENA = 0x10000
DATA = 0x200000
HDR0 = bytes(VNET_HDR_LEN)


@pytest.fixture
def mem():
    m = GuestMemory()
    m.add_region(0, MEM)
    yield m
    m.close()


@pytest.fixture
def net(mem):
    backend, peer = SocketBackend.pair()
    dev = N.VirtioNet(backend, mac=bytes.fromhex("525400123456"))
    t = M.VirtioMmio(dev, mem, CallbackIrq(), base=0xD000_0000)
    yield dev, MmioRegs(t), peer
    t.close()
    peer.close()


def bring_up(regs, mem, features=F_VERSION_1 | F_EVENT_IDX, size=16):
    return start(regs, Arena(mem, ARENA, 0x10000), 2, size=size, features=features)


def frame(n, tag=0):
    dst, src = b"\xff" * 6, bytes.fromhex("020000000001")
    return dst + src + b"\x88\xb5" + bytes((tag + i) & 0xFF for i in range(n - 14))


def test_config_mac_and_link(net, mem):
    dev, regs, _ = net
    assert regs.config(0, 6) == bytes.fromhex("525400123456")
    assert regs.config(6, 2) == b"\x01\x00"  # LINK_UP
    f = regs.device_features()
    assert f & N.F_MAC and f & N.F_STATUS and f & N.F_MRG_RXBUF
    assert not f & N.F_CSUM  # a datagram socket cannot finish checksums: not offered
    bring_up(regs, mem)
    gen = dev.config_generation
    dev.set_link(False)
    assert regs.config(6, 2) == b"\x00\x00" and dev.config_generation != gen


def test_transmit_reaches_the_backend(net, mem):
    dev, regs, peer = net
    _, tx = bring_up(regs, mem)
    for i in range(5):
        f = frame(60 + i, i)
        mem.write(DATA + 0x1000 * i, HDR0 + f)
        # header and frame in one buffer, or split in two (any layout, VERSION_1)
        if i % 2:
            tx.add([(DATA + 0x1000 * i, VNET_HDR_LEN), (DATA + 0x1000 * i + 12, len(f))], [])
        else:
            tx.add([(DATA + 0x1000 * i, VNET_HDR_LEN + len(f))], [])
    regs.notify(1)
    got = [peer.recv(65536) for _ in range(5)]
    assert got == [HDR0 + frame(60 + i, i) for i in range(5)]
    assert len(tx.take_used()) == 5
    s = dev.stats()
    assert s["tx_packets"] == 5 and s["tx_bytes"] == sum(60 + i for i in range(5))


def test_transmit_drops_bad_frames(net, mem):
    dev, regs, peer = net
    _, tx = bring_up(regs, mem)
    mem.write(DATA, b"\x01" + bytes(11) + frame(60))  # NEEDS_CSUM, CSUM not negotiated
    tx.add([(DATA, 72)], [])
    mem.write(DATA + 0x1000, b"\x00\x01" + bytes(10) + frame(60))  # GSO TCPv4, not negotiated
    tx.add([(DATA + 0x1000, 72)], [])
    tx.add([(DATA, 8)], [])  # shorter than the header
    regs.notify(1)
    assert dev.stats()["tx_dropped"] == 3 and dev.stats()["tx_packets"] == 0
    assert len(tx.take_used()) == 3  # every chain comes back
    with pytest.raises(BlockingIOError):
        peer.recv(65536, socket.MSG_DONTWAIT)
    assert dev.broken is None


def test_receive_one_frame_per_buffer(net, mem):
    dev, regs, peer = net
    rx, _ = bring_up(regs, mem)
    at = {rx.add([], [(DATA + 0x1000 * i, 2048)]): DATA + 0x1000 * i for i in range(4)}
    regs.notify(0)
    frames = [frame(64 + 100 * i, i) for i in range(3)]
    for f in frames:
        peer.send(HDR0 + f)
    dev.process(0)  # what the I/O thread does when the backend is readable
    used = rx.take_used()
    assert [n for _, n in used] == [VNET_HDR_LEN + len(f) for f in frames]
    for (head, n), f in zip(used, frames, strict=True):
        data = mem.read(at[head], n)
        assert struct.unpack_from("<H", data, 10)[0] == 1  # num_buffers
        assert data[12:] == f
    assert dev.stats()["rx_packets"] == 3


def test_receive_mergeable_buffers(net, mem):
    dev, regs, peer = net
    rx, _ = bring_up(regs, mem, F_VERSION_1 | N.F_MRG_RXBUF)
    at = {rx.add([], [(DATA + 0x1000 * i, 512)]): DATA + 0x1000 * i for i in range(8)}
    regs.notify(0)
    f = frame(1400)
    peer.send(HDR0 + f)
    dev.process(0)
    used = rx.take_used()
    assert len(used) == 3 and sum(n for _, n in used) == VNET_HDR_LEN + 1400
    data = b"".join(mem.read(at[h], n) for h, n in used)
    assert struct.unpack_from("<H", data, 10)[0] == 3 and data[12:] == f


def test_small_buffer_drops_the_frame_and_keeps_the_buffer(net, mem):
    dev, regs, peer = net
    rx, _ = bring_up(regs, mem)
    rx.add([], [(DATA, 100)])
    regs.notify(0)
    peer.send(HDR0 + frame(1000))
    peer.send(HDR0 + frame(60))
    dev.process(0)
    used = rx.take_used()
    assert [n for _, n in used] == [72]  # the big frame was dropped, the buffer kept for the next
    assert dev.stats()["rx_dropped"] == 1


def test_a_guest_that_takes_no_frames_costs_bounded_memory(net, mem):
    dev, regs, peer = net
    rx, _ = bring_up(regs, mem)
    sent = 0
    for _ in range(4):
        for _ in range(200):
            try:
                peer.send(HDR0 + frame(1000), socket.MSG_DONTWAIT)
                sent += 1
            except BlockingIOError:
                break
        dev.process(0)
    s = dev.stats()
    assert s["rx_pending"] <= N.RX_PENDING_FRAMES
    assert dev._pending_bytes <= N.RX_PENDING_BYTES
    assert s["rx_dropped"] == sent - s["rx_pending"] and s["rx_dropped"] > 0
    # Buffers at last: the waiting frames go first, in order.
    for i in range(4):
        rx.add([], [(DATA + 0x1000 * i, 2048)])
    regs.notify(0)
    assert len(rx.take_used()) == 4 and dev.stats()["rx_packets"] == 4


def test_offload_dependencies_checked():
    class OffloadBackend:
        offloads = True
        name = "x"

        def __init__(self):
            self.flags = None

        def set_offload(self, flags):
            self.flags = flags

        def fileno(self):
            return -1

        def close(self):
            pass

    dev = N.VirtioNet(OffloadBackend())
    assert dev.device_features & N.OFFLOADS == N.OFFLOADS
    assert not dev.accept_features(F_VERSION_1 | N.F_GUEST_TSO4)  # needs GUEST_CSUM
    assert not dev.accept_features(F_VERSION_1 | N.F_HOST_TSO6)  # needs CSUM
    assert not dev.accept_features(F_VERSION_1 | N.F_CSUM | N.F_HOST_ECN)  # needs a TSO
    assert dev.accept_features(F_VERSION_1 | N.F_GUEST_CSUM | N.F_GUEST_TSO4 | N.F_GUEST_TSO6)
    dev.driver_features = F_VERSION_1 | N.F_GUEST_CSUM | N.F_GUEST_TSO4
    dev.status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
    dev.activate()
    assert dev.backend.flags == 0x01 | 0x02  # TUN_F_CSUM | TUN_F_TSO4


def test_mac_parsing():
    assert N.parse_mac("52:54:00:ab:cd:EF") == bytes.fromhex("525400abcdef")
    for bad in ("52:54:00:ab:cd", "zz:54:00:ab:cd:ef", "01:00:5e:00:00:01", "525400abcdef"):
        with pytest.raises(ValueError):
            N.parse_mac(bad)
    m = N.random_mac()
    assert m[0] == 2 and len(m) == 6


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                    reason="creating a TAP needs root and /dev/net/tun")  # fmt: skip
def test_tap_auto_is_created_and_removed():
    tap = TapBackend.open("auto")
    name = tap.name
    try:
        assert name.startswith("kvtap") and os.path.exists(f"/sys/class/net/{name}")
        assert tap.mtu() == 1500
    finally:
        tap.close()
    assert not os.path.exists(f"/sys/class/net/{name}")
    with pytest.raises(ConfigError):
        TapBackend.open("bad name!")


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _tcp_frame(payload: bytes) -> bytes:
    """An Ethernet/IPv4/TCP frame as a guest with CSUM and HOST_TSO4 hands it over: the TCP
    checksum field holds only the pseudo-header sum (the device side finishes it)."""
    src, dst = bytes([10, 99, 0, 1]), bytes([10, 99, 0, 2])
    tcp_len = 20 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, 1, 0x4000, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", 0xFFFF - _csum(ip)) + ip[12:]
    pseudo = _csum(src + dst + struct.pack("!BBH", 0, 6, tcp_len))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5000, 1, 0, 5 << 4, 0x18, 65535, pseudo, 0)
    eth = bytes.fromhex("525400000002") + bytes.fromhex("525400000001") + b"\x08\x00"
    return eth + ip + tcp + payload


@pytest.mark.skipif(os.geteuid() != 0, reason="TAPs and a network namespace need root")
def test_offloads_end_to_end_through_the_host_kernel(mem):
    """Guest A hands its TAP one 3000-byte TCP segment with a partial checksum (CSUM,
    HOST_TSO4); guest B did not accept receive offloads, so the kernel segments it on the way
    through a bridge and B receives three segments of 1000 bytes with correct checksums."""
    from pyroute2 import IPRoute, NetNS, netns

    ns_name = f"kvmpy-offload-{os.getpid()}"
    netns.create(ns_name)
    ns = NetNS(ns_name)
    taps, transports = [], []
    try:
        ns.link("add", ifname="br0", kind="bridge")
        br = ns.link_lookup(ifname="br0")[0]
        ns.link("set", index=br, state="up")
        for i in range(2):
            tap = TapBackend.open(f"kvo{os.getpid() % 100000}{'ab'[i]}")
            taps.append(tap)
            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname=tap.name)[0], net_ns_fd=ns_name)
            idx = ns.link_lookup(ifname=tap.name)[0]
            ns.link("set", index=idx, master=br, state="up")
        a = N.VirtioNet(taps[0], name="a", mac=bytes.fromhex("525400000001"))
        b = N.VirtioNet(taps[1], name="b", mac=bytes.fromhex("525400000002"))
        assert a.device_features & N.OFFLOADS == N.OFFLOADS  # a TAP finishes them
        ta = M.VirtioMmio(a, mem, CallbackIrq(), base=0xD000_0000)
        tb = M.VirtioMmio(b, mem, CallbackIrq(), base=0xD000_1000)
        transports += [ta, tb]
        _, tx_a = start(MmioRegs(ta), Arena(mem, ARENA, 0x10000), 2, size=16,
                        features=F_VERSION_1 | N.F_CSUM | N.F_HOST_TSO4)  # fmt: skip
        rx_b, _ = start(MmioRegs(tb), Arena(mem, ARENA + 0x10000, 0x10000), 2, size=16,
                        features=F_VERSION_1)  # fmt: skip
        at = {rx_b.add([], [(DATA + 0x1000 * i, 2048)]): DATA + 0x1000 * i for i in range(8)}
        MmioRegs(tb).notify(0)
        payload = os.urandom(3000)
        hdr = struct.pack("<BBHHHHH", N.HDR_F_NEEDS_CSUM, N.GSO_TCPV4, 54, 1000, 34, 16, 0)
        mem.write(0x300000, hdr + _tcp_frame(payload))
        tx_a.add([(0x300000, 12 + 54 + 3000)], [])
        MmioRegs(ta).notify(1)
        assert a.stats()["tx_packets"] == 1 and a.stats()["tx_dropped"] == 0
        got = b""
        segments = []
        deadline = time.monotonic() + 5
        while len(got) < 3000 and time.monotonic() < deadline:
            b.process(0)
            for head, n in rx_b.take_used():
                f = mem.read(at[head], n)[12:]
                if f[12:14] != b"\x08\x00" or f[23] != 6:
                    continue  # not ours
                ip, tcp = f[14:34], f[34:]
                assert _csum(ip) == 0xFFFF  # a valid IPv4 header checksum
                pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(tcp))
                assert _csum(pseudo + tcp) == 0xFFFF  # the kernel finished the TCP checksum
                segments.append(len(tcp) - 20)
                got += tcp[20:]
            time.sleep(0.01)
        assert segments == [1000, 1000, 1000] and got == payload
    finally:
        for t in transports:
            t.close()
        for t in taps:
            t.close()
        ns.close()
        netns.remove(ns_name)
