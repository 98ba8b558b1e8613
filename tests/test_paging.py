"""The guest page-table walker (`translate`) and the identity-map builders.

Unit tests run on synthetic page tables in a bytearray-backed fake guest memory; the KVM tests at
the end compare `translate()` with KVM_TRANSLATE on tables in a real guest's RAM.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvmpy.arch.x86 import modes
from kvmpy.arch.x86.modes import Mode
from kvmpy.arch.x86.paging import (
    ADDR_MASK_64,
    CR0_PE,
    CR0_PG,
    CR4_LA57,
    CR4_PAE,
    CR4_PSE,
    EFER_LMA,
    EFER_LME,
    PAGE_1G,
    PAGE_2M,
    PAGE_4K,
    PAGE_4M,
    PTE_A,
    PTE_D,
    PTE_G,
    PTE_NX,
    PTE_P,
    PTE_PCD,
    PTE_PS,
    PTE_PWT,
    PTE_RW,
    PTE_US,
    MapRange,
    PageFault,
    TableAllocator,
    Translation,
    build_identity_map_32,
    build_identity_map_64,
    translate,
)
from kvmpy.errors import GuestMemoryError
from kvmpy.memory import GuestMemory

K, M, G = 1 << 10, 1 << 20, 1 << 30
RWU = PTE_RW | PTE_US


class FakeMemory:
    """Guest-physical [base, base+size) in a bytearray. Reads outside raise GuestMemoryError, as
    GuestMemory does; every successful read is recorded so tests can check the walk."""

    def __init__(self, size: int = 256 * K, base: int = 0):
        self.base = base
        self.buf = bytearray(size)
        self.reads: list[int] = []
        self.bad_reads: list[int] = []

    def _off(self, gpa: int, n: int) -> int:
        if gpa < self.base or gpa + n > self.base + len(self.buf):
            self.bad_reads.append(gpa)
            raise GuestMemoryError(f"guest-physical range [{gpa:#x}, +{n:#x}) is not RAM")
        return gpa - self.base

    def read_u32(self, gpa: int) -> int:
        off = self._off(gpa, 4)
        self.reads.append(gpa)
        return int.from_bytes(self.buf[off : off + 4], "little")

    def read_u64(self, gpa: int) -> int:
        off = self._off(gpa, 8)
        self.reads.append(gpa)
        return int.from_bytes(self.buf[off : off + 8], "little")

    def write(self, gpa: int, data: bytes) -> None:
        if gpa < self.base or gpa + len(data) > self.base + len(self.buf):
            raise GuestMemoryError(f"write to {gpa:#x} outside the fake memory")
        off = gpa - self.base
        self.buf[off : off + len(data)] = data

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(4, "little"))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(8, "little"))

    def peek_u64(self, gpa: int) -> int:
        off = gpa - self.base
        return int.from_bytes(self.buf[off : off + 8], "little")


@dataclass(frozen=True)
class Regime:
    cr0: int
    cr4: int
    efer: int

    def walk(self, mem, cr3: int, gva: int) -> Translation:
        mem.reads.clear()
        return translate(gva, self.cr0, cr3, self.cr4, self.efer, mem.read_u32, mem.read_u64)


REAL = Regime(0, 0, 0)
PROTECTED = Regime(CR0_PE, 0, 0)
PAGED32 = Regime(CR0_PE | CR0_PG, 0, 0)
PAGED32_PSE = Regime(CR0_PE | CR0_PG, CR4_PSE, 0)
PAE = Regime(CR0_PE | CR0_PG, CR4_PAE, 0)
LONG4 = Regime(CR0_PE | CR0_PG, CR4_PAE, EFER_LME | EFER_LMA)
LONG5 = Regime(CR0_PE | CR0_PG, CR4_PAE | CR4_LA57, EFER_LME | EFER_LMA)


class Tables64:
    """Hand-built 4- or 5-level page tables in a FakeMemory (independent of kvmpy's builder)."""

    def __init__(self, mem: FakeMemory, levels: int = 4, first: int = 0x1000):
        self.mem, self.levels, self.next = mem, levels, first
        self.root = self.new_table()

    def new_table(self) -> int:
        page = self.next
        self.next += PAGE_4K
        self.mem.write(page, bytes(PAGE_4K))
        return page

    @staticmethod
    def index(gva: int, level: int) -> int:
        return (gva >> (12 + 9 * (level - 1))) & 0x1FF

    def entry_addr(self, gva: int, level: int) -> int:
        """Address of the level-`level` entry for `gva` (the tables down to it must exist)."""
        table = self.root
        for lv in range(self.levels, level, -1):
            table = self.mem.peek_u64(table + self.index(gva, lv) * 8) & ADDR_MASK_64
        return table + self.index(gva, level) * 8

    def map(
        self,
        gva: int,
        gpa: int,
        size: int = PAGE_4K,
        flags: int = RWU,
        table_flags: dict[int, int] | None = None,
    ) -> None:
        """Map one page. `table_flags[level]` sets the flags of the non-leaf entry at that level
        (default RW|US); entries that already exist keep their table but take these flags."""
        leaf = {PAGE_4K: 1, PAGE_2M: 2, PAGE_1G: 3}[size]
        table = self.root
        for level in range(self.levels, leaf, -1):
            addr = table + self.index(gva, level) * 8
            entry = self.mem.peek_u64(addr)
            child = entry & ADDR_MASK_64 if entry & PTE_P else self.new_table()
            tf = (table_flags or {}).get(level, RWU)
            self.mem.write_u64(addr, child | PTE_P | tf)
            table = child
        self.mem.write_u64(
            table + self.index(gva, leaf) * 8, gpa | flags | PTE_P | (PTE_PS if leaf > 1 else 0)
        )


def sign_extend(gva: int, bits: int) -> int:
    """Make a `bits`-bit linear address canonical."""
    gva &= (1 << bits) - 1
    if gva >> (bits - 1):
        gva |= ((1 << 64) - 1) ^ ((1 << bits) - 1)
    return gva


# --- no paging ----------------------------------------------------------------------------------


@pytest.mark.parametrize("regime", [REAL, PROTECTED], ids=["real", "protected"])
@pytest.mark.parametrize(
    "gva, gpa",
    [
        (0, 0),
        (0x1234, 0x1234),
        (0xFFFF_FFFF, 0xFFFF_FFFF),
        (0x1_0000_0000, 0),
        (0xDEAD_0000_1234_5678, 0x1234_5678),
    ],
)
def test_no_paging_is_identity_truncated_to_32_bits(regime, gva, gpa):
    mem = FakeMemory(0)  # no RAM at all: nothing may be read
    t = regime.walk(mem, 0xABC000, gva)
    assert t == Translation(gpa, True, True, PAGE_4K)
    assert mem.reads == [] and mem.bad_reads == []


@given(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1))
def test_no_paging_property(gva, cr3):
    mem = FakeMemory(0)
    t = translate(gva, CR0_PE, cr3, CR4_PAE, 0, mem.read_u32, mem.read_u64)
    assert t.gpa == gva & 0xFFFF_FFFF
    assert t.writable and t.user


# --- 32-bit paging ------------------------------------------------------------------------------

PD32, PT32 = 0x1000, 0x2000


def _pg32(mem, pde_index: int, pde: int, pte_index: int | None = None, pte: int = 0) -> None:
    mem.write_u32(PD32 + pde_index * 4, pde)
    if pte_index is not None:
        mem.write_u32(PT32 + pte_index * 4, pte)


def test_paged32_4k_page():
    mem = FakeMemory()
    _pg32(mem, 1, PT32 | PTE_P | RWU, 5, 0x7000 | PTE_P | RWU | PTE_A | PTE_D | PTE_G)
    gva = (1 << 22) | (5 << 12) | 0x123
    t = PAGED32.walk(mem, PD32, gva)
    assert t == Translation(0x7123, True, True, PAGE_4K)
    assert mem.reads == [PD32 + 4, PT32 + 5 * 4]
    # The same PDE with CR4.PSE set: no PS bit, so still a page table.
    assert PAGED32_PSE.walk(mem, PD32, gva) == t
    # CR3's low 12 bits (PWT, PCD) are not part of the address.
    assert PAGED32.walk(mem, PD32 | 0x18, gva) == t


def test_paged32_truncates_linear_addresses_above_4g():
    mem = FakeMemory()
    _pg32(mem, 0x3FF, PT32 | PTE_P | RWU, 0x3FF, 0x9000 | PTE_P | PTE_RW)
    t = PAGED32.walk(mem, PD32, 0xFFFF_FFFF)
    assert t == Translation(0x9FFF, True, False, PAGE_4K)
    assert PAGED32.walk(mem, PD32, 0x7_FFFF_FFFF) == t


@pytest.mark.parametrize("pde_flags", [0, PTE_RW, PTE_US, RWU])
@pytest.mark.parametrize("pte_flags", [0, PTE_RW, PTE_US, RWU])
def test_paged32_permissions_combine(pde_flags, pte_flags):
    mem = FakeMemory()
    _pg32(mem, 0, PT32 | PTE_P | pde_flags, 1, 0x5000 | PTE_P | pte_flags)
    t = PAGED32.walk(mem, PD32, 0x1008)
    assert t.gpa == 0x5008
    assert t.writable == bool(pde_flags & pte_flags & PTE_RW)
    assert t.user == bool(pde_flags & pte_flags & PTE_US)


@pytest.mark.parametrize("flags", [0, PTE_RW, PTE_US, RWU])
def test_paged32_4m_page(flags):
    mem = FakeMemory()
    # PAT (bit 12) and the PSE-36 bits are zero; bits 12..21 are not address bits.
    _pg32(mem, 3, 0x0140_0000 | PTE_P | PTE_PS | flags)
    gva = (3 << 22) | 0x2F_1234
    t = PAGED32_PSE.walk(mem, PD32, gva)
    assert t == Translation(0x016F_1234, bool(flags & PTE_RW), bool(flags & PTE_US), PAGE_4M)
    assert mem.reads == [PD32 + 12]


def test_paged32_4m_page_ignores_pat_bit():
    mem = FakeMemory()
    _pg32(mem, 3, 0x0140_0000 | (1 << 12) | PTE_P | PTE_PS | PTE_RW)
    assert PAGED32_PSE.walk(mem, PD32, (3 << 22) | 0x10).gpa == 0x0140_0010


def test_paged32_pse36_high_bits():
    mem = FakeMemory()
    # Bits 13..20 of a 4 MiB PDE are physical-address bits 32..39.
    _pg32(mem, 2, 0x0080_0000 | (0x5A << 13) | PTE_P | PTE_PS | RWU)
    t = PAGED32_PSE.walk(mem, PD32, (2 << 22) | 0x3F_FFFF)
    assert t.gpa == 0x5A_00BF_FFFF
    _pg32(mem, 2, 0xFFC0_0000 | (0xFF << 13) | PTE_P | PTE_PS | RWU)
    assert PAGED32_PSE.walk(mem, PD32, 2 << 22).gpa == 0xFF_FFC0_0000


def test_paged32_ps_bit_is_ignored_without_cr4_pse():
    mem = FakeMemory()
    # Without CR4.PSE, a PDE with PS set still points to a page table.
    _pg32(mem, 1, PT32 | PTE_P | PTE_PS | RWU, 7, 0xA000 | PTE_P | PTE_RW)
    gva = (1 << 22) | (7 << 12) | 0x42
    t = PAGED32.walk(mem, PD32, gva)
    assert t == Translation(0xA042, True, False, PAGE_4K)
    assert mem.reads == [PD32 + 4, PT32 + 7 * 4]
    # With CR4.PSE the same PDE is a 4 MiB page at PT32's 4 MiB frame (0).
    assert PAGED32_PSE.walk(mem, PD32, gva).page_size == PAGE_4M


def test_paged32_not_present():
    mem = FakeMemory()
    _pg32(mem, 1, PT32 | RWU)  # PDE without P
    with pytest.raises(PageFault, match="PDE not present"):
        PAGED32.walk(mem, PD32, 1 << 22)
    _pg32(mem, 1, PT32 | PTE_P | RWU, 0, 0x5000 | RWU)  # PTE without P
    with pytest.raises(PageFault, match="PTE not present"):
        PAGED32.walk(mem, PD32, 1 << 22)
    _pg32(mem, 2, 0x0080_0000 | PTE_PS | RWU)  # 4 MiB PDE without P
    with pytest.raises(PageFault, match="PDE not present"):
        PAGED32_PSE.walk(mem, PD32, 2 << 22)


def test_paged32_tables_outside_ram():
    mem = FakeMemory(64 * K)
    with pytest.raises(PageFault, match="left guest RAM"):
        PAGED32.walk(mem, 0x8000_0000, 0x1000)  # CR3 outside RAM
    _pg32(mem, 0, 0x7FFF_F000 | PTE_P | RWU)  # page table outside RAM
    with pytest.raises(PageFault, match="left guest RAM"):
        PAGED32.walk(mem, PD32, 0x1000)
    assert mem.reads == [PD32]  # read the PDE, then stopped


# --- PAE ----------------------------------------------------------------------------------------

# CR3 in PAE mode is 32-byte aligned, not page aligned.
PDPT_PAE, PD_PAE, PT_PAE = 0x1020, 0x2000, 0x3000


def _pae(mem, pdpte_i, pde_i, pde, pte_i=None, pte=0, pdpte=PD_PAE | PTE_P):
    mem.write_u64(PDPT_PAE + pdpte_i * 8, pdpte)
    mem.write_u64(PD_PAE + pde_i * 8, pde)
    if pte_i is not None:
        mem.write_u64(PT_PAE + pte_i * 8, pte)


def test_pae_4k_page_above_4g_with_nx():
    mem = FakeMemory()
    _pae(mem, 2, 3, PT_PAE | PTE_P | RWU, 4, 0x1_2345_6000 | PTE_P | RWU | PTE_NX)
    gva = (2 << 30) | (3 << 21) | (4 << 12) | 0x789
    t = PAE.walk(mem, PDPT_PAE, gva)
    assert t == Translation(0x1_2345_6789, True, True, PAGE_4K)
    assert mem.reads == [PDPT_PAE + 16, PD_PAE + 24, PT_PAE + 32]
    # The low 5 bits of CR3 are flags, not address; the linear address is 32 bits.
    assert PAE.walk(mem, PDPT_PAE | 0x18, gva) == t
    assert PAE.walk(mem, PDPT_PAE, gva | (0xF << 32)) == t


@pytest.mark.parametrize("flags", [0, PTE_RW, PTE_US, RWU])
def test_pae_2m_page(flags):
    mem = FakeMemory()
    _pae(mem, 0, 5, 0x0060_0000 | (1 << 12) | PTE_P | PTE_PS | flags)  # bit 12: PAT
    t = PAE.walk(mem, PDPT_PAE, (5 << 21) | 0x1_2345)
    assert t == Translation(0x0061_2345, bool(flags & PTE_RW), bool(flags & PTE_US), PAGE_2M)
    assert mem.reads == [PDPT_PAE, PD_PAE + 40]


@pytest.mark.parametrize("pde_flags", [0, PTE_RW, PTE_US, RWU])
@pytest.mark.parametrize("pte_flags", [0, PTE_RW, PTE_US, RWU])
def test_pae_permissions_combine_pdpte_has_none(pde_flags, pte_flags):
    mem = FakeMemory()
    # PAE PDPTEs have no R/W or U/S bits: a bare P entry must not restrict anything.
    _pae(mem, 1, 0, PT_PAE | PTE_P | pde_flags, 0, 0x4000 | PTE_P | pte_flags)
    t = PAE.walk(mem, PDPT_PAE, 1 << 30)
    assert t.gpa == 0x4000
    assert t.writable == bool(pde_flags & pte_flags & PTE_RW)
    assert t.user == bool(pde_flags & pte_flags & PTE_US)


def test_pae_not_present_at_each_level():
    mem = FakeMemory()
    gva = (3 << 30) | (2 << 21) | (1 << 12)
    with pytest.raises(PageFault, match="PDPTE not present"):
        PAE.walk(mem, PDPT_PAE, gva)
    _pae(mem, 3, 2, PT_PAE | RWU)
    with pytest.raises(PageFault, match="PDE not present"):
        PAE.walk(mem, PDPT_PAE, gva)
    _pae(mem, 3, 2, PT_PAE | PTE_P | RWU, 1, 0x5000 | RWU)
    with pytest.raises(PageFault, match="PTE not present"):
        PAE.walk(mem, PDPT_PAE, gva)
    _pae(mem, 3, 2, PT_PAE | PTE_P | RWU, 1, 0x5000 | PTE_P)
    assert PAE.walk(mem, PDPT_PAE, gva).gpa == 0x5000


def test_pae_tables_outside_ram():
    mem = FakeMemory(64 * K)
    with pytest.raises(PageFault, match="left guest RAM"):
        PAE.walk(mem, 0x10_0000, 0)
    _pae(mem, 0, 0, 0, pdpte=0x1_0000_0000 | PTE_P)  # PD above RAM
    with pytest.raises(PageFault, match="left guest RAM"):
        PAE.walk(mem, PDPT_PAE, 0)
    _pae(mem, 0, 0, 0xF_0000_0000 | PTE_P | RWU)  # PT above RAM
    with pytest.raises(PageFault, match="left guest RAM"):
        PAE.walk(mem, PDPT_PAE, 0)


# --- 4-level and 5-level paging -----------------------------------------------------------------


def test_long_4k_2m_1g_pages_and_exact_walks():
    mem = FakeMemory()
    pt = Tables64(mem)
    pt.map(0x0000_1234_5678_9000, 0x000A_BCDE_F000, PAGE_4K)
    pt.map(0x0000_0040_0020_0000, 0x0000_0000_0060_0000, PAGE_2M)
    pt.map(0x0000_7F80_4000_0000, 0x000F_FFFF_C000_0000, PAGE_1G)

    t = LONG4.walk(mem, pt.root, 0x0000_1234_5678_9ABC)
    assert t == Translation(0x000A_BCDE_FABC, True, True, PAGE_4K)
    assert mem.reads == [pt.entry_addr(0x0000_1234_5678_9000, lv) for lv in (4, 3, 2, 1)]

    t = LONG4.walk(mem, pt.root, 0x0000_0040_003F_FFFF)
    assert t == Translation(0x007F_FFFF, True, True, PAGE_2M)
    assert len(mem.reads) == 3

    t = LONG4.walk(mem, pt.root, 0x0000_7F80_7FFF_FFF8)
    assert t == Translation(0x000F_FFFF_FFFF_FFF8, True, True, PAGE_1G)
    assert len(mem.reads) == 2


def test_long_ignores_non_address_bits():
    mem = FakeMemory()
    pt = Tables64(mem)
    noise = PTE_NX | (0x7FF << 52) | PTE_A | PTE_D | PTE_G  # NX, ignored/PKE bits, A/D/G
    pt.map(0x20_0000, 0x80_0000 | (1 << 12), PAGE_2M, RWU | noise)  # bit 12 = PAT in 2 MiB
    pt.map(0x4000_0000, 0x1_4000_0000 | (1 << 12) | (0x1FF << 21), PAGE_1G, RWU | noise)
    pt.map(0x1000, 0x3_0000_3000, PAGE_4K, RWU | noise)
    # Table pointers with noise too.
    pml4e = pt.root
    mem.write_u64(pml4e, mem.peek_u64(pml4e) | PTE_NX | (0x7FF << 52))
    # CR3 with PCID bits (11:0).
    cr3 = pt.root | 0xABC
    assert LONG4.walk(mem, cr3, 0x2F_FFFF).gpa == 0x8F_FFFF
    assert LONG4.walk(mem, cr3, 0x4000_0010).gpa == 0x1_4000_0010
    assert LONG4.walk(mem, cr3, 0x1FFF).gpa == 0x3_0000_3FFF


@pytest.mark.parametrize(
    "gva",
    [
        0x0000_8000_0000_0000,
        0x0000_FFFF_FFFF_FFFF,
        0x8000_0000_0000_0000,
        0xFFFF_7FFF_FFFF_FFFF,
        0x1234_0000_0000_0000,
        0x7FFF_FFFF_FFFF_FFFF,
    ],
)
def test_long_non_canonical_faults_without_reading(gva):
    mem = FakeMemory()
    pt = Tables64(mem)
    for i in range(512):  # every PML4 entry present: only the canonical check can fault
        mem.write_u64(pt.root + i * 8, pt.root | PTE_P | RWU)
    with pytest.raises(PageFault, match="not canonical"):
        LONG4.walk(mem, pt.root, gva)
    assert mem.reads == []


def test_long_upper_half_is_canonical():
    mem = FakeMemory()
    pt = Tables64(mem)
    pt.map(0xFFFF_8000_0000_0000, 0x5000)
    pt.map(0xFFFF_FFFF_FFFF_F000, 0x6000, flags=PTE_RW)
    pt.map(0x0000_7FFF_FFFF_F000, 0x7000, flags=PTE_US)
    assert LONG4.walk(mem, pt.root, 0xFFFF_8000_0000_0FFF) == Translation(
        0x5FFF, True, True, PAGE_4K
    )
    assert mem.reads[0] == pt.root + 256 * 8
    assert LONG4.walk(mem, pt.root, 0xFFFF_FFFF_FFFF_FFFF) == Translation(
        0x6FFF, True, False, PAGE_4K
    )
    assert LONG4.walk(mem, pt.root, 0x0000_7FFF_FFFF_FFFF) == Translation(
        0x7FFF, False, True, PAGE_4K
    )


@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_long_not_present_at_each_level(level):
    mem = FakeMemory()
    pt = Tables64(mem)
    gva = 0x0000_1234_5678_9000
    pt.map(gva, 0x5000)
    addr = pt.entry_addr(gva, level)
    mem.write_u64(addr, mem.peek_u64(addr) & ~PTE_P)
    with pytest.raises(PageFault, match=f"level-{level} entry not present"):
        LONG4.walk(mem, pt.root, gva)
    assert mem.reads[-1] == addr and mem.bad_reads == []


@pytest.mark.parametrize("level", [4, 3, 2])
@pytest.mark.parametrize("where", [0x40_0000, 0x1_0000_0000, 0x000F_FFFF_FFFF_F000])
def test_long_table_outside_ram_faults_without_reading_outside(level, where):
    """An entry that points the next table outside RAM: the walk reads the entry, tries the
    table (which the memory refuses) and reports a PageFault, not the memory error."""
    mem = FakeMemory(64 * K)
    pt = Tables64(mem)
    gva = 0x0000_0080_4020_1000
    pt.map(gva, 0x5000)
    addr = pt.entry_addr(gva, level)
    mem.write_u64(addr, where | PTE_P | RWU)
    with pytest.raises(PageFault, match="left guest RAM") as exc:
        LONG4.walk(mem, pt.root, gva)
    assert type(exc.value) is PageFault
    assert mem.reads[-1] == addr
    assert mem.bad_reads == [where + Tables64.index(gva, level - 1) * 8]


def test_long_cr3_outside_ram():
    mem = FakeMemory(64 * K)
    with pytest.raises(PageFault, match="left guest RAM"):
        LONG4.walk(mem, 0x10_0000, 0x1000)
    with pytest.raises(PageFault, match="left guest RAM"):
        LONG5.walk(mem, 0x10_0000, 0x1000)


def test_long_leaf_outside_ram_translates():
    """The walk reads tables only; a leaf may point anywhere (MMIO, or nothing), as on real
    hardware and in KVM_TRANSLATE. Callers check that the result is RAM (vmem does)."""
    mem = FakeMemory(64 * K)
    pt = Tables64(mem)
    pt.map(0x1000, 0xFEE0_0000)
    pt.map(0x20_0000, 0x7_0000_0000, PAGE_2M)
    assert LONG4.walk(mem, pt.root, 0x10B0).gpa == 0xFEE0_00B0
    assert LONG4.walk(mem, pt.root, 0x20_0008).gpa == 0x7_0000_0008
    assert mem.bad_reads == []


def test_five_level_paging():
    mem = FakeMemory()
    pt = Tables64(mem, levels=5)
    gva = 0x00AB_CDEF_1234_5000  # bits 48..56 nonzero: only 5-level can map it
    pt.map(gva, 0x9000)
    pt.map(0x0000_8000_0000_0000, 0x20_0000, PAGE_2M)  # canonical only with LA57
    pt.map(0xFF00_0000_0000_0000, 0x4000_0000, PAGE_1G)  # PML5 index 256
    t = LONG5.walk(mem, pt.root, gva | 0x321)
    assert t == Translation(0x9321, True, True, PAGE_4K)
    assert mem.reads == [pt.entry_addr(gva, lv) for lv in (5, 4, 3, 2, 1)]
    assert LONG5.walk(mem, pt.root, 0x0000_8000_0001_0000).gpa == 0x21_0000
    assert LONG5.walk(mem, pt.root, 0xFF00_0000_0000_0042) == Translation(
        0x4000_0042, True, True, PAGE_1G
    )
    assert mem.reads[0] == pt.root + 256 * 8
    # Read with 4-level rules, the same address is not canonical.
    with pytest.raises(PageFault, match="not canonical"):
        LONG4.walk(mem, pt.root, 0x0000_8000_0001_0000)


@pytest.mark.parametrize(
    "gva",
    [0x0100_0000_0000_0000, 0xFE00_0000_0000_0000, 0x8000_0000_0000_0000, 0x01FF_FFFF_FFFF_FFFF],
)
def test_five_level_non_canonical(gva):
    mem = FakeMemory()
    pt = Tables64(mem, levels=5)
    with pytest.raises(PageFault, match="not canonical"):
        LONG5.walk(mem, pt.root, gva)
    assert mem.reads == []


@pytest.mark.parametrize("level", [5, 4, 3, 2, 1])
def test_five_level_not_present_at_each_level(level):
    mem = FakeMemory()
    pt = Tables64(mem, levels=5)
    gva = sign_extend(0x01_2345_6789_A000, 57)
    pt.map(gva, 0x5000)
    assert LONG5.walk(mem, pt.root, gva).gpa == 0x5000
    addr = pt.entry_addr(gva, level)
    mem.write_u64(addr, mem.peek_u64(addr) & ~PTE_P)
    with pytest.raises(PageFault, match=f"level-{level} entry not present"):
        LONG5.walk(mem, pt.root, gva)


flag_bits = st.sampled_from([0, PTE_RW, PTE_US, RWU])


@settings(max_examples=300, deadline=None)
@given(
    levels=st.sampled_from([4, 5]),
    raw_gva=st.integers(0, (1 << 64) - 1),
    size=st.sampled_from([PAGE_4K, PAGE_2M, PAGE_1G]),
    frame=st.integers(0, (1 << 52) - 1),
    leaf_flags=flag_bits,
    table_flags=st.lists(flag_bits, min_size=4, max_size=4),
    noise=st.sampled_from([0, PTE_NX, PTE_A | PTE_D, PTE_G | (0x3FF << 52)]),
)
def test_long_walk_property(levels, raw_gva, size, frame, leaf_flags, table_flags, noise):
    """Any single mapping at any canonical address, with any flags on the way down: the walk
    gives frame + offset, the AND of R/W and U/S, and reads one entry per level."""
    gva = sign_extend(raw_gva, 12 + 9 * levels)
    regime = LONG5 if levels == 5 else LONG4
    mem = FakeMemory()
    pt = Tables64(mem, levels)
    gpa = frame & ~(size - 1)
    tf = dict(zip(range(levels, 1, -1), table_flags, strict=False))
    pt.map(gva & ~(size - 1), gpa, size, leaf_flags | noise, tf)
    t = regime.walk(mem, pt.root, gva)
    leaf_level = {PAGE_4K: 1, PAGE_2M: 2, PAGE_1G: 3}[size]
    path = [tf[lv] for lv in range(levels, leaf_level, -1)] + [leaf_flags]
    want_w = all(f & PTE_RW for f in path)
    want_u = all(f & PTE_US for f in path)
    assert t == Translation(gpa | (gva & (size - 1)), want_w, want_u, size)
    assert len(mem.reads) == levels - leaf_level + 1
    # The neighbouring page (same tables) is not mapped unless it shares the leaf.
    other = gva ^ size
    if other == sign_extend(other, 12 + 9 * levels):
        try:
            t2 = regime.walk(mem, pt.root, other)
        except PageFault:
            pass
        else:
            pytest.fail(f"{other:#x} should not be mapped, got {t2}")


@settings(max_examples=100, deadline=None)
@given(gva=st.integers(0, (1 << 64) - 1), levels=st.sampled_from([4, 5]))
def test_long_canonical_property(gva, levels):
    """With every entry of every table present (a self-map), exactly the non-canonical
    addresses fault, and they fault before any read."""
    mem = FakeMemory(8 * K)
    root = 0x1000
    for i in range(512):
        mem.write_u64(root + i * 8, root | PTE_P | RWU)
    regime = LONG5 if levels == 5 else LONG4
    bits = 12 + 9 * levels
    if gva == sign_extend(gva, bits):
        assert regime.walk(mem, root, gva).gpa == root | (gva & 0xFFF)
    else:
        with pytest.raises(PageFault, match="not canonical"):
            regime.walk(mem, root, gva)
        assert mem.reads == []


# --- TableAllocator -----------------------------------------------------------------------------


def test_table_allocator_zeroes_and_limits():
    mem = FakeMemory(64 * K)
    mem.buf[:] = b"\xff" * len(mem.buf)
    alloc = TableAllocator(0x4000, 0x7000, mem.write)
    assert [alloc.alloc() for _ in range(3)] == [0x4000, 0x5000, 0x6000]
    assert alloc.pages == [0x4000, 0x5000, 0x6000]
    assert mem.buf[0x4000:0x7000] == bytes(0x3000)
    assert mem.buf[0x3FFF] == 0xFF and mem.buf[0x7000] == 0xFF  # only the pages it handed out
    with pytest.raises(GuestMemoryError, match="out of space"):
        alloc.alloc()
    assert alloc.pages == [0x4000, 0x5000, 0x6000]
    assert mem.buf[0x7000:0x8000] == b"\xff" * 0x1000


def test_builder_out_of_table_space_is_an_error():
    mem = FakeMemory(64 * K)
    # 64 MiB + 4 KiB needs PML4, PDPT, PD and one PT: 4 pages; give it 3.
    alloc = TableAllocator(0x1000, 0x4000, mem.write)
    with pytest.raises(GuestMemoryError, match="out of space"):
        build_identity_map_64([MapRange(0, 64 * M + PAGE_4K, RWU)], alloc, mem.write_u64)
    alloc = TableAllocator(0x1000, 0x5000, mem.write)
    build_identity_map_64([MapRange(0, 64 * M + PAGE_4K, RWU)], alloc, mem.write_u64)
    assert len(alloc.pages) == 4


# --- identity-map builders: a model of what they should produce ----------------------------------


def merged(ranges: list[MapRange]) -> list[MapRange]:
    """Adjacent ranges with equal flags merged (the builder may use one big page across them)."""
    out: list[MapRange] = []
    for r in sorted(ranges, key=lambda r: r.start):
        if r.start == r.end:
            continue
        if out and out[-1].end == r.start and out[-1].flags == r.flags:
            out[-1] = MapRange(out[-1].start, r.end, r.flags)
        else:
            out.append(r)
    return out


def flags_at(ranges: list[MapRange], addr: int) -> int | None:
    for r in ranges:
        if r.start <= addr < r.end:
            return r.flags
    return None


def uniform(runs: list[MapRange], start: int, size: int) -> bool:
    return any(r.start <= start and start + size <= r.end for r in runs)


def touched(ranges: list[MapRange], start: int, size: int) -> bool:
    return any(r.start < start + size and start < r.end for r in ranges)


def chunks(ranges: list[MapRange], size: int):
    """Every `size`-aligned chunk that overlaps a range."""
    seen = set()
    for r in ranges:
        if r.start == r.end:
            continue
        for c in range(r.start // size * size, r.end, size):
            if c not in seen:
                seen.add(c)
                yield c


def expected_tables_64(ranges: list[MapRange], use_1g: bool) -> int:
    """PML4 + a PDPT per touched 512 GiB + a PD per touched 1 GiB that cannot be one page + a PT
    per touched 2 MiB that cannot be one page (only inside 1 GiB chunks that got a PD)."""
    runs = merged(ranges)
    n = 1 + len(list(chunks(ranges, 512 * G)))
    pds = [c for c in chunks(ranges, G) if not (use_1g and uniform(runs, c, G))]
    n += len(pds)
    pd_set = set(pds)
    n += sum(
        1 for c in chunks(ranges, PAGE_2M) if c // G * G in pd_set and not uniform(runs, c, PAGE_2M)
    )
    return n


def expected_page_size_64(ranges: list[MapRange], addr: int, use_1g: bool) -> int:
    runs = merged(ranges)
    if use_1g and uniform(runs, addr // G * G, G):
        return PAGE_1G
    if uniform(runs, addr // PAGE_2M * PAGE_2M, PAGE_2M):
        return PAGE_2M
    return PAGE_4K


def expected_tables_32(ranges: list[MapRange]) -> int:
    runs = merged(ranges)
    low = [r for r in ranges if r.start < 1 << 32]
    return 1 + sum(1 for c in chunks(low, PAGE_4M) if c < 1 << 32 and not uniform(runs, c, PAGE_4M))


def probe_addresses(ranges: list[MapRange], extra=(), rng: random.Random | None = None) -> set[int]:
    """Boundaries of every range (and their neighbours), page and large-page edges inside them,
    and a few random addresses."""
    rng = rng or random.Random(1)
    out = set(extra)
    top = max(r.end for r in ranges)
    for r in ranges:
        for a in (r.start, r.start + 1, r.end - 1, r.end, r.start - 1, r.end - PAGE_4K):
            if a >= 0:
                out.add(a)
        for size in (PAGE_2M, PAGE_4M, PAGE_1G):
            c = (r.start + size - 1) // size * size
            if r.start < c < r.end:
                out.update({c - 1, c})
        if r.end > r.start:
            out.update(rng.randrange(r.start, r.end) for _ in range(8))
    out.update(rng.randrange(0, top + 4 * M) for _ in range(16))
    return out


def build64(ranges, use_1g=False):
    mem = FakeMemory(1 * M)
    alloc = TableAllocator(0x1000, 1 * M, mem.write)
    cr3 = build_identity_map_64(ranges, alloc, mem.write_u64, use_1g)
    return mem, alloc, cr3


def build32(ranges):
    mem = FakeMemory(1 * M)
    alloc = TableAllocator(0x1000, 1 * M, mem.write)
    cr3 = build_identity_map_32(ranges, alloc, mem.write_u32)
    return mem, alloc, cr3


def check_identity_64(ranges, mem, cr3, use_1g, addrs):
    for a in sorted(addrs):
        f = flags_at(ranges, a)
        if f is None:
            with pytest.raises(PageFault):
                LONG4.walk(mem, cr3, a)
            continue
        t = LONG4.walk(mem, cr3, a)
        assert t.gpa == a, hex(a)
        assert t.writable == bool(f & PTE_RW), hex(a)
        assert t.user == bool(f & PTE_US), hex(a)
        assert t.page_size == expected_page_size_64(ranges, a, use_1g), hex(a)
    assert mem.bad_reads == []


def check_identity_32(ranges, mem, cr3, addrs):
    for a in sorted(addrs):
        if a >= 1 << 32:
            continue
        f = flags_at(ranges, a)
        if f is None:
            with pytest.raises(PageFault):
                PAGED32_PSE.walk(mem, cr3, a)
            continue
        t = PAGED32_PSE.walk(mem, cr3, a)
        assert t.gpa == a, hex(a)
        assert t.writable == bool(f & PTE_RW), hex(a)
        assert t.user == bool(f & PTE_US), hex(a)
        want = PAGE_4M if uniform(merged(ranges), a // PAGE_4M * PAGE_4M, PAGE_4M) else PAGE_4K
        assert t.page_size == want, hex(a)


R = MapRange
SYS = 0xFEE000  # where kvmpy puts the system area in a 16 MiB guest

BUILD_CASES_64 = {
    "64M-uniform": ([R(0, 64 * M, RWU)], False, 3),
    "64M+12K-odd-tail": ([R(0, 64 * M + 12 * K, RWU)], False, 4),
    "12K-tiny": ([R(0, 12 * K, RWU)], False, 4),
    "not-at-zero": ([R(5 * PAGE_4K, 7 * PAGE_4K, RWU)], False, 4),
    "1G-without-1g-pages": ([R(0, G, RWU)], False, 3),
    "1G-with-1g-pages": ([R(0, G, RWU)], True, 2),
    "pc-hole-1g": ([R(0, 3 * G, RWU), R(4 * G, 5 * G, RWU)], True, 2),
    "pc-hole-2m": ([R(0, 3 * G, RWU), R(4 * G, 5 * G, RWU)], False, 6),
    "pc-hole-odd": ([R(0, 3 * G, RWU), R(4 * G, 5 * G + 8 * K, RWU)], True, 4),
    "holes": ([R(0, M, RWU), R(2 * M + 4 * K, 4 * M, RWU), R(8 * M, 10 * M, RWU)], False, 5),
    "adjacent-same-flags-merge": ([R(0, M, RWU), R(M, 2 * M, RWU)], False, 3),
    "adjacent-different-flags": ([R(0, M, RWU), R(M, 2 * M, PTE_RW)], False, 4),
    "supervisor-area-in-user-ram": (
        [R(0, SYS, RWU), R(SYS, 16 * M, PTE_RW)],
        False,
        4,
    ),
    "supervisor-area-mid-ram": (
        [R(0, 3 * M, RWU), R(3 * M, 3 * M + 36 * K, PTE_RW), R(3 * M + 36 * K, 64 * M, RWU)],
        False,
        4,
    ),
    "read-only-and-supervisor-read-only": (
        [R(0, 2 * M, PTE_US), R(2 * M, 4 * M, 0), R(4 * M, 4 * M + 4 * K, PTE_RW)],
        False,
        4,
    ),
    "above-512g": ([R(512 * G, 512 * G + 2 * M + 4 * K, RWU)], False, 4),
    "top-of-lower-half": ([R((1 << 47) - 4 * M, (1 << 47) - 4 * K, RWU)], False, 4),
    "1g-uniform-but-mixed-neighbour": (
        [R(0, G, RWU), R(G, G + 2 * M, PTE_RW), R(G + 2 * M, 2 * G, RWU)],
        True,
        3,
    ),
}


@pytest.mark.parametrize("name", list(BUILD_CASES_64))
def test_identity_map_64_round_trip(name):
    ranges, use_1g, n_tables = BUILD_CASES_64[name]
    mem, alloc, cr3 = build64(ranges, use_1g)
    assert cr3 == alloc.pages[0]
    assert len(alloc.pages) == n_tables == expected_tables_64(ranges, use_1g)
    check_identity_64(ranges, mem, cr3, use_1g, probe_addresses(ranges))


def test_identity_map_64_sweep_small_guest():
    """Every page of a 16 MiB guest with a supervisor-only system area, and the page after."""
    ranges = [R(0, SYS, RWU), R(SYS, 16 * M, PTE_RW)]
    mem, alloc, cr3 = build64(ranges)
    for page in range(0, 16 * M + PAGE_4K, PAGE_4K):
        for a in (page, page + 0xFFF):
            f = flags_at(ranges, a)
            if f is None:
                with pytest.raises(PageFault):
                    LONG4.walk(mem, cr3, a)
            else:
                t = LONG4.walk(mem, cr3, a)
                assert (t.gpa, t.user, t.writable) == (a, a < SYS, True)


def test_identity_map_64_flags_pass_through():
    """Leaf entries carry the range's flags (e.g. NX) and P; intermediate entries are
    permissive so the leaf alone decides."""
    mem, alloc, cr3 = build64([R(0, 2 * M, RWU | PTE_NX), R(2 * M, 2 * M + 4 * K, PTE_NX)])
    pml4e = mem.peek_u64(cr3)
    assert pml4e & (PTE_P | PTE_RW | PTE_US) == PTE_P | PTE_RW | PTE_US
    assert not pml4e & PTE_NX
    pd = mem.peek_u64(pml4e & ADDR_MASK_64) & ADDR_MASK_64
    assert mem.peek_u64(pd) == 0 | RWU | PTE_NX | PTE_P | PTE_PS
    pt = mem.peek_u64(pd + 8) & ADDR_MASK_64
    assert mem.peek_u64(pd + 8) & PTE_NX == 0
    assert mem.peek_u64(pt) == 2 * M | PTE_NX | PTE_P
    assert mem.peek_u64(pt + 8) == 0


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize(
    "ranges",
    [
        [R(0, 4 * M, RWU), R(M, 2 * M, RWU)],  # same flags: the overlap became a hole
        [R(0, 4 * M, RWU), R(M, 2 * M, PTE_RW)],  # which flags would win?
        [R(8 * K, 16 * K, RWU), R(0, 12 * K, RWU)],
    ],
)
def test_builders_reject_overlapping_ranges(bits, ranges):
    with pytest.raises(ValueError, match="overlap"):
        build64(ranges) if bits == 64 else build32(ranges)


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize(
    "ranges",
    [[R(0, 0x1800, RWU)], [R(0x800, 0x2000, RWU)], [R(0, M, RWU), R(M, M + 1, PTE_RW)]],
)
def test_builders_reject_unaligned_ranges(bits, ranges):
    with pytest.raises(ValueError, match="4 KiB"):
        build64(ranges) if bits == 64 else build32(ranges)


@pytest.mark.parametrize("bits", [32, 64])
def test_builders_reject_reversed_ranges(bits):
    with pytest.raises(ValueError, match="ends before it starts"):
        build64([R(2 * M, M, RWU)]) if bits == 64 else build32([R(2 * M, M, RWU)])


@pytest.mark.parametrize("bits", [32, 64])
def test_builders_allow_empty_ranges(bits):
    ranges = [R(0, M, RWU), R(M, M, PTE_RW), R(4 * M, 4 * M, 0)]
    mem, alloc, cr3 = build64(ranges) if bits == 64 else build32(ranges)
    regime = LONG4 if bits == 64 else PAGED32_PSE
    assert regime.walk(mem, cr3, M - 1).gpa == M - 1
    with pytest.raises(PageFault):
        regime.walk(mem, cr3, M)


BUILD_CASES_32 = {
    "16M-uniform": ([R(0, 16 * M, RWU)], 1),
    "16M+8K": ([R(0, 16 * M + 8 * K, RWU)], 2),
    "supervisor-area": ([R(0, SYS, RWU), R(SYS, 16 * M, PTE_RW)], 2),
    "holes": ([R(0, M, RWU), R(4 * M, 8 * M, PTE_RW), R(9 * M, 9 * M + 4 * K, 0)], 3),
    "near-4g": ([R(3 * G, 4 * G, RWU)], 1),
    "3g-ram": ([R(0, 3 * G, RWU)], 1),
    "above-4g-ignored": ([R(0, 4 * M, RWU), R(4 * G, 4 * G + 4 * M, RWU)], 1),
}


@pytest.mark.parametrize("name", list(BUILD_CASES_32))
def test_identity_map_32_round_trip(name):
    ranges, n_tables = BUILD_CASES_32[name]
    mem, alloc, cr3 = build32(ranges)
    assert cr3 == alloc.pages[0]
    assert len(alloc.pages) == n_tables == expected_tables_32(ranges)
    low = [r for r in ranges if r.start < 1 << 32]
    check_identity_32(low, mem, cr3, probe_addresses(low))


def test_identity_map_32_entries():
    mem, alloc, cr3 = build32([R(0, 4 * M, PTE_US), R(4 * M, 4 * M + 4 * K, PTE_RW)])
    pde = int.from_bytes(mem.buf[cr3 : cr3 + 4], "little")
    assert pde == 0 | PTE_US | PTE_P | PTE_PS
    pde1 = int.from_bytes(mem.buf[cr3 + 4 : cr3 + 8], "little")
    assert pde1 & (PTE_P | PTE_RW | PTE_US | PTE_PS) == PTE_P | PTE_RW | PTE_US
    pt = pde1 & 0xFFFF_F000
    assert int.from_bytes(mem.buf[pt : pt + 4], "little") == 4 * M | PTE_RW | PTE_P
    assert int.from_bytes(mem.buf[pt + 4 : pt + 8], "little") == 0


@st.composite
def range_sets(draw, limit_pages: int, max_ranges: int = 5):
    """Sorted, non-overlapping, page-aligned ranges with random flags; boundaries are biased
    towards large-page multiples so big pages, partial chunks and merges all occur."""
    n = draw(st.integers(1, max_ranges))
    unit = draw(st.sampled_from([1, 512, 1024]))  # pages: 4 KiB, 2 MiB, 4 MiB granules
    points = draw(
        st.lists(
            st.integers(0, limit_pages // unit).map(lambda x: x * unit)
            | st.integers(0, limit_pages),
            min_size=2 * n,
            max_size=2 * n,
            unique=True,
        )
    )
    points.sort()
    ranges = []
    for i in range(n):
        start, end = points[2 * i], points[2 * i + 1]
        flags = draw(st.sampled_from([0, PTE_RW, PTE_US, RWU, RWU | PTE_NX]))
        ranges.append(R(start * PAGE_4K, end * PAGE_4K, flags))
    return ranges


@settings(max_examples=60, deadline=None)
@given(
    ranges=range_sets(limit_pages=(3 * G) // PAGE_4K),
    use_1g=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_identity_map_64_property(ranges, use_1g, seed):
    mem, alloc, cr3 = build64(ranges, use_1g)
    assert len(alloc.pages) == expected_tables_64(ranges, use_1g)
    check_identity_64(ranges, mem, cr3, use_1g, probe_addresses(ranges, rng=random.Random(seed)))


@settings(max_examples=60, deadline=None)
@given(ranges=range_sets(limit_pages=(1 << 32) // PAGE_4K), seed=st.integers(0, 2**32))
def test_identity_map_32_property(ranges, seed):
    assume(any(r.end > r.start for r in ranges))
    mem, alloc, cr3 = build32(ranges)
    assert len(alloc.pages) == expected_tables_32(ranges)
    check_identity_32(ranges, mem, cr3, probe_addresses(ranges, rng=random.Random(seed)))


# --- kvmpy's own maps (modes.build), without KVM --------------------------------------------------


def _guest_ram(size: int) -> GuestMemory:
    from kvmpy.machine import ram_layout

    mem = GuestMemory()
    for i, (gpa, n) in enumerate(ram_layout(size)):
        mem.add_region(gpa, n, name=f"ram{i}")
    return mem


MODE_MAP_CASES = [
    (mode, size, use_1g)
    for mode in (Mode.LONG, Mode.LONG_USER)
    for size in (16 * M, 64 * M + 12 * K, 5 * G)
    for use_1g in (False, True)
] + [(Mode.PAGED32, 16 * M, False), (Mode.PAGED32, 64 * M + 12 * K, False)]


@pytest.mark.parametrize("mode, size, use_1g", MODE_MAP_CASES)
def test_mode_identity_maps(mode, size, use_1g):
    """What `modes.build` writes: all RAM identity-mapped, writable, user-accessible except the
    system area in long-user mode, nothing else mapped."""
    mem = _guest_ram(size)
    try:
        boot = modes.build(mode, mem, 0x1000, [(0x1000, 0x2000)], use_1g_pages=use_1g)
        s, layout = boot.sregs, boot.layout
        assert s.cr0 & CR0_PG
        assert s.cr3 == layout.page_tables[0]
        assert all(layout.base <= p < layout.end for p in layout.page_tables)
        long = mode.bits == 64
        ranges = modes._map_ranges(mem, layout, mode.user, devices=long)
        windows = [r for r in ranges if r.flags & PTE_PCD]
        dev_lo, dev_hi = modes.DEVICE_WINDOW_START, modes.DEVICE_WINDOW_END
        # The ranges cover exactly RAM (and in 64-bit modes the device windows, uncached), and
        # only the system area is supervisor-only.
        assert [(r.start, r.end) for r in windows] == ([(dev_lo, dev_hi)] if long else [])
        assert all(r.flags & PTE_PWT for r in windows)
        assert sum(r.end - r.start for r in ranges) == mem.size + sum(
            r.end - r.start for r in windows
        )
        sup = [r for r in ranges if not r.flags & PTE_US and r not in windows]
        if mode.user:
            assert [(r.start, r.end) for r in sup] == [(layout.base, layout.end)]
        else:
            assert sup == []
        if mode is Mode.PAGED32:
            assert len(layout.page_tables) == expected_tables_32(ranges)
        else:
            assert len(layout.page_tables) == expected_tables_64(ranges, use_1g)

        def walk(a):
            return translate(a, s.cr0, s.cr3, s.cr4, s.efer, mem.read_u32, mem.read_u64)

        probes = probe_addresses(
            ranges, extra=(layout.base - 1, layout.end, 3 * G, 4 * G - 1, size + 4 * G)
        )
        for a in sorted(probes):
            if mode is Mode.PAGED32 and a >= 1 << 32:
                continue
            if long and dev_lo <= a < dev_hi:
                t = walk(a)
                assert (t.gpa, t.writable, t.user) == (a, True, mode.user), hex(a)
                continue
            if not mem.is_ram(a):
                with pytest.raises(PageFault):
                    walk(a)
                continue
            t = walk(a)
            assert (t.gpa, t.writable) == (a, True), hex(a)
            assert t.user == (not mode.user or not layout.base <= a < layout.end), hex(a)
    finally:
        mem.close()


# --- cross-checks against KVM_TRANSLATE ----------------------------------------------------------
#
# What KVM_TRANSLATE reports on this host (Linux 6.18, KVM-PVM), found by trying:
# - `valid` and `physical_address` follow the guest's tables as set with KVM_SET_SREGS, without
#   running the vCPU; leaves pointing outside RAM are valid, tables outside RAM are not.
# - `writeable` is always 1 and `usermode` always 0: the kernel fills them in as constants
#   (kvm_arch_vcpu_ioctl_translate), so they cannot check our U/S and R/W bits. Those are
#   checked on the CPU instead (test_kvm_cpl3_access_matches_translate).
# - paged32 (and PAE without long mode): KVM-PVM clears CR0.PG in KVM_SET_SREGS (dmesg: "kvm-pvm
#   supports paging only in long mode"), so KVM_TRANSLATE reports the identity for every
#   address; the test compares against the state KVM kept, which is real 32-bit paging on a
#   VT-x/AMD-V host.
# - CR4.LA57 makes KVM_SET_SREGS fail with EINVAL here (the vCPU's CPUID has no LA57), so
#   5-level paging is checked by the unit tests only.


def _kvm_machine(kvm, mode="long", memory="16M"):
    from kvmpy.loader import load_raw
    from kvmpy.machine import Machine, MachineConfig

    m = Machine(MachineConfig(mode=mode, memory=memory), kvm=kvm)
    try:
        m.load(load_raw(b"\xf4"))
    except BaseException:
        m.close()
        raise
    return m


def _compare_with_kvm(machine, addrs) -> tuple[int, int]:
    """Compare translate() with KVM_TRANSLATE; returns (valid, invalid) counts."""
    fd, mem = machine.vcpus[0].fd, machine.memory
    s = fd.get_sregs()
    valid = invalid = 0
    for a in sorted(addrs):
        tr = fd.translate(a)
        if s.efer & EFER_LMA and a != sign_extend(a, 48):
            # KVM_TRANSLATE does not check canonicality: it walks with bits 47..0 (seen here:
            # 0x0000_8000_0000_0000 "translates" through PML4 entry 256). The CPU raises #GP
            # instead, and translate() faults; nothing to compare.
            with pytest.raises(PageFault, match="not canonical"):
                translate(a, s.cr0, s.cr3, s.cr4, s.efer, mem.read_u32, mem.read_u64)
            invalid += 1
            continue
        try:
            t = translate(a, s.cr0, s.cr3, s.cr4, s.efer, mem.read_u32, mem.read_u64)
        except PageFault as e:
            assert not tr.valid, f"{a:#x}: KVM says {tr.physical_address:#x}, we say {e}"
            invalid += 1
        else:
            assert tr.valid, f"{a:#x}: we say {t.gpa:#x}, KVM says not mapped"
            assert tr.physical_address == t.gpa, f"{a:#x}"
            valid += 1
    return valid, invalid


class GuestTables:
    """Page tables in a live guest's RAM (same layout as Tables64, but in GuestMemory)."""

    def __init__(self, memory: GuestMemory, first: int):
        self.fake = _GuestMemoryAdapter(memory)
        self.t = Tables64(self.fake, 4, first)

    def __getattr__(self, name):
        return getattr(self.t, name)


class _GuestMemoryAdapter:
    def __init__(self, memory: GuestMemory):
        self.m = memory

    def write(self, gpa, data):
        self.m.write(gpa, data)

    def write_u64(self, gpa, value):
        self.m.write_u64(gpa, value)

    def peek_u64(self, gpa):
        return self.m.read_u64(gpa)


@pytest.mark.kvm
@pytest.mark.parametrize("mode", ["long", "long-user"])
def test_kvm_translate_matches_own_tables(kvm, mode):
    with _kvm_machine(kvm, mode) as m:
        mem = m.memory
        g = GuestTables(mem, 0x40_0000)
        maps = []  # (gva, size)

        def mp(gva, gpa, size=PAGE_4K, flags=RWU, **kw):
            g.map(gva, gpa, size, flags, **kw)
            maps.append((gva, size))

        # 4 KiB pages, non-identity, scattered frames, a leaf to MMIO and one beyond RAM.
        for i in range(16):
            mp(0x1000_0000 + i * PAGE_4K, 0x80_0000 + ((i * 7) % 16) * PAGE_4K)
        mp(0x1000_0000 + 20 * PAGE_4K, 0xFEE0_0000, flags=PTE_RW)
        mp(0x1000_0000 + 21 * PAGE_4K, 0x7_0000_0000, flags=0)
        # 2 MiB pages, one below and one above RAM.
        mp(0x4000_0000, 0x60_0000, PAGE_2M)
        mp(0x4020_0000, 0x40_0000_0000, PAGE_2M, flags=PTE_US)
        # Upper half and the top of the address space.
        mp(0xFFFF_8000_0000_0000, 0x1000)
        mp(0xFFFF_FFFF_FFFF_F000, 0x2000)
        mp(0xFFFF_FFFF_C000_0000 + PAGE_2M, 0xA0_0000, PAGE_2M)
        # Restrictive intermediate entries (KVM's system translate ignores U/S and R/W).
        mp(0x0000_7000_0000_0000, 0x3000, table_flags={4: 0, 3: PTE_US, 2: PTE_RW})
        if kvm.cpuid_supports_1g_pages():
            mp(0x80_0000_0000, 0x4000_0000, PAGE_1G)
            mp(0x80_4000_0000, 0x0, PAGE_1G)
        # Not-present holes at every level, and tables outside RAM at every level.
        mp(0x2000_0000, 0x9000)
        hole = 0x2000_0000
        mem.write_u64(g.entry_addr(hole, 1), 0x9000 | RWU)  # leaf without P
        mp(0x0000_5000_0000_0000 | 0x4020_0000, 0x1000)
        far = 0x0000_5000_0000_0000 | 0x4020_0000
        mem.write_u64(g.entry_addr(far, 2), 0x7_0000_0000 | PTE_P | RWU)  # PT outside RAM
        mp(0x0000_5100_0000_0000, 0x1000)
        mem.write_u64(g.entry_addr(0x0000_5100_0000_0000, 3), 0xFF_F000 | RWU)  # PD not present
        mem.write_u64(g.root + 0x1A0 * 8, 0x10_0000_0000 | PTE_P | RWU)  # PDPT outside RAM

        fd = m.vcpus[0].fd
        s = fd.get_sregs()
        s.cr3 = g.root
        fd.set_sregs(s)
        assert fd.get_sregs().cr3 == g.root

        rng = random.Random(7)
        outside = sign_extend(0x1A0 << 39, 48)  # under the PML4 entry whose PDPT is outside RAM
        addrs = {0x0000_8000_0000_0000, 0xFFFF_7FFF_FFFF_F000, outside, outside + 0x1234_5000, 0}
        for gva, size in maps:
            gva = sign_extend(gva, 48)
            addrs.update({gva, gva + size - 1, gva + size, gva - 1, gva + rng.randrange(size)})
        addrs.update(sign_extend(rng.getrandbits(48), 48) for _ in range(300))
        addrs.update(rng.randrange(0x1000_0000, 0x1002_0000) for _ in range(100))
        addrs = {a & ((1 << 64) - 1) for a in addrs}
        valid, invalid = _compare_with_kvm(m, addrs)
        assert valid >= 40 and invalid >= 100  # both kinds were really exercised


@pytest.mark.kvm
@pytest.mark.parametrize("mode", ["long", "long-user"])
@pytest.mark.parametrize("memory", ["16M", "18M"])
def test_kvm_translate_matches_kvmpy_identity_map(kvm, mode, memory):
    with _kvm_machine(kvm, mode, memory) as m:
        mem, layout = m.memory, m.layout
        size = mem.size
        addrs = set()
        for page in range(0, size + 4 * PAGE_4K, PAGE_4K):
            addrs.update({page, page + 0xFFF})
        addrs.update({1 << 32, 3 << 30, 0xFEE0_0000, 1 << 40, 0x0000_8000_0000_0000})
        valid, invalid = _compare_with_kvm(m, addrs)
        # RAM, and 3 GiB: the first device window (mapped for CPL3 drivers).
        assert valid == 2 * (size // PAGE_4K) + 1
        # U/S: KVM_TRANSLATE does not report it, so check ours against the layout here and
        # against the CPU in test_kvm_cpl3_access_matches_translate.
        s = m.vcpus[0].fd.get_sregs()
        for a in (0, layout.base - 1, layout.base, layout.end - 1, layout.stack_top - 1):
            t = translate(a, s.cr0, s.cr3, s.cr4, s.efer, mem.read_u32, mem.read_u64)
            supervisor_only = mode == "long-user" and layout.base <= a < layout.end
            assert t.user == (not supervisor_only) and t.writable


@pytest.mark.kvm
def test_kvm_translate_32_bit_regimes(kvm):
    """paged32 and PAE sregs: compare with whatever paging state KVM kept (see the note above)."""
    with _kvm_machine(kvm, "paged32") as m:
        mem, fd = m.memory, m.vcpus[0].fd
        # Non-identity 32-bit tables at 4 MiB: 4 KiB pages and a 4 MiB page.
        pd, pt = 0x40_0000, 0x40_1000
        mem.fill(pd, 2 * PAGE_4K)
        mem.write_u32(pd + 1 * 4, pt | PTE_P | RWU)
        for i in range(8):
            mem.write_u32(pt + i * 4, (0x80_0000 + (7 - i) * PAGE_4K) | PTE_P | RWU)
        mem.write_u32(pd + 0x300 * 4, 0x0080_0000 | PTE_P | PTE_PS | PTE_RW)
        s = fd.get_sregs()
        s.cr3, s.cr4 = pd, s.cr4 | CR4_PSE
        s.cr0 |= CR0_PG
        fd.set_sregs(s)
        addrs = {(1 << 22) + i * 0x800 for i in range(20)} | {0xC000_0000 + i for i in (0, 5)}
        addrs |= {0, 0x1000, 0x40_0000, 0x7F_FFFF, 0xFF_F000, 0xBFFF_FFFF, 0xFFFF_F000}
        _compare_with_kvm(m, addrs)
        if fd.get_sregs().cr0 & CR0_PG:  # a host that does 32-bit paging
            assert fd.translate((1 << 22) + 0x10).physical_address == 0x80_7010

        # PAE without long mode.
        pdpt, pd2, pt2 = 0x50_0020, 0x50_1000, 0x50_2000
        mem.fill(0x50_0000, 3 * PAGE_4K)
        mem.write_u64(pdpt, pd2 | PTE_P)
        mem.write_u64(pd2, pt2 | PTE_P | RWU)
        mem.write_u64(pt2 + 8, 0x90_0000 | PTE_P | RWU)
        mem.write_u64(pd2 + 8, 0xA0_0000 | PTE_P | PTE_PS | RWU)
        s = fd.get_sregs()
        s.cr3, s.cr4 = pdpt, (s.cr4 & ~CR4_PSE) | CR4_PAE
        s.cr0 |= CR0_PG
        fd.set_sregs(s)
        _compare_with_kvm(m, {0x1000, 0x1FFF, 0x2000, 0x20_0000, 0x3F_FFFF, 0x4000_0000})


# --- U/S and R/W on the CPU: what a CPL3 access does, compared with translate() ---------------

# mov al, [rbx]; mov [rcx], al; then the exit hypercall (out dx, eax with eax=0, dx=0x500).
_ACCESS_CODE = bytes.fromhex("8a03880131ff31c0ba00050000eff4")


@pytest.mark.kvm
@pytest.mark.parametrize(
    "target",
    ["user-ram", "system-area", "read-only-page", "unmapped", "stack"],
)
def test_kvm_cpl3_access_matches_translate(kvm, target):
    """A long-user guest reads [rbx] and writes [rcx] at CPL3; whether that faults must agree
    with translate()'s verdict (mapped, user, writable) for the address."""
    from kvmpy.loader import load_raw
    from kvmpy.machine import Machine, MachineConfig
    from kvmpy.result import StopReason

    with Machine(MachineConfig(mode="long-user", memory="16M"), kvm=kvm) as m:
        m.load(load_raw(_ACCESS_CODE))
        mem, fd, layout = m.memory, m.vcpus[0].fd, m.layout
        s = fd.get_sregs()
        addr = {
            "user-ram": 0x30_0000,
            "system-area": layout.base + 0x10,
            "read-only-page": 0x20_1000,
            "unmapped": 0x4000_0000,
            "stack": layout.stack_top - 8,
        }[target]
        if target == "read-only-page":
            # Split the 2 MiB page [2M, 4M) into 4 KiB pages with one read-only page.
            pde_addr = _pde_for(mem, s.cr3, addr)
            pt = 0x60_0000
            for i in range(512):
                f = RWU if i != 1 else PTE_US
                mem.write_u64(pt + i * 8, (0x20_0000 + i * PAGE_4K) | f | PTE_P)
            mem.write_u64(pde_addr, pt | PTE_P | RWU)

        def walk(a):
            return translate(a, s.cr0, s.cr3, s.cr4, s.efer, mem.read_u32, mem.read_u64)

        try:
            t = walk(addr)
            read_ok, write_ok = t.user, t.user and t.writable
        except PageFault:
            read_ok = write_ok = False
        regs = fd.get_regs()
        regs.rbx = addr
        regs.rcx = addr
        fd.set_regs(regs)
        result = m.run(timeout=10)
        if read_ok and write_ok:
            assert result.stop_reason is StopReason.EXIT, result.message
            assert result.exit_code == 0
            return
        assert result.stop_reason is StopReason.EXCEPTION, result.message
        f = result.fault
        assert f.vector == 14 and f.cr2 == addr
        # Error code: P (present: a protection fault), W (the write), U (from CPL3).
        want_write = read_ok  # the read passed, so the write is what faulted
        assert f.error_code & 0b110 == (0b110 if want_write else 0b100)
        assert bool(f.error_code & 1) == (target != "unmapped")
        assert f.rip == (2 if want_write else 0)


def _pde_for(mem: GuestMemory, cr3: int, gva: int) -> int:
    table = cr3 & ADDR_MASK_64
    for level in (4, 3):
        table = mem.read_u64(table + Tables64.index(gva, level) * 8) & ADDR_MASK_64
    return table + Tables64.index(gva, 2) * 8
