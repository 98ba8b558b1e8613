"""A small virtio driver in Python, working on guest memory through a transport's registers:
what the unit tests and the fuzz harness use to play the guest. (Guests use the C library in
kvmpy/guest/include/kvmpy/virtio.h, which follows the same steps.)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ...memory import GuestMemory
from . import mmio as M
from .constants import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
)

_DESC = struct.Struct("<QIHH")


class MmioRegs:
    """Register access to a VirtioMmio window, as a guest driver does it."""

    def __init__(self, dev: M.VirtioMmio):
        self.dev = dev

    def r(self, off: int) -> int:
        return int.from_bytes(self.dev.read(off, 4), "little")

    def w(self, off: int, v: int) -> None:
        self.dev.write(off, (v & 0xFFFF_FFFF).to_bytes(4, "little"))

    def reset(self) -> None:
        self.w(M.STATUS, 0)

    def status(self) -> int:
        return self.r(M.STATUS)

    def set_status(self, v: int) -> None:
        self.w(M.STATUS, v)

    def device_features(self) -> int:
        self.w(M.DEVICE_FEATURES_SEL, 0)
        lo = self.r(M.DEVICE_FEATURES)
        self.w(M.DEVICE_FEATURES_SEL, 1)
        return lo | self.r(M.DEVICE_FEATURES) << 32

    def set_driver_features(self, f: int) -> None:
        for sel in (0, 1):
            self.w(M.DRIVER_FEATURES_SEL, sel)
            self.w(M.DRIVER_FEATURES, f >> (32 * sel))

    def queue_max(self, q: int) -> int:
        self.w(M.QUEUE_SEL, q)
        return self.r(M.QUEUE_NUM_MAX)

    def setup_queue(self, q: int, size: int, desc: int, avail: int, used: int) -> None:
        self.w(M.QUEUE_SEL, q)
        self.w(M.QUEUE_NUM, size)
        for lo, addr in ((M.QUEUE_DESC_LOW, desc), (M.QUEUE_DRIVER_LOW, avail),
                         (M.QUEUE_DEVICE_LOW, used)):  # fmt: skip
            self.w(lo, addr)
            self.w(lo + 4, addr >> 32)
        self.w(M.QUEUE_READY, 1)

    def notify(self, q: int) -> None:
        self.w(M.QUEUE_NOTIFY, q)

    def config(self, off: int, size: int) -> bytes:
        return self.dev.read(M.CONFIG_OFFSET + off, size)

    def ack_interrupt(self) -> int:
        isr = self.r(M.INTERRUPT_STATUS)
        self.w(M.INTERRUPT_ACK, isr)
        return isr


class Arena:
    """A bump allocator over a range of guest RAM."""

    def __init__(self, memory: GuestMemory, base: int, size: int):
        self.memory, self.next, self.end = memory, base, base + size

    def alloc(self, n: int, align: int = 16) -> int:
        a = -(-self.next // align) * align
        if a + n > self.end:
            raise MemoryError("arena full")
        self.next = a + n
        self.memory.fill(a, n)
        return a


@dataclass
class DriverQueue:
    memory: GuestMemory
    index: int
    size: int
    desc: int
    avail: int
    used: int
    event_idx: bool = False
    free: list[int] = field(default_factory=list)
    avail_idx: int = 0
    last_used: int = 0
    chains: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.free = list(range(self.size))

    def add(self, out: list[tuple[int, int]], inn: list[tuple[int, int]],
            indirect_at: int | None = None) -> int:  # fmt: skip
        """Make a chain of device-readable `out` then device-writable `inn` buffers
        available; with `indirect_at`, through an indirect table written there."""
        bufs = [(a, n, 0) for a, n in out] + [(a, n, DESC_F_WRITE) for a, n in inn]
        mem = self.memory
        if indirect_at is not None:
            for i, (a, n, f) in enumerate(bufs):
                nxt = DESC_F_NEXT if i + 1 < len(bufs) else 0
                mem.write(indirect_at + 16 * i, _DESC.pack(a, n, f | nxt, i + 1))
            head = self.free.pop()
            mem.write(self.desc + 16 * head, _DESC.pack(indirect_at, 16 * len(bufs),
                                                        DESC_F_INDIRECT, 0))  # fmt: skip
        else:
            ids = [self.free.pop() for _ in bufs]
            for i, (a, n, f) in enumerate(bufs):
                last = i + 1 == len(bufs)
                nxt = 0 if last else ids[i + 1]
                mem.write(
                    self.desc + 16 * ids[i], _DESC.pack(a, n, f | (0 if last else DESC_F_NEXT), nxt)
                )
            head = ids[0]
            self.chains[head] = ids
        mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        mem.write_u16(self.avail + 2, self.avail_idx)
        return head

    def take_used(self) -> list[tuple[int, int]]:
        """Used elements since the last call: (head, written)."""
        out = []
        idx = self.memory.read_u16(self.used + 2)
        if (idx - self.last_used) & 0xFFFF > self.size:
            self.last_used = idx  # an impossible index (a hostile test wrote it): skip
            return out
        while self.last_used != idx:
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            head, n = struct.unpack("<II", self.memory.read(slot, 8))
            out.append((head, n))
            if head < self.size and head not in self.free:  # the used ring is guest memory
                self.free.extend(i for i in self.chains.pop(head, [head]) if i not in self.free)
            self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx:
            self.memory.write_u16(self.avail + 4 + 2 * self.size, self.last_used)
        return out


def start(regs, arena: Arena, queues: int, size: int = 0, features: int | None = None):
    """Bring a device up to DRIVER_OK (3.1.1); returns the driver queues."""
    regs.reset()
    regs.set_status(STATUS_ACKNOWLEDGE)
    regs.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    offered = regs.device_features()
    want = offered & (F_VERSION_1 | F_EVENT_IDX | F_INDIRECT_DESC) if features is None else features
    regs.set_driver_features(want)
    regs.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    if not regs.status() & STATUS_FEATURES_OK:
        raise RuntimeError("device refused the features")
    dqs = []
    for i in range(queues):
        n = size or regs.queue_max(i)
        n = min(n, regs.queue_max(i))
        desc = arena.alloc(16 * n, 16)
        avail = arena.alloc(6 + 2 * n, 2)
        used = arena.alloc(6 + 8 * n, 4)
        regs.setup_queue(i, n, desc, avail, used)
        dqs.append(DriverQueue(arena.memory, i, n, desc, avail, used, bool(want & F_EVENT_IDX)))
    regs.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)
    return dqs


class PciRegs:
    """Register access to a virtio-pci function behind a PciHost, found the way a guest finds
    it: through ECAM config reads and the vendor capabilities."""

    def __init__(self, host, slot: int):
        from . import pci as P

        self.P = P
        self.host, self.slot = host, slot
        self.caps: dict[int, tuple[int, int]] = {}
        ptr = self.cfg(0x34, 1)
        seen = 0
        while ptr and seen < 48:
            seen += 1
            cap_id = self.cfg(ptr, 1)
            if cap_id == 0x09:
                cfg_type = self.cfg(ptr + 3, 1)
                off = self.cfg(ptr + 8, 4)
                self.caps.setdefault(cfg_type, (off, ptr))
            elif cap_id == 0x11:
                self.msix_cap = ptr
            ptr = self.cfg(ptr + 1, 1)
        self.cfg_write(0x04, 2, 0x6)  # memory decoding and bus mastering
        self.bar = self.cfg(0x10, 4) & ~0xF
        self.notify_mult = self.cfg(self.caps[2][1] + 16, 4)

    def cfg(self, reg: int, size: int) -> int:
        ecam = self.host.ecam_device
        return int.from_bytes(ecam.read(self.slot << 15 | reg, size), "little")

    def cfg_write(self, reg: int, size: int, v: int) -> None:
        self.host.ecam_device.write(self.slot << 15 | reg, v.to_bytes(size, "little"))

    def _rw(self, cap: int, off: int, size: int, value: int | None = None) -> int:
        addr = self.bar + self.caps[cap][0] + off - self.host.aperture_base
        ap = self.host.aperture_device
        if value is None:
            return int.from_bytes(ap.read(addr, size), "little")
        ap.write(addr, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        return 0

    def common(self, off: int, size: int, value: int | None = None) -> int:
        return self._rw(1, off, size, value)

    def reset(self) -> None:
        self.common(self.P.C_STATUS, 1, 0)

    def status(self) -> int:
        return self.common(self.P.C_STATUS, 1)

    def set_status(self, v: int) -> None:
        self.common(self.P.C_STATUS, 1, v)

    def device_features(self) -> int:
        self.common(self.P.C_DFSELECT, 4, 0)
        lo = self.common(self.P.C_DF, 4)
        self.common(self.P.C_DFSELECT, 4, 1)
        return lo | self.common(self.P.C_DF, 4) << 32

    def set_driver_features(self, f: int) -> None:
        for sel in (0, 1):
            self.common(self.P.C_GFSELECT, 4, sel)
            self.common(self.P.C_GF, 4, f >> (32 * sel))

    def queue_max(self, q: int) -> int:
        self.common(self.P.C_QSELECT, 2, q)
        return self.common(self.P.C_QSIZE, 2)

    def setup_queue(self, q: int, size: int, desc: int, avail: int, used: int,
                    vector: int | None = None) -> None:  # fmt: skip
        P = self.P
        self.common(P.C_QSELECT, 2, q)
        self.common(P.C_QSIZE, 2, size)
        self.common(P.C_QMSIX, 2, q if vector is None else vector)
        for off, addr in ((P.C_QDESC, desc), (P.C_QDRIVER, avail), (P.C_QDEVICE, used)):
            self.common(off, 4, addr)
            self.common(off + 4, 4, addr >> 32)
        self.common(P.C_QENABLE, 2, 1)

    def notify(self, q: int) -> None:
        self.common(self.P.C_QSELECT, 2, q)
        noff = self.common(self.P.C_QNOFF, 2)
        self._rw(2, noff * self.notify_mult, 2, q)

    def config(self, off: int, size: int) -> bytes:
        return self._rw(4, off, size).to_bytes(size, "little")

    def ack_interrupt(self) -> int:
        return self._rw(3, 0, 1)

    def enable_msix(self, addresses: list[tuple[int, int]]) -> None:
        """Program the MSI-X table (address, data per vector), unmask, enable."""
        table = self.bar + self.P.MSIX_TABLE - self.host.aperture_base
        ap = self.host.aperture_device
        for i, (addr, data) in enumerate(addresses):
            ap.write(table + 16 * i, struct.pack("<I", addr & 0xFFFF_FFFF))
            ap.write(table + 16 * i + 4, struct.pack("<I", addr >> 32))
            ap.write(table + 16 * i + 8, struct.pack("<I", data))
            ap.write(table + 16 * i + 12, struct.pack("<I", 0))
        self.cfg_write(self.msix_cap + 2, 2, 1 << 15)
