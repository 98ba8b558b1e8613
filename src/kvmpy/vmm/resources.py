"""One allocator for the machine's address spaces and interrupt numbers, so devices added at any
time never collide: port-I/O ranges, MMIO windows, GSIs and interrupt vectors.

Every claim names its owner, so a collision is reported as "port 0x3f8 of serial1 is already
taken by serial0", and `release(owner)` frees what a removed device held. Fixed claims (a UART
at 0x3F8, the guest ABI's ports) and allocations (a virtio-mmio window anywhere in the MMIO
hole) go through the same table.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import ConfigError

# x86 keeps [3 GiB, 4 GiB) for MMIO. Device windows are handed out from its start; the top is
# the platform's own: IOAPIC (0xFEC00000), HPET (0xFED00000), LAPIC (0xFEE00000), KVM's
# real-mode TSS and identity map (0xFFFBC000) and the firmware area below 4 GiB.
MMIO_HOLE_START = 3 << 30
MMIO_DEVICE_END = 0xFEC0_0000
IOAPIC_BASE = 0xFEC0_0000
LAPIC_BASE = 0xFEE0_0000
#: GSIs 0..23 are the in-kernel IOAPIC's pins (0..15 also the PIC's); MSI routes use the rest.
IOAPIC_PINS = 24
MAX_GSI = 1024
#: IDT vectors kvmpy hands out for SDK guests' interrupts (below 0x20 are exceptions; the
#: top of the range is left for spurious/APIC-internal vectors).
VECTOR_MIN = 0x20
VECTOR_MAX = 0xEF


@dataclass(frozen=True)
class Claim:
    start: int
    end: int  # exclusive
    owner: str


class _Space:
    """Non-overlapping [start, end) claims in one numbering (ports, addresses, GSIs...)."""

    def __init__(self, name: str, unit: str, lo: int, hi: int, fmt: str = "{:#x}"):
        self.name, self.unit, self.lo, self.hi, self.fmt = name, unit, lo, hi, fmt
        self._starts: list[int] = []
        self._claims: list[Claim] = []

    def _describe(self, start: int, size: int) -> str:
        if size == 1:
            return f"{self.unit} {self.fmt.format(start)}"
        return f"{self.unit}s {self.fmt.format(start)}-{self.fmt.format(start + size - 1)}"

    def conflict(self, start: int, end: int) -> Claim | None:
        i = bisect.bisect(self._starts, start) - 1
        for c in self._claims[max(0, i) : i + 2]:
            if start < c.end and c.start < end:
                return c
        return None

    def claim(self, owner: str, start: int, size: int) -> int:
        if size <= 0:
            raise ConfigError(f"{owner}: a {self.name} range must not be empty")
        if start < self.lo or start + size > self.hi:
            raise ConfigError(
                f"{self._describe(start, size)} of {owner} {'is' if size == 1 else 'are'} "
                f"outside {self.fmt.format(self.lo)}-{self.fmt.format(self.hi - 1)}"
            )
        other = self.conflict(start, start + size)
        if other is not None:
            raise ConfigError(
                f"{self._describe(start, size)} of {owner} "
                f"{'is' if size == 1 else 'overlap what is'} already taken by {other.owner}"
            )
        i = bisect.bisect(self._starts, start)
        self._starts.insert(i, start)
        self._claims.insert(i, Claim(start, start + size, owner))
        return start

    def allocate(self, owner: str, size: int, align: int = 1, lo: int | None = None,
                 hi: int | None = None) -> int:  # fmt: skip
        lo = self.lo if lo is None else max(lo, self.lo)
        hi = self.hi if hi is None else min(hi, self.hi)
        cand = -(-lo // align) * align
        for c in self._claims:
            if c.end <= cand:
                continue
            if cand + size <= c.start:
                break
            cand = -(-c.end // align) * align
        if cand + size > hi:
            raise ConfigError(f"no free {self.name} range of {size} for {owner}")
        return self.claim(owner, cand, size)

    def release(self, owner: str) -> int:
        keep = [(s, c) for s, c in zip(self._starts, self._claims, strict=True) if c.owner != owner]
        n = len(self._claims) - len(keep)
        self._starts = [s for s, _ in keep]
        self._claims = [c for _, c in keep]
        return n

    def claims(self) -> list[Claim]:
        return list(self._claims)


class Resources:
    """The machine's ports, MMIO windows, GSIs and vectors. Thread-safe."""

    def __init__(self, ram: Iterable[tuple[int, int]] = ()):
        self._lock = threading.Lock()
        self.ports = _Space("port", "port", 0, 0x10000)
        self.mmio = _Space("MMIO", "address", 0, 1 << 52)
        self.gsis = _Space("GSI", "GSI", 0, MAX_GSI, "{}")
        self.vectors = _Space("vector", "vector", VECTOR_MIN, 0x100)
        for gpa, size in ram:
            self.mmio.claim("guest RAM", gpa, size)
        self.mmio.claim("IOAPIC", IOAPIC_BASE, 0x1000)
        self.mmio.claim("LAPIC", LAPIC_BASE, 0x1000)

    # Ports
    def claim_ports(self, owner: str, base: int, size: int) -> int:
        with self._lock:
            return self.ports.claim(owner, base, size)

    def allocate_ports(self, owner: str, size: int, align: int = 1) -> int:
        # 0x1000 and up: below it are the legacy ISA devices a guest may probe.
        with self._lock:
            return self.ports.allocate(owner, size, align, lo=0x1000)

    # MMIO
    def claim_mmio(self, owner: str, base: int, size: int) -> int:
        with self._lock:
            return self.mmio.claim(owner, base, size)

    def allocate_mmio(self, owner: str, size: int, align: int = 0x1000) -> int:
        with self._lock:
            return self.mmio.allocate(owner, size, max(align, 0x1000), MMIO_HOLE_START,
                                      MMIO_DEVICE_END)  # fmt: skip

    # GSIs
    def claim_gsi(self, owner: str, gsi: int) -> int:
        with self._lock:
            return self.gsis.claim(owner, gsi, 1)

    def allocate_gsi(self, owner: str) -> int:
        with self._lock:
            return self.gsis.allocate(owner, 1, lo=IOAPIC_PINS)

    # Vectors
    def claim_vector(self, owner: str, vector: int) -> int:
        with self._lock:
            return self.vectors.claim(owner, vector, 1)

    def allocate_vector(self, owner: str) -> int:
        with self._lock:
            return self.vectors.allocate(owner, 1, hi=VECTOR_MAX + 1)

    def release(self, owner: str) -> None:
        with self._lock:
            for space in (self.ports, self.mmio, self.gsis, self.vectors):
                space.release(owner)

    def to_dict(self) -> dict:
        """What is claimed, by whom (for `kvmpy run --json` and docs)."""
        with self._lock:
            return {
                space.name: [[c.start, c.end - c.start, c.owner] for c in space.claims()]
                for space in (self.ports, self.mmio, self.gsis, self.vectors)
            }
