"""Port-I/O and MMIO buses: an address range maps to a device and an offset within it.

Devices are sans-IO (see `devices/`): the bus only finds them. Port lookups are a dict hit per
port because the run loop does one per I/O exit; MMIO ranges are few and found by bisection.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from .devices import Device
from .errors import ConfigError


@dataclass(frozen=True)
class PortEntry:
    """What the run loop finds for a port: the device and the offset within it."""

    device: Device
    offset: int


class PortBus:
    def __init__(self) -> None:
        self.entries: dict[int, PortEntry] = {}

    def register(self, base: int, length: int, device: Device) -> None:
        if not (base >= 0 and base + length <= 0x10000 and length > 0):
            raise ConfigError(f"port range {base:#x}+{length} is outside 0..0xffff")
        for port in range(base, base + length):
            if port in self.entries:
                other = self.entries[port].device.name
                raise ConfigError(f"port {port:#x} of {device.name} is already taken by {other}")
        for port in range(base, base + length):
            self.entries[port] = PortEntry(device, port - base)

    def lookup(self, port: int) -> PortEntry | None:
        return self.entries.get(port)


class MmioBus:
    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, Device]] = []

    def register(self, base: int, length: int, device: Device) -> None:
        for start, end, other in self._ranges:
            if base < end and start < base + length:
                raise ConfigError(f"MMIO range of {device.name} overlaps {other.name}")
        i = bisect.bisect(self._starts, base)
        self._starts.insert(i, base)
        self._ranges.insert(i, (base, base + length, device))

    def ranges(self) -> list[tuple[int, int, Device]]:
        """(base, end, device) of every registered range, in address order."""
        return list(self._ranges)

    def lookup(self, addr: int) -> tuple[Device, int] | None:
        i = bisect.bisect(self._starts, addr) - 1
        if i >= 0:
            start, end, device = self._ranges[i]
            if addr < end:
                return device, addr - start
        return None
