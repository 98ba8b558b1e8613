"""PCI configuration space, the host bridge (0xCF8/0xCFC and ECAM) and virtio-pci with MSI-X
and INTx, without KVM."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.devices.pci.config import ConfigSpace
from kvmpy.devices.pci.host import PciHost
from kvmpy.devices.virtio import block as B
from kvmpy.devices.virtio import pci as P
from kvmpy.devices.virtio.console import VirtioConsole
from kvmpy.devices.virtio.constants import STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK
from kvmpy.devices.virtio.driver import Arena, PciRegs, start
from kvmpy.devices.virtio.rng import VirtioRng
from kvmpy.devices.virtio.wiring import CallbackIrq
from kvmpy.memory import GuestMemory

MEM = 4 << 20
APERTURE = 0xE100_0000
DATA = 0x200000


class Vec(CallbackIrq):
    def __init__(self, cpu=None):
        super().__init__()
        self.cpu = cpu
        self.routes = []

    def configure(self, address, data):
        if self.cpu is not None:
            address = (address & ~(0xFF << 12)) | self.cpu << 12
        self.routes.append((address, data))


@pytest.fixture
def mem():
    m = GuestMemory()
    m.add_region(0, MEM)
    yield m
    m.close()


def plug(dev, mem, irq_cpu=None):
    host = PciHost(APERTURE, 1 << 24, ecam_base=0xE000_0000)
    vecs = []

    def make(i, cpu):
        v = Vec(cpu)
        vecs.append(v)
        return v

    intx = CallbackIrq()
    fn = P.VirtioPci(dev, mem, make, intx=intx, irq_cpu=irq_cpu, intx_line=11)
    slot = host.add(fn)
    return host, fn, PciRegs(host, slot), vecs, intx


def test_config_space_ids_caps_and_bar_sizing(mem):
    host, fn, regs, _, _ = plug(VirtioRng(), mem)
    assert regs.cfg(0, 2) == 0x1AF4 and regs.cfg(2, 2) == 0x1044
    assert regs.cfg(0x08, 1) == 1  # revision 1: modern
    assert set(regs.caps) == {1, 2, 3, 5}  # rng has no device config
    # Host bridge at 00:00.0, empty slots read as all ones.
    assert regs.cfg.__self__.host.config_read(0, 0, 0, 0, 4) != b"\xff" * 4
    assert host.config_read(0, 31, 0, 0, 4) == b"\xff" * 4
    assert host.config_read(1, 0, 0, 0, 4) == b"\xff" * 4
    # BAR sizing: all ones reads back the size mask, then the address is restored.
    old = regs.cfg(0x10, 4)
    regs.cfg_write(0x10, 4, 0xFFFF_FFFF)
    assert regs.cfg(0x10, 4) == (~(P.BAR_SIZE - 1)) & 0xFFFF_FFFF
    regs.cfg_write(0x10, 4, old)
    assert regs.cfg(0x10, 4) == old
    # Read-only fields stay.
    regs.cfg_write(0, 4, 0)
    assert regs.cfg(0, 2) == 0x1AF4
    # Bad offsets and sizes: all ones, no effect.
    assert fn.config.read(4096, 4) == b"\xff" * 4
    assert fn.config.read(1, 2) == b"\xff\xff"
    assert fn.config.read(0, 3) == b"\xff\xff\xff"


def test_config_ports_cf8_cfc(mem):
    host, fn, regs, _, _ = plug(VirtioRng(), mem)
    ports = host.port_device
    ports.write(0, struct.pack("<I", 0x8000_0000 | 1 << 11))  # 00:01.0 register 0
    assert ports.read(4, 4) == struct.pack("<HH", 0x1AF4, 0x1044)
    assert ports.read(6, 2) == struct.pack("<H", 0x1044)
    assert ports.read(7, 2) == b"\xff\xff"  # crosses the dword
    ports.write(0, struct.pack("<I", 1 << 11))  # enable bit clear
    assert ports.read(4, 4) == b"\xff" * 4
    ports.write(0, b"\x01")  # byte writes to 0xCF8 are not the address register
    assert host.address == 1 << 11


@given(st.lists(st.tuples(st.integers(-8, 5000), st.sampled_from([0, 1, 2, 3, 4, 8]),
                          st.integers(0, 2**32 - 1)), max_size=60))  # fmt: skip
@settings(max_examples=200, deadline=None)
def test_config_space_random_access_is_safe(ops):
    cfg = ConfigSpace(0x1AF4, 0x1041, 0x020000)
    cfg.add_bar(0, 0x8000, 0xE000_0000)
    cfg.add_capability(0x09, bytes(14), b"\xff" * 14, lambda off, size: None)
    for off, size, v in ops:
        cfg.write(off, (v & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        out = cfg.read(off, size)
        assert len(out) == size
    assert cfg.u16(0) == 0x1AF4 and cfg.u16(2) == 0x1041
    assert cfg.bar_address(0) % 0x8000 == 0


def test_virtio_pci_block_with_msix(mem, tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\x5a" * (1 << 20))
    blk = B.VirtioBlock(str(disk))
    host, fn, regs, vecs, intx = plug(blk, mem, irq_cpu=[1, None])
    assert struct.unpack("<Q", regs.config(0, 8))[0] == 2048
    arena = Arena(mem, 0x10000, 0x10000)
    (q,) = start(regs, arena, 1)
    regs.enable_msix([(0xFEE0_0000, 0x41), (0xFEE0_0000, 0x42)])
    assert vecs[0].routes[-1] == (0xFEE0_1000, 0x41)  # irq_cpu 1 overrides the destination
    assert vecs[1].routes[-1] == (0xFEE0_0000, 0x42)
    mem.write(DATA, struct.pack("<IIQ", B.T_IN, 0, 0))
    q.add([(DATA, 16)], [(DATA + 0x1000, 4096), (DATA + 0x3000, 1)])
    regs.notify(0)
    assert q.take_used() == [(q.size - 1, 4097)]
    assert mem.read(DATA + 0x1000, 4096) == b"\x5a" * 4096
    assert vecs[0].fired == 1 and intx.fired == 0
    # Masked: the pending bit is set, and unmasking delivers it.
    table = regs.bar + P.MSIX_TABLE - APERTURE
    host.aperture_device.write(table + 12, struct.pack("<I", 1))
    q.add([(DATA, 16)], [(DATA + 0x1000, 512), (DATA + 0x3000, 1)])
    regs.notify(0)
    assert vecs[0].fired == 1 and fn.pba[0] & 1
    host.aperture_device.write(table + 12, struct.pack("<I", 0))
    assert vecs[0].fired == 2 and not fn.pba[0] & 1
    blk.close()


def test_virtio_pci_intx_fallback_and_isr(mem):
    con = VirtioConsole(sink=lambda b: None)
    host, fn, regs, vecs, intx = plug(con, mem)
    rx, tx = start(regs, Arena(mem, 0x10000, 0x10000), 2)
    mem.write(DATA, b"hi")
    tx.add([(DATA, 2)], [])
    regs.notify(1)
    assert intx.level and intx.fired == 1
    assert regs.ack_interrupt() == 1 and not intx.level
    assert regs.ack_interrupt() == 0
    assert fn.config.u8(0x3C) == 11 and fn.config.u8(0x3D) == 1


def test_virtio_pci_cfg_capability_window(mem):
    host, fn, regs, _, _ = plug(VirtioRng(), mem)
    cap = regs.caps[5][1]
    regs.cfg_write(cap + 4, 1, 0)  # bar 0
    regs.cfg_write(cap + 8, 4, P.C_NUMQ)  # offset
    regs.cfg_write(cap + 12, 4, 2)  # length
    assert regs.cfg(cap + 16, 2) == 1  # num_queues through config space


def test_virtio_pci_hostile_queue_and_bar_move(mem):
    rng = VirtioRng()
    host, fn, regs, vecs, _ = plug(rng, mem)
    (q,) = start(regs, Arena(mem, 0x10000, 0x10000), 1)
    mem.write_u16(q.avail + 2, 1000)
    regs.notify(0)
    assert regs.status() & STATUS_DEVICE_NEEDS_RESET
    regs.reset()
    # Move the BAR within the aperture: registers follow it.
    new = APERTURE + 0x10_0000
    regs.cfg_write(0x10, 4, new)
    regs.bar = new
    assert regs.status() == 0
    (q,) = start(regs, Arena(mem, 0x30000, 0x10000), 1)
    assert regs.status() & STATUS_DRIVER_OK


def test_msix_vector_out_of_range_reads_no_vector(mem):
    host, fn, regs, _, _ = plug(VirtioRng(), mem)
    regs.common(P.C_MSIX, 2, 7)
    assert regs.common(P.C_MSIX, 2) == P.NO_VECTOR
    regs.common(P.C_QSELECT, 2, 0)
    regs.common(P.C_QMSIX, 2, 0)
    assert regs.common(P.C_QMSIX, 2) == 0
    regs.common(P.C_QSELECT, 2, 9)  # no such queue
    assert regs.common(P.C_QSIZE, 2) == 0


class FakeNotifiers:
    def __init__(self):
        self.live: dict[int, tuple[int, int, int | None]] = {}
        self.next = 1000

    def add(self, addr, length, datamatch):
        self.next += 1
        self.live[self.next] = (addr, length, datamatch)
        return self.next

    def remove(self, fd):
        self.live.pop(fd, None)


def test_notify_ioeventfds_follow_driver_ok_reset_and_bar_moves(mem):
    host = PciHost(APERTURE, 1 << 24)
    notifiers = FakeNotifiers()
    con = VirtioConsole(sink=lambda b: None)
    fn = P.VirtioPci(con, mem, None, notifiers=notifiers)
    regs = PciRegs(host, host.add(fn))
    assert notifiers.live == {}
    start(regs, Arena(mem, 0x10000, 0x10000), 2)
    bar = regs.bar
    want = {(bar + P.NOTIFY, 2, None), (bar + P.NOTIFY + 4, 2, None)}
    assert set(notifiers.live.values()) == want
    # Memory decoding off: no ioeventfds; on again: back.
    regs.cfg_write(0x04, 2, 0x4)
    assert notifiers.live == {}
    regs.cfg_write(0x04, 2, 0x6)
    assert set(notifiers.live.values()) == want
    # The guest moves the BAR: the ioeventfds move with it.
    regs.cfg_write(0x10, 4, APERTURE + 0x20_0000)
    regs.bar = APERTURE + 0x20_0000
    moved = {(APERTURE + 0x20_0000 + P.NOTIFY + 4 * i, 2, None) for i in range(2)}
    assert set(notifiers.live.values()) == moved
    regs.reset()
    assert notifiers.live == {}


def test_mmio_ioeventfds_one_per_queue_with_datamatch(mem):
    from kvmpy.devices.virtio.driver import MmioRegs
    from kvmpy.devices.virtio.mmio import QUEUE_NOTIFY, VirtioMmio

    notifiers = FakeNotifiers()
    t = VirtioMmio(VirtioConsole(), mem, Vec(), base=0xD000_0000, notifiers=notifiers)
    start(MmioRegs(t), Arena(mem, 0x10000, 0x10000), 2)
    assert set(notifiers.live.values()) == {(0xD000_0000 + QUEUE_NOTIFY, 4, 0),
                                            (0xD000_0000 + QUEUE_NOTIFY, 4, 1)}  # fmt: skip
    MmioRegs(t).reset()
    assert notifiers.live == {}


def test_pci_bus_state_round_trip(mem, tmp_path):
    """Snapshots find devices on the buses: the bridge's config ports carry every function."""
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    host, fn, regs, vecs, _ = plug(B.VirtioBlock(str(disk)), mem)
    (q,) = start(regs, Arena(mem, 0x10000, 0x10000), 1)
    regs.enable_msix([(0xFEE0_0000, 0x41), (0xFEE0_0000, 0x42)])
    state = host.port_device.state()
    host2, fn2, regs2, vecs2, _ = plug(B.VirtioBlock(str(disk)), mem)
    host2.port_device.restore_state(state)
    assert regs2.status() & STATUS_DRIVER_OK and fn2.msix_enabled
    assert vecs2[0].routes[-1] == (0xFEE0_0000, 0x41)
    mem.write(DATA, struct.pack("<IIQ", B.T_IN, 0, 0))
    q.add([(DATA, 16)], [(DATA + 0x1000, 512), (DATA + 0x3000, 1)])
    regs2.notify(0)
    assert q.take_used() == [(q.size - 1, 513)] and vecs2[0].fired == 1
