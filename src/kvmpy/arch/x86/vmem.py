"""Access to guest memory by guest-virtual address, as the vCPU currently sees it.

The translation regime (CR0/CR3/CR4/EFER and the code segment) is read from the vCPU once per
`snapshot()`; every page of an access is translated separately, so a buffer that crosses into an
unmapped page fails with PageFault instead of running on into whatever follows in host memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...kvm.structs import kvm_sregs
from ...memory import PAGE_SIZE, GuestMemory
from .paging import CR0_PE, EFER_LMA, PageFault, translate


@dataclass(frozen=True)
class Regime:
    cr0: int
    cr3: int
    cr4: int
    efer: int
    cs_base: int
    cs_db: int
    cs_l: int
    cpl: int

    @classmethod
    def from_sregs(cls, s: kvm_sregs) -> Regime:
        return cls(s.cr0, s.cr3, s.cr4, s.efer, s.cs.base, s.cs.db, s.cs.l, s.cs.dpl)

    @property
    def long_mode(self) -> bool:
        """64-bit code (as opposed to compatibility, protected or real mode)."""
        return bool(self.efer & EFER_LMA and self.cs_l)

    @property
    def code_bits(self) -> int:
        if self.long_mode:
            return 64
        if self.cr0 & CR0_PE and self.cs_db:
            return 32
        return 16


class VirtualMemory:
    def __init__(self, memory: GuestMemory, regime: Regime):
        self.memory = memory
        self.regime = regime

    def translate(self, gva: int) -> int:
        r = self.regime
        if not r.long_mode:
            gva &= 0xFFFF_FFFF
        m = self.memory
        return translate(gva, r.cr0, r.cr3, r.cr4, r.efer, m.read_u32, m.read_u64).gpa

    def _chunks(self, gva: int, length: int):
        """(gpa, n) pieces of [gva, gva+length), one per page; each gpa is RAM."""
        while length > 0:
            n = min(length, PAGE_SIZE - (gva & (PAGE_SIZE - 1)))
            gpa = self.translate(gva)
            if not self.memory.is_ram(gpa, n):
                raise PageFault(f"{gva:#x} maps to {gpa:#x}, which is not RAM")
            yield gpa, n
            gva += n
            length -= n

    def read(self, gva: int, length: int) -> bytes:
        return b"".join(self.memory.read(gpa, n) for gpa, n in self._chunks(gva, length))

    def read_partial(self, gva: int, length: int) -> bytes:
        """As many bytes as are readable from `gva` on, up to `length` (for fault reports)."""
        out = bytearray()
        try:
            for gpa, n in self._chunks(gva, length):
                out += self.memory.read(gpa, n)
        except PageFault:
            pass
        return bytes(out)

    def write(self, gva: int, data: bytes) -> None:
        # Translate everything first so a fault leaves guest memory untouched.
        chunks = list(self._chunks(gva, len(data)))
        pos = 0
        for gpa, n in chunks:
            self.memory.write(gpa, data[pos : pos + n])
            pos += n

    def read_cstring(self, gva: int, limit: int) -> bytes | None:
        """The bytes before the first NUL within `limit` bytes, or None if there is none.
        Raises PageFault if the string runs into an unmapped page before its NUL."""
        out = bytearray()
        while len(out) < limit:
            n = min(limit - len(out), PAGE_SIZE - (gva & (PAGE_SIZE - 1)))
            gpa = self.translate(gva)
            if not self.memory.is_ram(gpa, n):
                raise PageFault(f"{gva:#x} maps to {gpa:#x}, which is not RAM")
            chunk = self.memory.view(gpa, n)
            nul = bytes(chunk).find(0)
            if nul >= 0:
                out += chunk[:nul]
                return bytes(out)
            out += chunk
            gva += n
        return None
