"""Segment descriptors: the GDT bytes the guest sees and the matching `kvm_segment` values.

KVM_SET_SREGS loads the hidden part of each segment register directly, so the GDT only matters
when the guest reloads a selector (an interrupt, `iretq`, a far jump). Both are built from the
same `Segment` description so they cannot disagree.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ...kvm.structs import kvm_segment

# Access-byte types (S=1 code/data, S=0 system).
TYPE_DATA_RW = 0x3  # read/write, accessed
TYPE_CODE_RX = 0xB  # execute/read, accessed
TYPE_TSS_BUSY = 0xB  # 32/64-bit TSS, busy (what TR must hold for VM entry)
TYPE_TSS_AVAIL = 0x9


@dataclass(frozen=True)
class Segment:
    selector: int
    base: int
    limit: int  # in bytes - 1 (byte granular) or as KVM wants it (limit of the segment in bytes)
    type: int
    dpl: int = 0
    s: int = 1  # 1 = code/data, 0 = system
    db: int = 0
    l: int = 0  # noqa: E741 - the architectural name
    g: int = 0
    present: int = 1

    def to_kvm(self) -> kvm_segment:
        return kvm_segment(
            base=self.base, limit=self.limit, selector=self.selector, type=self.type,
            present=self.present, dpl=self.dpl, db=self.db, s=self.s, l=self.l, g=self.g,
            avl=0, unusable=0 if self.present else 1,
        )  # fmt: skip

    def descriptor(self) -> bytes:
        """The 8-byte GDT entry (16 bytes for a 64-bit system segment such as a TSS)."""
        limit = self.limit >> 12 if self.g else self.limit
        access = self.type | (self.s << 4) | (self.dpl << 5) | (self.present << 7)
        flags = (self.l << 1) | (self.db << 2) | (self.g << 3)
        low = (
            (limit & 0xFFFF)
            | ((self.base & 0xFFFFFF) << 16)
            | (access << 40)
            | (((limit >> 16) & 0xF) << 48)
            | (flags << 52)
            | (((self.base >> 24) & 0xFF) << 56)
        )
        out = struct.pack("<Q", low)
        if not self.s and self.base >> 32:
            out += struct.pack("<Q", self.base >> 32)
        return out


def flat_code64(selector: int, dpl: int) -> Segment:
    return Segment(selector, 0, 0xFFFFFFFF, TYPE_CODE_RX, dpl=dpl, l=1, g=1)


def flat_code32(selector: int, dpl: int = 0) -> Segment:
    return Segment(selector, 0, 0xFFFFFFFF, TYPE_CODE_RX, dpl=dpl, db=1, g=1)


def flat_data(selector: int, dpl: int = 0) -> Segment:
    return Segment(selector, 0, 0xFFFFFFFF, TYPE_DATA_RW, dpl=dpl, db=1, g=1)


def tss(selector: int, base: int, limit: int) -> Segment:
    return Segment(selector, base, limit, TYPE_TSS_BUSY, s=0)


def real_mode(selector: int, code: bool) -> Segment:
    return Segment(selector, selector << 4, 0xFFFF, TYPE_CODE_RX if code else TYPE_DATA_RW)


def null_segment() -> kvm_segment:
    return kvm_segment(unusable=1)


def gate64(handler: int, selector: int, dpl: int = 0, ist: int = 0, trap: bool = False) -> bytes:
    """A 16-byte long-mode IDT gate (interrupt gate unless `trap`)."""
    kind = 0xF if trap else 0xE
    low = (
        (handler & 0xFFFF)
        | (selector << 16)
        | (ist << 32)
        | ((kind | (dpl << 5) | 0x80) << 40)
        | (((handler >> 16) & 0xFFFF) << 48)
    )
    return struct.pack("<QQ", low, handler >> 32)


def gate32(handler: int, selector: int, dpl: int = 0, trap: bool = False) -> bytes:
    kind = 0xF if trap else 0xE
    low = (
        (handler & 0xFFFF)
        | (selector << 16)
        | ((kind | (dpl << 5) | 0x80) << 40)
        | (((handler >> 16) & 0xFFFF) << 48)
    )
    return struct.pack("<Q", low)
