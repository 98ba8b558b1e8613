"""A PCI host bridge on bus 0: configuration through ports 0xCF8/0xCFC (configuration
mechanism #1) and through ECAM (MMCONFIG: bus << 20 | device << 15 | function << 12 | register)
in the MMIO hole, and one MMIO aperture in which the functions' memory BARs live.

The bridge routes BAR accesses itself: it owns the whole aperture on the machine's MMIO bus
and looks up which function's BAR (with memory decoding enabled) an address falls in, so a
guest that moves a BAR changes a table here, not the machine's bus. A BAR placed outside the
aperture is not reachable, as behind a real bridge whose window does not cover it.
"""

from __future__ import annotations

import struct
from typing import Protocol

from .. import Device
from .config import CMD_MEMORY, ConfigSpace, valid_access

CONFIG_ADDRESS = 0xCF8
CONFIG_DATA = 0xCFC
ECAM_BUS_SIZE = 1 << 20
MAX_SLOTS = 32


class PciFunction(Protocol):
    name: str
    config: ConfigSpace

    def bar_read(self, bar: int, offset: int, size: int) -> bytes: ...

    def bar_write(self, bar: int, offset: int, data: bytes) -> None: ...


class HostBridgeFunction:
    """00:00.0, the host bridge itself (class 06 00 00)."""

    name = "pci-host"

    def __init__(self) -> None:
        self.config = ConfigSpace(0x1B36, 0x0008, 0x060000)

    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        pass


class PciHost:
    def __init__(self, aperture_base: int, aperture_size: int, ecam_base: int | None = None):
        self.slots: list[PciFunction | None] = [None] * MAX_SLOTS
        self.slots[0] = HostBridgeFunction()
        self.address = 0
        self.aperture_base = aperture_base
        self.aperture_size = aperture_size
        self.ecam_base = ecam_base
        self._next_bar = aperture_base
        self.port_device = _ConfigPorts(self)
        self.ecam_device = _Ecam(self)
        self.aperture_device = _Aperture(self)

    def add(self, fn: PciFunction, slot: int | None = None) -> int:
        """Plug `fn` into a free slot (or `slot`) and give its BARs addresses in the aperture,
        as firmware would; returns the slot."""
        if slot is None:
            slot = next((i for i in range(1, MAX_SLOTS) if self.slots[i] is None), None)
            if slot is None:
                raise ValueError("no free PCI slot on bus 0")
        elif self.slots[slot] is not None:
            raise ValueError(f"PCI slot {slot} is taken")
        cfg = fn.config
        for i, size in enumerate(cfg.bars):
            if size:
                addr = -(-self._next_bar // size) * size
                if addr + size > self.aperture_base + self.aperture_size:
                    raise ValueError("the PCI aperture is full")
                cfg.add_bar(i, size, addr)
                self._next_bar = addr + size
        self.slots[slot] = fn
        return slot

    def function(self, bus: int, dev: int, fn: int) -> PciFunction | None:
        if bus != 0 or fn != 0 or not 0 <= dev < MAX_SLOTS:
            return None
        return self.slots[dev]

    def config_read(self, bus: int, dev: int, fn: int, reg: int, size: int) -> bytes:
        f = self.function(bus, dev, fn)
        if f is None or not valid_access(reg, size):
            return b"\xff" * size
        read = getattr(f, "config_read", None)  # a function with live registers in its space
        return read(reg, size) if read is not None else f.config.read(reg, size)

    def config_write(self, bus: int, dev: int, fn: int, reg: int, data: bytes) -> None:
        f = self.function(bus, dev, fn)
        if f is not None and valid_access(reg, len(data)):
            f.config.write(reg, data)

    def bar_at(self, addr: int) -> tuple[PciFunction, int, int] | None:
        for f in self.slots:
            if f is None:
                continue
            cfg = f.config
            if not cfg.command & CMD_MEMORY:
                continue
            for i, size in enumerate(cfg.bars):
                if size:
                    base = cfg.bar_address(i)
                    if base <= addr < base + size:
                        return f, i, addr - base
        return None


class _ConfigPorts(Device):
    """0xCF8 (address, dword access only) and 0xCFC-0xCFF (data)."""

    name = "pci-config-ports"

    def __init__(self, host: PciHost):
        self.host = host

    def _target(self, port_off: int, size: int):
        a = self.host.address
        if not a & 0x8000_0000:
            return None
        reg = (a & 0xFC) + port_off
        if port_off + size > 4:
            return None
        return (a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 7, reg

    def read(self, offset: int, size: int) -> bytes:
        if offset < 4:
            if offset == 0 and size == 4:
                return struct.pack("<I", self.host.address)
            return b"\xff" * size
        t = self._target(offset - 4, size)
        if t is None:
            return b"\xff" * size
        return self.host.config_read(*t, size)

    # Snapshots find devices on the machine's buses; the bridge's functions are not on them,
    # so the always-present config ports carry the whole bus's state.
    def state(self) -> dict:
        return {
            "address": self.host.address,
            "functions": {
                str(i): f.state()
                for i, f in enumerate(self.host.slots)
                if f is not None and hasattr(f, "state")
            },
        }

    def restore_state(self, state: dict) -> None:
        self.host.address = int(state.get("address", 0)) & 0x80FF_FFFC
        saved = state.get("functions", {})
        for i, f in enumerate(self.host.slots):
            if f is not None and hasattr(f, "restore_state") and str(i) in saved:
                f.restore_state(saved[str(i)])

    def write(self, offset: int, data: bytes):
        if offset < 4:
            if offset == 0 and len(data) == 4:
                self.host.address = struct.unpack("<I", data)[0] & 0x80FF_FFFC
            return None
        t = self._target(offset - 4, len(data))
        if t is not None:
            self.host.config_write(*t, bytes(data))
        return None


class _Ecam(Device):
    name = "pci-ecam"

    def __init__(self, host: PciHost):
        self.host = host

    def read(self, offset: int, size: int) -> bytes:
        return self.host.config_read(offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 7,
                                     offset & 0xFFF, size)  # fmt: skip

    def write(self, offset: int, data: bytes):
        self.host.config_write(offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 7,
                               offset & 0xFFF, bytes(data))  # fmt: skip
        return None


class _Aperture(Device):
    name = "pci-aperture"

    def __init__(self, host: PciHost):
        self.host = host

    def read(self, offset: int, size: int) -> bytes:
        hit = self.host.bar_at(self.host.aperture_base + offset)
        if hit is None:
            return b"\xff" * size
        f, bar, off = hit
        return f.bar_read(bar, off, size)

    def write(self, offset: int, data: bytes):
        hit = self.host.bar_at(self.host.aperture_base + offset)
        if hit is not None:
            f, bar, off = hit
            f.bar_write(bar, off, bytes(data))
        return None
