"""The virtio core, virtio-mmio and the console, block and entropy devices, without KVM: a
Python driver plays the guest on a GuestMemory (kvmpy.devices.virtio.driver)."""

from __future__ import annotations

import os
import struct

import pytest

from kvmpy.devices.virtio import block as B
from kvmpy.devices.virtio import mmio as M
from kvmpy.devices.virtio.console import VirtioConsole
from kvmpy.devices.virtio.constants import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
)
from kvmpy.devices.virtio.driver import Arena, MmioRegs, start
from kvmpy.devices.virtio.queue import need_event
from kvmpy.devices.virtio.rng import VirtioRng
from kvmpy.devices.virtio.wiring import CallbackIrq
from kvmpy.memory import GuestMemory

MEM = 4 << 20
ARENA = 0x10000
DATA = 0x200000


@pytest.fixture
def mem():
    m = GuestMemory()
    m.add_region(0, MEM)
    yield m
    m.close()


def mmio(dev, mem):
    irq = CallbackIrq()
    t = M.VirtioMmio(dev, mem, irq, base=0xD000_0000)
    return t, MmioRegs(t), irq


def test_mmio_identity_registers(mem):
    t, regs, _ = mmio(VirtioRng(), mem)
    assert regs.r(M.MAGIC_VALUE) == 0x74726976
    assert regs.r(M.VERSION_REG) == 2
    assert regs.r(M.DEVICE_ID) == 4
    f = regs.device_features()
    assert f & F_VERSION_1 and f & F_EVENT_IDX and f & F_INDIRECT_DESC
    # Registers are 32-bit: a byte read is zero, a byte write is dropped.
    assert t.read(M.MAGIC_VALUE, 1) == b"\0"
    t.write(M.STATUS, b"\x01")
    assert regs.status() == 0
    assert regs.queue_max(0) == 256
    assert regs.queue_max(5) == 0  # no such queue


def test_feature_negotiation_refuses_unknown_and_legacy(mem):
    _, regs, _ = mmio(VirtioRng(), mem)
    regs.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    regs.set_driver_features(F_EVENT_IDX)  # no VERSION_1: legacy, refused
    regs.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    assert not regs.status() & STATUS_FEATURES_OK
    regs.set_driver_features(F_VERSION_1 | 1 << 50)  # a feature not offered
    regs.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    assert not regs.status() & STATUS_FEATURES_OK
    regs.set_driver_features(F_VERSION_1)
    regs.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    assert regs.status() & STATUS_FEATURES_OK
    # Features are fixed once FEATURES_OK is set.
    regs.set_driver_features(F_VERSION_1 | F_EVENT_IDX)
    assert regs.dev.device.driver_features == F_VERSION_1
    # DRIVER_OK without FEATURES_OK never sticks; clearing bits is ignored.
    regs.set_status(STATUS_ACKNOWLEDGE)
    assert regs.status() & STATUS_FEATURES_OK


def test_rng_fills_buffers_and_interrupts(mem):
    t, regs, irq = mmio(VirtioRng(), mem)
    (q,) = start(regs, Arena(mem, ARENA, 0x10000), 1)
    mem.fill(DATA, 4096, 0)
    q.add([], [(DATA, 100), (DATA + 200, 50)])
    regs.notify(0)
    assert q.take_used() == [(q.size - 1, 150)]
    assert mem.read(DATA, 100) != bytes(100)
    assert mem.read(DATA + 100, 100) == bytes(100)  # the gap was not touched
    assert irq.fired == 1 and regs.ack_interrupt() == 1


def test_rng_request_size_is_bounded(mem):
    t, regs, _ = mmio(VirtioRng(max_request=64), mem)
    (q,) = start(regs, Arena(mem, ARENA, 0x10000), 1)
    mem.fill(DATA, 4096, 0)
    q.add([], [(DATA, 4096)])
    regs.notify(0)
    assert q.take_used()[0][1] == 64
    assert mem.read(DATA + 64, 4096 - 64) == bytes(4096 - 64)


def test_console_output_and_input(mem):
    out = []
    con = VirtioConsole(sink=out.append)
    t, regs, irq = mmio(con, mem)
    rx, tx = start(regs, Arena(mem, ARENA, 0x10000), 2)
    mem.write(DATA, b"hello, ")
    mem.write(DATA + 0x100, b"world\n")
    tx.add([(DATA, 7), (DATA + 0x100, 6)], [])
    regs.notify(1)
    assert b"".join(out) == b"hello, world\n"
    assert tx.take_used() == [(tx.size - 1, 0)]
    con.feed(b"typed")  # no receive buffer yet: kept
    rx.add([], [(DATA + 0x1000, 3)])
    regs.notify(0)
    rx.add([], [(DATA + 0x2000, 16)])
    regs.notify(0)
    assert rx.take_used() == [(rx.size - 1, 3), (rx.size - 2, 2)]
    assert mem.read(DATA + 0x1000, 3) == b"typ" and mem.read(DATA + 0x2000, 2) == b"ed"
    assert con.read_config(0, 4) == struct.pack("<HH", 80, 25)


def test_console_input_is_bounded(mem):
    con = VirtioConsole()
    mmio(con, mem)
    con.feed(b"x" * (1 << 20))
    assert len(con._input) == 64 * 1024 and con.dropped_in == (1 << 20) - 64 * 1024


@pytest.fixture
def disk(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(range(256)) * (1 << 12))  # 1 MiB
    return p


def blk_request(q, regs, mem, rtype, sector, out=b"", inlen=0, slot=0):
    base = DATA + slot * 0x4000
    mem.write(base, struct.pack("<IIQ", rtype, 0, sector) + out)
    status = base + 0x3000
    mem.write(status, b"\xee")
    ins = ([(base + 0x1000, inlen)] if inlen else []) + [(status, 1)]
    q.add([(base, 16 + len(out))], ins)
    regs.notify(0)
    used = q.take_used()
    return used, mem.read(status, 1)[0], mem.read(base + 0x1000, inlen)


def test_block_read_write_flush_id(mem, disk):
    blk = B.VirtioBlock(str(disk), serial="disk-7")
    t, regs, _ = mmio(blk, mem)
    (q,) = start(regs, Arena(mem, ARENA, 0x10000), 1)
    assert struct.unpack_from("<Q", blk.read_config(0, 8))[0] == 2048
    used, st, data = blk_request(q, regs, mem, B.T_IN, 1, inlen=512)
    assert st == B.S_OK and data == (bytes(range(256)) * 2) and used[0][1] == 513
    used, st, _ = blk_request(q, regs, mem, B.T_OUT, 2, out=b"\xab" * 1024)
    assert st == B.S_OK and used[0][1] == 1
    assert disk.read_bytes()[1024:2048] == b"\xab" * 1024
    _, st, _ = blk_request(q, regs, mem, B.T_FLUSH, 0)
    assert st == B.S_OK
    _, st, ident = blk_request(q, regs, mem, B.T_GET_ID, 0, inlen=20)
    assert st == B.S_OK and ident == b"disk-7".ljust(20, b"\0")
    _, st, _ = blk_request(q, regs, mem, 99, 0)
    assert st == B.S_UNSUPP
    # Outside the disk, unaligned, or too large: IOERR, the file untouched.
    _, st, _ = blk_request(q, regs, mem, B.T_IN, 2047, inlen=1024)
    assert st == B.S_IOERR
    _, st, _ = blk_request(q, regs, mem, B.T_OUT, 0, out=b"x" * 100)
    assert st == B.S_IOERR
    _, st, _ = blk_request(q, regs, mem, B.T_IN, (1 << 64) - 1, inlen=512)
    assert st == B.S_IOERR
    assert blk.broken is None
    blk.close()


def test_block_read_only_refuses_writes(mem, disk):
    before = disk.read_bytes()
    blk = B.VirtioBlock(str(disk), readonly=True)
    assert blk.device_features & B.F_RO and not blk.device_features & B.F_DISCARD
    t, regs, _ = mmio(blk, mem)
    (q,) = start(regs, Arena(mem, ARENA, 0x10000), 1)
    _, st, _ = blk_request(q, regs, mem, B.T_OUT, 0, out=b"\x11" * 512)
    assert st == B.S_IOERR
    _, st, data = blk_request(q, regs, mem, B.T_IN, 0, inlen=512)
    assert st == B.S_OK and data == before[:512]
    assert disk.read_bytes() == before
    blk.close()


def test_block_discard_and_write_zeroes(mem, disk):
    blk = B.VirtioBlock(str(disk))
    t, regs, _ = mmio(blk, mem)
    (q,) = start(regs, Arena(mem, ARENA, 0x10000), 1, features=blk.device_features & ~(1 << 29))
    seg = struct.pack("<QII", 8, 8, 0)
    _, st, _ = blk_request(q, regs, mem, B.T_WRITE_ZEROES, 0, out=seg)
    assert st == B.S_OK and disk.read_bytes()[4096:8192] == bytes(4096)
    _, st, _ = blk_request(q, regs, mem, B.T_DISCARD, 0, out=struct.pack("<QII", 16, 8, 0))
    assert st in (B.S_OK, B.S_UNSUPP)
    _, st, _ = blk_request(q, regs, mem, B.T_DISCARD, 0, out=struct.pack("<QII", 2040, 16, 0))
    assert st == B.S_IOERR  # past the end
    blk.close()


def test_block_host_io_error_is_ioerr(mem, disk):
    blk = B.VirtioBlock(str(disk))
    t, regs, _ = mmio(blk, mem)
    (q,) = start(regs, Arena(mem, ARENA, 0x10000), 1)
    os.close(blk.fd)
    blk.fd = os.open("/dev/null", os.O_RDONLY)  # reads return 0 bytes: a short read
    _, st, _ = blk_request(q, regs, mem, B.T_IN, 0, inlen=512)
    assert st == B.S_IOERR
    _, st, _ = blk_request(q, regs, mem, B.T_OUT, 0, out=b"z" * 512)
    assert st == B.S_IOERR  # EBADF from a read-only descriptor
    assert blk.broken is None and blk.io_errors == 2
    blk.close()


# --- hostile queues ---------------------------------------------------------------------------


def hostile(mem, build):
    """Bring up an rng, let `build(q, mem)` write a bad chain, notify: NEEDS_RESET, not a crash."""
    dev = VirtioRng()
    t, regs, irq = mmio(dev, mem)
    (q,) = start(regs, Arena(mem, ARENA, 0x10000), 1, size=8)
    build(q, mem)
    regs.notify(0)
    assert regs.status() & STATUS_DEVICE_NEEDS_RESET, dev.broken
    assert dev.internal_errors == 0
    reason = dev.broken
    assert irq.fired >= 1 and regs.ack_interrupt() & 2  # config change interrupt
    # Until reset, the device ignores the queue; after it, it works again.
    regs.notify(0)
    (q,) = start(regs, Arena(mem, ARENA + 0x20000, 0x10000), 1)
    q.add([], [(DATA, 16)])
    regs.notify(0)
    assert not regs.status() & STATUS_DEVICE_NEEDS_RESET
    assert q.take_used() == [(q.size - 1, 16)]
    return reason


def put_desc(mem, q, i, addr, n, flags, nxt):
    mem.write(q.desc + 16 * i, struct.pack("<QIHH", addr, n, flags, nxt))


def publish(mem, q, head, idx=1):
    mem.write_u16(q.avail + 4, head)
    mem.write_u16(q.avail + 2, idx)


def test_hostile_descriptor_loop(mem):
    def build(q, mem):
        put_desc(mem, q, 0, DATA, 8, DESC_F_WRITE | DESC_F_NEXT, 1)
        put_desc(mem, q, 1, DATA, 8, DESC_F_WRITE | DESC_F_NEXT, 0)
        publish(mem, q, 0)

    assert "longer than the queue" in hostile(mem, build)


def test_hostile_buffer_outside_ram(mem):
    def build(q, mem):
        put_desc(mem, q, 0, MEM - 8, 16, DESC_F_WRITE, 0)
        publish(mem, q, 0)

    assert "outside guest RAM" in hostile(mem, build)


def test_hostile_avail_index_jump(mem):
    def build(q, mem):
        publish(mem, q, 0, idx=100)

    assert "jumped" in hostile(mem, build)


def test_hostile_head_and_next_out_of_range(mem):
    def build(q, mem):
        publish(mem, q, 9)

    assert "head index" in hostile(mem, build)

    def build2(q, mem):
        put_desc(mem, q, 0, DATA, 8, DESC_F_WRITE | DESC_F_NEXT, 8)
        publish(mem, q, 0)

    assert "next index" in hostile(mem, build2)


def test_hostile_readable_after_writable(mem):
    def build(q, mem):
        put_desc(mem, q, 0, DATA, 8, DESC_F_WRITE | DESC_F_NEXT, 1)
        put_desc(mem, q, 1, DATA, 8, 0, 0)
        publish(mem, q, 0)

    assert "device-readable buffer after" in hostile(mem, build)


def test_hostile_indirect_tables(mem):
    def nested(q, mem):
        mem.write(DATA + 0x800, struct.pack("<QIHH", DATA, 16, DESC_F_INDIRECT, 0))
        put_desc(mem, q, 0, DATA + 0x800, 16, DESC_F_INDIRECT, 0)
        publish(mem, q, 0)

    assert "nested" in hostile(mem, nested)

    def odd_size(q, mem):
        put_desc(mem, q, 0, DATA + 0x800, 24, DESC_F_INDIRECT, 0)
        publish(mem, q, 0)

    assert "indirect table" in hostile(mem, odd_size)

    def huge(q, mem):
        put_desc(mem, q, 0, DATA, 16 * 4096, DESC_F_INDIRECT, 0)
        publish(mem, q, 0)

    assert "indirect table" in hostile(mem, huge)

    def with_next(q, mem):
        put_desc(mem, q, 0, DATA + 0x800, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1)
        publish(mem, q, 0)

    assert "NEXT" in hostile(mem, with_next)

    def loop(q, mem):
        for i in range(8):
            mem.write(
                DATA + 0x800 + 16 * i,
                struct.pack("<QIHH", DATA, 4, DESC_F_WRITE | DESC_F_NEXT, (i + 1) % 8),
            )
        put_desc(mem, q, 0, DATA + 0x800, 16 * 8, DESC_F_INDIRECT, 0)
        publish(mem, q, 0)

    assert "longer than the queue" in hostile(mem, loop)


def test_rings_outside_ram_or_misaligned(mem):
    dev = VirtioRng()
    t, regs, _ = mmio(dev, mem)
    regs.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    regs.set_driver_features(F_VERSION_1)
    regs.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    regs.setup_queue(0, 256, MEM - 0x100, 0x1000, 0x2000)
    assert regs.status() & STATUS_DEVICE_NEEDS_RESET and "outside guest RAM" in dev.broken
    regs.reset()
    regs.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    regs.set_driver_features(F_VERSION_1)
    regs.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    regs.setup_queue(0, 256, 0x1008, 0x4000, 0x8000)
    assert "misaligned" in dev.broken


def test_queue_size_must_be_power_of_two(mem):
    _, regs, _ = mmio(VirtioRng(), mem)
    regs.w(M.QUEUE_SEL, 0)
    regs.w(M.QUEUE_NUM, 100)
    assert regs.dev.device.queues[0].size == 256
    regs.w(M.QUEUE_NUM, 64)
    assert regs.dev.device.queues[0].size == 64


def test_indirect_chain_and_event_idx_suppression(mem):
    dev = VirtioRng()
    t, regs, irq = mmio(dev, mem)
    (q,) = start(regs, Arena(mem, ARENA, 0x10000), 1)
    assert q.event_idx
    q.add([], [(DATA, 8), (DATA + 64, 8)], indirect_at=DATA + 0x1000)
    regs.notify(0)
    assert q.take_used() == [(q.size - 1, 16)]
    # The driver asked (used_event) to be interrupted after used index 0 only: after two more
    # completions without it moving used_event, no further interrupts.
    fired = irq.fired
    mem.write_u16(q.avail + 4 + 2 * q.size, 0)
    q.add([], [(DATA, 8)])
    regs.notify(0)
    q.add([], [(DATA, 8)])
    regs.notify(0)
    assert irq.fired == fired
    # avail_event tells the driver the device's position.
    assert mem.read_u16(q.used + 4 + 8 * q.size) == 3


def test_need_event_wraps():
    assert need_event(0xFFFF, 0, 0xFFFF)
    assert not need_event(5, 3, 1)
    assert need_event(1, 3, 1)


def test_reset_during_operation_and_snapshot_round_trip(mem, disk):
    blk = B.VirtioBlock(str(disk))
    t, regs, _ = mmio(blk, mem)
    (q,) = start(regs, Arena(mem, ARENA, 0x10000), 1)
    # A request made available but not yet notified: "in flight" for the snapshot.
    mem.write(DATA, struct.pack("<IIQ", B.T_IN, 0, 0))
    q.add([(DATA, 16)], [(DATA + 0x1000, 512), (DATA + 0x3000, 1)])
    saved = t.state()
    blk2 = B.VirtioBlock(str(disk))
    t2, regs2, _ = mmio(blk2, mem)
    t2.restore_state(saved)
    assert regs2.status() & STATUS_DRIVER_OK
    regs2.notify(0)
    assert q.take_used() == [(q.size - 1, 513)]  # the restored device served the request
    assert mem.read(DATA + 0x1000, 512) == disk.read_bytes()[:512]
    regs2.reset()
    assert regs2.status() == 0 and not blk2.queues[0].ready
    blk.close()
    blk2.close()


def test_device_writes_are_reported_to_dirty_tracking(mem):
    """Device writes go through views, not GuestMemory.write: a live migration still hears
    about every page the device wrote (buffers, used ring, avail_event)."""
    t, regs, _ = mmio(VirtioRng(), mem)
    (q,) = start(regs, Arena(mem, ARENA, 0x10000), 1)
    dirty = []
    mem.on_write = lambda gpa, n: dirty.append((gpa, n))
    try:
        q.add([], [(DATA, 100), (DATA + 0x3000, 50)])
        regs.notify(0)
    finally:
        mem.on_write = None
    assert (DATA, 100) in dirty and (DATA + 0x3000, 50) in dirty
    assert any(q.used <= g < q.used + 4 + 8 * q.size for g, _ in dirty)
    assert (q.used + 4 + 8 * q.size, 2) in dirty
