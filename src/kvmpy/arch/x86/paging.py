"""x86 page tables: building identity maps for the VMM's CPU modes, and walking the guest's.

The walker translates a guest-virtual address the way the CPU does for a data access, from the
guest's CR0/CR3/CR4/EFER and its page tables in guest RAM. Hypercalls use it for every guest
pointer; `tests/test_paging.py` cross-checks it against KVM_TRANSLATE. It never trusts the
tables: a PTE that points outside RAM makes the walk fail, never read host memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ...errors import GuestMemoryError

# Page-table entry bits.
PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_PWT = 1 << 3
PTE_PCD = 1 << 4
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7
PTE_G = 1 << 8
PTE_NX = 1 << 63

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_PGE = 1 << 7
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
CR4_LA57 = 1 << 12
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

PAGE_4K = 1 << 12
PAGE_2M = 1 << 21
PAGE_4M = 1 << 22
PAGE_1G = 1 << 30

ADDR_MASK_64 = 0x000F_FFFF_FFFF_F000  # bits 12..51 of a 64-bit entry


@dataclass(frozen=True)
class Translation:
    gpa: int
    writable: bool
    user: bool
    page_size: int


class PageFault(GuestMemoryError):
    """The walk did not reach a present page (or a table lies outside RAM)."""


ReadFn = Callable[[int], int]  # physical address -> entry value


def translate(
    gva: int,
    cr0: int,
    cr3: int,
    cr4: int,
    efer: int,
    read_u32: ReadFn,
    read_u64: ReadFn,
) -> Translation:
    """Translate a linear address. `read_u32`/`read_u64` read guest-physical memory and raise
    GuestMemoryError outside RAM; that becomes a PageFault here."""
    if not cr0 & CR0_PG:
        return Translation(gva & 0xFFFF_FFFF if not efer & EFER_LMA else gva, True, True, PAGE_4K)
    try:
        if efer & EFER_LMA:
            return _walk_64(gva, cr3, cr4, read_u64)
        if cr4 & CR4_PAE:
            return _walk_pae(gva & 0xFFFF_FFFF, cr3, read_u64)
        return _walk_32(gva & 0xFFFF_FFFF, cr3, cr4, read_u32)
    except PageFault:
        raise
    except GuestMemoryError as e:
        raise PageFault(f"page-table walk for {gva:#x} left guest RAM: {e}") from None


def _walk_64(gva: int, cr3: int, cr4: int, read_u64: ReadFn) -> Translation:
    levels = 5 if cr4 & CR4_LA57 else 4
    # Canonical check: bits above the top translated bit must equal it.
    top = 12 + 9 * levels
    upper = gva >> (top - 1)
    if upper not in (0, (1 << (64 - top + 1)) - 1):
        raise PageFault(f"{gva:#x} is not canonical")
    table = cr3 & ADDR_MASK_64
    writable = user = True
    for level in range(levels, 0, -1):
        shift = 12 + 9 * (level - 1)
        index = (gva >> shift) & 0x1FF
        entry = read_u64(table + index * 8)
        if not entry & PTE_P:
            raise PageFault(f"{gva:#x}: level-{level} entry not present")
        writable &= bool(entry & PTE_RW)
        user &= bool(entry & PTE_US)
        if level in (2, 3) and entry & PTE_PS:
            size = 1 << shift
            base = entry & ADDR_MASK_64 & ~(size - 1)
            return Translation(base | (gva & (size - 1)), writable, user, size)
        table = entry & ADDR_MASK_64
    return Translation(table | (gva & 0xFFF), writable, user, PAGE_4K)


def _walk_pae(gva: int, cr3: int, read_u64: ReadFn) -> Translation:
    pdpte = read_u64((cr3 & 0xFFFF_FFE0) + ((gva >> 30) & 3) * 8)
    if not pdpte & PTE_P:
        raise PageFault(f"{gva:#x}: PDPTE not present")
    pde = read_u64((pdpte & ADDR_MASK_64) + ((gva >> 21) & 0x1FF) * 8)
    if not pde & PTE_P:
        raise PageFault(f"{gva:#x}: PDE not present")
    if pde & PTE_PS:
        base = pde & ADDR_MASK_64 & ~(PAGE_2M - 1)
        return Translation(
            base | (gva & (PAGE_2M - 1)), bool(pde & PTE_RW), bool(pde & PTE_US), PAGE_2M
        )
    pte = read_u64((pde & ADDR_MASK_64) + ((gva >> 12) & 0x1FF) * 8)
    if not pte & PTE_P:
        raise PageFault(f"{gva:#x}: PTE not present")
    return Translation(
        (pte & ADDR_MASK_64) | (gva & 0xFFF),
        bool(pde & pte & PTE_RW),
        bool(pde & pte & PTE_US),
        PAGE_4K,
    )


def _walk_32(gva: int, cr3: int, cr4: int, read_u32: ReadFn) -> Translation:
    pde = read_u32((cr3 & 0xFFFF_F000) + (gva >> 22) * 4)
    if not pde & PTE_P:
        raise PageFault(f"{gva:#x}: PDE not present")
    if pde & PTE_PS and cr4 & CR4_PSE:
        # PSE-36: bits 13..20 of the PDE are physical address bits 32..39.
        base = (pde & 0xFFC0_0000) | (((pde >> 13) & 0xFF) << 32)
        return Translation(
            base | (gva & (PAGE_4M - 1)), bool(pde & PTE_RW), bool(pde & PTE_US), PAGE_4M
        )
    pte = read_u32((pde & 0xFFFF_F000) + ((gva >> 12) & 0x3FF) * 4)
    if not pte & PTE_P:
        raise PageFault(f"{gva:#x}: PTE not present")
    return Translation(
        (pte & 0xFFFF_F000) | (gva & 0xFFF),
        bool(pde & pte & PTE_RW),
        bool(pde & pte & PTE_US),
        PAGE_4K,
    )


# --- building identity maps --------------------------------------------------------------------


@dataclass(frozen=True)
class MapRange:
    """Identity-map [start, end) with these entry flags (PTE_P is implied)."""

    start: int
    end: int
    flags: int


class TableAllocator:
    """Hands out zeroed 4 KiB pages for page tables from a fixed guest-physical window."""

    def __init__(self, base: int, limit: int, write: Callable[[int, bytes], None]):
        self.next = base
        self.limit = limit
        self._write = write
        self.pages: list[int] = []

    def alloc(self) -> int:
        if self.next + PAGE_4K > self.limit:
            raise GuestMemoryError("out of space for page tables")
        page = self.next
        self.next += PAGE_4K
        self._write(page, bytes(PAGE_4K))
        self.pages.append(page)
        return page


def _checked(ranges: Sequence[MapRange]) -> list[MapRange]:
    """The ranges sorted by start, if each is page-aligned and none overlaps another. (A page
    only partly inside a range, or inside two, would otherwise be left out of the map.)"""
    ordered = sorted(ranges, key=lambda r: r.start)
    for r in ordered:
        if r.start % PAGE_4K or r.end % PAGE_4K:
            raise ValueError(f"map range [{r.start:#x}, {r.end:#x}) is not 4 KiB-aligned")
        if r.end < r.start:
            raise ValueError(f"map range [{r.start:#x}, {r.end:#x}) ends before it starts")
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.start < a.end:
            raise ValueError(
                f"map ranges [{a.start:#x}, {a.end:#x}) and [{b.start:#x}, {b.end:#x}) overlap"
            )
    return ordered


def _flags_for(ranges: Sequence[MapRange], start: int, end: int) -> int | None:
    """The flags if [start, end) lies inside exactly one range; -1 if it is mixed; None if none."""
    found: int | None = None
    covered = 0
    for r in ranges:
        lo, hi = max(start, r.start), min(end, r.end)
        if lo < hi:
            if found is not None and found != r.flags:
                return -1
            found = r.flags
            covered += hi - lo
    if found is None:
        return None
    return found if covered == end - start else -1


def build_identity_map_64(
    ranges: Sequence[MapRange],
    alloc: TableAllocator,
    write_u64: Callable[[int, int], None],
    use_1g: bool = False,
) -> int:
    """4-level identity map of `ranges` (page-aligned, not overlapping; else ValueError);
    returns the PML4 address (CR3).

    The largest page that covers memory with uniform flags is used (1 GiB if allowed, else
    2 MiB, else 4 KiB), so a 64 MiB guest needs three table pages and an odd-sized or
    mixed-permission area costs a page table only where it is odd.
    """
    ranges = _checked(ranges)
    pml4 = alloc.alloc()
    top = max(r.end for r in ranges)

    def fill(table: int, level: int, base: int) -> None:
        shift = 12 + 9 * (level - 1)
        size = 1 << shift
        for i in range(512):
            start = base + i * size
            if start >= top:
                break
            end = start + size
            flags = _flags_for(ranges, start, end)
            if flags is None:
                continue
            big_ok = level == 1 or (level == 2) or (level == 3 and use_1g)
            if flags != -1 and big_ok:
                entry = start | flags | PTE_P | (PTE_PS if level > 1 else 0)
                write_u64(table + i * 8, entry)
                continue
            if level == 1:
                continue  # mixed within a 4 KiB page cannot happen with page-aligned ranges
            child = alloc.alloc()
            # Intermediate entries are permissive; the leaf decides.
            write_u64(table + i * 8, child | PTE_P | PTE_RW | PTE_US)
            fill(child, level - 1, start)

    fill(pml4, 4, 0)
    return pml4


def build_identity_map_32(
    ranges: Sequence[MapRange],
    alloc: TableAllocator,
    write_u32: Callable[[int, int], None],
) -> int:
    """Two-level 32-bit identity map (CR4.PSE, 4 MiB pages where uniform); returns CR3."""
    ranges = _checked(ranges)
    pd = alloc.alloc()
    top = min(max(r.end for r in ranges), 1 << 32)
    for i in range(1024):
        start = i * PAGE_4M
        if start >= top:
            break
        flags = _flags_for(ranges, start, start + PAGE_4M)
        if flags is None:
            continue
        if flags != -1:
            write_u32(pd + i * 4, start | (flags & 0xFFF) | PTE_P | PTE_PS)
            continue
        pt = alloc.alloc()
        write_u32(pd + i * 4, pt | PTE_P | PTE_RW | PTE_US)
        for j in range(1024):
            page = start + j * PAGE_4K
            f = _flags_for(ranges, page, page + PAGE_4K)
            if f is not None and f != -1:
                write_u32(pt + j * 4, page | (f & 0xFFF) | PTE_P)
    return pd
