"""CPU modes: the state a vCPU starts in and the system structures that state needs.

Every mode gets the same *system area*, placed in guest RAM where it overlaps neither the image
nor anything else the caller reserved: descriptor tables, exception stubs, ring-0 stacks and
page tables. An exception the guest does not handle lands in a stub that reports its vector to
the VMM through an `out` to `FAULT_PORT`; the VMM reads the exception frame from the stub's
stack and stops the VM with the vector, error code and faulting registers. The stubs are 5 bytes
that decode identically in 16-, 32- and 64-bit code.

Mode summary (see docs/modes.md):

==========  ====  ===========================================================================
real         16   CS:IP from the entry point, DS=ES=SS=0, IVT moved into the system area
protected    32   flat 4 GiB segments, no paging
paged32      32   flat segments, 32-bit paging with 4 MiB pages (CR4.PSE), identity map
long         64   4-level identity map of RAM, CPL0
long-user    64   same map, image runs at CPL3 with IOPL=3; TSS with an I/O bitmap allowing
                  every port (KVM-PVM ignores IOPL for in/out); ring-0 structures supervisor-only
==========  ====  ===========================================================================
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from ...errors import ConfigError
from ...kvm import structs as S
from ...memory import PAGE_SIZE, GuestMemory
from . import gdt as G
from .paging import (
    CR0_ET,
    CR0_MP,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_OSFXSR,
    CR4_OSXMMEXCPT,
    CR4_PAE,
    CR4_PSE,
    EFER_LMA,
    EFER_LME,
    PTE_PCD,
    PTE_PWT,
    PTE_RW,
    PTE_US,
    MapRange,
    TableAllocator,
    build_identity_map_32,
    build_identity_map_64,
)


class Mode(enum.StrEnum):
    REAL = "real"
    PROTECTED = "protected"
    PAGED32 = "paged32"
    LONG = "long"
    LONG_USER = "long-user"

    @property
    def bits(self) -> int:
        return {"real": 16, "protected": 32, "paged32": 32}.get(self.value, 64)

    @property
    def user(self) -> bool:
        return self is Mode.LONG_USER

    @classmethod
    def parse(cls, text: str) -> Mode:
        try:
            return cls(text)
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise ConfigError(f"unknown mode {text!r}: choose one of {names}") from None


# GDT selectors (same indices in every mode; Linux-like order so `sysret` could work later).
SEL_KCODE = 0x08
SEL_KDATA = 0x10
SEL_UCODE32 = 0x18
SEL_UDATA = 0x20 | 3
SEL_UCODE64 = 0x28 | 3
SEL_TSS = 0x30

FAULT_PORT = 0xE8
STUB_SIZE = 8
# `out 0xE8, al; hlt; jmp .-1` - identical bytes in 16/32/64-bit code and clobbers nothing.
STUB_CODE = bytes([0xE6, FAULT_PORT, 0xF4, 0xEB, 0xFD, 0x90, 0x90, 0x90])
VECTORS_WITH_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})

TSS_IOMAP_OFFSET = 104
# 65536 ports / 8 bits, all zero (= allowed), plus the 0xFF terminator byte the CPU requires.
TSS_IOMAP_BYTES = 8192 + 1
TSS_SIZE = TSS_IOMAP_OFFSET + TSS_IOMAP_BYTES

USER_STACK_SIZE = 64 * 1024
REAL_STACK_SIZE = 4 * 1024
#: Pages of each CPU's ring-0 area: its TSS (3 pages, with the I/O bitmap), IST1 stack (1),
#: RSP0 stack (2).
CPU_AREA_PAGES = 6
#: Bytes per CPU in the per-CPU data page (kvmpy/smp.h's struct kvmpy_cpu), which each CPU
#: reaches through its GS base.
PERCPU_SIZE = 256
#: Offsets in each CPU's block of the paravirtual scheduling words (u32 each): the spinlocks the
#: CPU holds (guest-written), "yield when you release it" and "you are preempted" (VMM-written).
PERCPU_LOCKS_HELD = 224
PERCPU_YIELD_PENDING = 228
PERCPU_PREEMPTED = 232
MAX_CPUS = PAGE_SIZE // PERCPU_SIZE

RFLAGS_RESERVED = 1 << 1
RFLAGS_IF = 1 << 9
RFLAGS_IOPL3 = 3 << 12


@dataclass
class SystemLayout:
    """Where the VMM put its structures in guest-physical memory (all identity-mapped)."""

    base: int = 0
    end: int = 0
    gdt: int = 0
    idt: int = 0
    stubs: int = 0
    tss: int = 0
    ist_top: int = 0
    rsp0_top: int = 0
    page_tables: list[int] = field(default_factory=list)
    stack_base: int = 0
    stack_top: int = 0
    ncpus: int = 1
    #: The per-CPU data page (user-accessible, at the bottom of the stack area).
    percpu: int = 0
    #: Per CPU (index 0 = the fields above): [tss, ist_top, rsp0_top, stack_top].
    cpus: list[list[int]] = field(default_factory=list)

    def tss_selector(self, cpu: int) -> int:
        return SEL_TSS + 16 * cpu

    def stub_vector(self, linear_rip: int) -> int | None:
        """The vector whose stub executed the `out` that ends at `linear_rip`, if any."""
        off = linear_rip - 2 - self.stubs
        if 0 <= off < 256 * STUB_SIZE and off % STUB_SIZE == 0:
            return off // STUB_SIZE
        return None

    def reserved_ranges(self) -> list[tuple[int, int]]:
        return [(self.base, self.end), (self.stack_base, self.stack_top)]


@dataclass
class BootState:
    mode: Mode
    regs: S.kvm_regs
    sregs: S.kvm_sregs
    layout: SystemLayout
    #: Special registers of CPUs 1..n-1 (their own TSS and GS base); their general registers
    #: are set when they are started (`ap_regs`).
    ap_sregs: list[S.kvm_sregs] = field(default_factory=list)

    def ap_regs(self, cpu: int, entry: int, args: tuple[int, ...] = ()) -> S.kvm_regs:
        """General registers for CPU `cpu` starting at `entry` with `args` in rdi, rsi, rdx
        and its own stack."""
        regs = S.kvm_regs(rflags=self.regs.rflags, rip=entry, rsp=self.layout.cpus[cpu][3])
        for name, value in zip(("rdi", "rsi", "rdx"), args, strict=False):
            setattr(regs, name, value)
        return regs


def _free_spot(
    memory: GuestMemory, reserved: Sequence[tuple[int, int]], size: int, limit: int, align: int
) -> int | None:
    """Highest `align`-aligned address below `limit` where `size` bytes of RAM are unreserved."""
    best = None
    for region in memory:
        hi = min(region.end, limit)
        lo = region.gpa
        # Walk down from the top of this region, skipping reserved ranges.
        cand = (hi - size) // align * align
        while cand >= lo:
            clash = [r for r in reserved if cand < r[1] and r[0] < cand + size]
            if not clash:
                if best is None or cand > best:
                    best = cand
                break
            cand = (min(r[0] for r in clash) - size) // align * align
    return best


def _page_table_pages(mode: Mode, ram_top: int) -> int:
    if mode in (Mode.LONG, Mode.LONG_USER):
        # PML4 + PDPTs + one PD per GiB + page tables where 2 MiB chunks are mixed (system area,
        # stack, and the RAM tail).
        # Below 4 GiB everything is mapped (the MMIO hole included), so at least 4 PDs.
        top = max(ram_top, MMIO_TOP)
        return 2 + (top >> 39) + -(-top // (1 << 30)) + 6
    if mode is Mode.PAGED32:
        return 1 + 4
    return 0


def place(
    mode: Mode, memory: GuestMemory, reserved: Sequence[tuple[int, int]], ncpus: int = 1
) -> SystemLayout:
    """Choose addresses for the system area and the initial stacks."""
    if not 1 <= ncpus <= MAX_CPUS:
        raise ConfigError(f"kvmpy guests run on 1 to {MAX_CPUS} vCPUs (got {ncpus})")
    if mode is Mode.REAL and ncpus > 1:
        raise ConfigError("real-mode guests run on one vCPU: use a 32- or 64-bit mode for SMP")
    ram_top = max(r.end for r in memory)
    pt_pages = _page_table_pages(mode, ram_top)
    if mode is Mode.REAL:
        # IVT page + stub page, then a small stack; all reachable from 16-bit segments.
        area = 2 * PAGE_SIZE
        stack = REAL_STACK_SIZE
        limits = (0x10000, 0x100000)
    else:
        # GDT, IDT, stubs, then each CPU's TSS (3 pages), IST stack, 2-page RSP0 stack, then
        # page tables. The stack area holds the per-CPU data page and one stack per CPU.
        area = (3 + CPU_AREA_PAGES * ncpus + pt_pages) * PAGE_SIZE
        stack = PAGE_SIZE + USER_STACK_SIZE * ncpus
        limits = (1 << 32,) if mode.bits == 32 else (1 << 32, 1 << 52)
    layout = SystemLayout()
    taken = list(reserved)
    for limit in limits:
        base = _free_spot(memory, taken, area, limit, PAGE_SIZE)
        if base is not None:
            break
    else:
        raise ConfigError(
            f"no room in guest RAM for kvmpy's {area // 1024} KiB of {mode} system structures "
            "outside the image; give the guest more memory (--mem)"
        )
    taken.append((base, base + area))
    for limit in limits:
        # A stack on its own 2 MiB-aligned-if-possible spot keeps page tables small; any free
        # page-aligned spot will do.
        sbase = _free_spot(memory, taken, stack, limit, PAGE_SIZE)
        if sbase is not None:
            break
    else:
        raise ConfigError(
            "no room in guest RAM for the initial stack outside the image; "
            "give the guest more memory (--mem)"
        )
    layout.base, layout.end = base, base + area
    layout.stack_base, layout.stack_top = sbase, sbase + stack
    layout.ncpus = ncpus
    if mode is Mode.REAL:
        layout.idt = base
        layout.stubs = base + PAGE_SIZE
        layout.cpus = [[0, 0, 0, layout.stack_top]]
    else:
        layout.gdt = base
        layout.idt = base + PAGE_SIZE
        layout.stubs = base + 2 * PAGE_SIZE
        layout.percpu = sbase
        for i in range(ncpus):
            cpu = base + (3 + CPU_AREA_PAGES * i) * PAGE_SIZE
            stack_top = layout.stack_top - i * USER_STACK_SIZE
            layout.cpus.append([cpu, cpu + 4 * PAGE_SIZE, cpu + 6 * PAGE_SIZE, stack_top])
        layout.tss, layout.ist_top, layout.rsp0_top = layout.cpus[0][:3]
    return layout


def page_tables_start(layout: SystemLayout) -> int:
    return layout.base + (3 + CPU_AREA_PAGES * layout.ncpus) * PAGE_SIZE


def build(
    mode: Mode,
    memory: GuestMemory,
    entry: int,
    reserved: Sequence[tuple[int, int]] = (),
    *,
    interrupts: bool = False,
    use_1g_pages: bool = False,
    ncpus: int = 1,
) -> BootState:
    """Write the system area for `mode` into guest RAM and return the entry register state."""
    layout = place(mode, memory, reserved, ncpus)
    memory.fill(layout.base, layout.end - layout.base)
    stubs = STUB_CODE * 256
    memory.write(layout.stubs, stubs)
    regs = S.kvm_regs(rflags=RFLAGS_RESERVED)
    sregs = S.kvm_sregs()
    if mode is Mode.REAL:
        _build_real(memory, layout, entry, regs, sregs)
    else:
        _build_protected_or_long(mode, memory, layout, entry, regs, sregs, use_1g_pages)
    if interrupts:
        regs.rflags |= RFLAGS_IF
    boot = BootState(mode, regs, sregs, layout)
    if mode is not Mode.REAL:
        _build_percpu(memory, boot)
    return boot


def _build_percpu(memory: GuestMemory, boot: BootState) -> None:
    """Each CPU's data block (id, CPU count: what kvmpy/smp.h reads through %gs) and the special
    registers of CPUs 1..n-1: the BSP's, with their own TSS and GS base."""
    layout = boot.layout
    memory.fill(layout.percpu, PAGE_SIZE)
    for i in range(layout.ncpus):
        block = layout.percpu + i * PERCPU_SIZE
        memory.write(block, struct.pack("<IIQ", i, layout.ncpus, block))
    boot.sregs.gs.base = layout.percpu
    for i in range(1, layout.ncpus):
        sregs = S.kvm_sregs.from_buffer_copy(boot.sregs)
        tss, _ist, _rsp0, _stack = layout.cpus[i]
        bits64 = boot.mode.bits == 64
        sregs.tr = G.tss(layout.tss_selector(i), tss, TSS_SIZE - 1).to_kvm()
        sregs.gs.base = layout.percpu + i * PERCPU_SIZE
        if not bits64:
            sregs.gs.base &= 0xFFFFFFFF
        boot.ap_sregs.append(sregs)


def _build_real(memory: GuestMemory, layout: SystemLayout, entry: int, regs, sregs) -> None:
    if entry >= 0x100000:
        raise ConfigError(f"real-mode entry point {entry:#x} is above 1 MiB")
    ivt = b"".join(struct.pack("<HH", v * STUB_SIZE, layout.stubs >> 4) for v in range(256))
    memory.write(layout.idt, ivt)
    cs = entry & 0xF0000
    sregs.cs = G.real_mode(cs >> 4, code=True).to_kvm()
    for name in ("ds", "es", "fs", "gs"):
        setattr(sregs, name, G.real_mode(0, code=False).to_kvm())
    if layout.stack_top <= 0x10000:
        ss, sp = 0, layout.stack_top
    else:
        ss = layout.stack_base >> 4
        sp = layout.stack_top - (ss << 4)
    sregs.ss = G.real_mode(ss, code=False).to_kvm()
    sregs.tr = G.Segment(0, 0, 0xFFFF, G.TYPE_TSS_BUSY, s=0).to_kvm()
    sregs.ldt = G.Segment(0, 0, 0xFFFF, 0x2, s=0).to_kvm()
    sregs.gdt = S.kvm_dtable(base=0, limit=0xFFFF)
    sregs.idt = S.kvm_dtable(base=layout.idt, limit=0x3FF)
    sregs.cr0 = CR0_ET
    regs.rip = entry - cs
    regs.rsp = sp & 0xFFFF if sp < 0x10000 else 0xFFFE


def _build_protected_or_long(
    mode: Mode, memory: GuestMemory, layout: SystemLayout, entry: int, regs, sregs, use_1g: bool
) -> None:
    long = mode.bits == 64
    if not long and entry >= 1 << 32:
        raise ConfigError(f"{mode} entry point {entry:#x} is above 4 GiB")
    if long:
        kcode, ucode = G.flat_code64(SEL_KCODE, 0), G.flat_code64(SEL_UCODE64, 3)
    else:
        kcode, ucode = G.flat_code32(SEL_KCODE, 0), G.flat_code32(SEL_UCODE64, 3)
    kdata, udata = G.flat_data(SEL_KDATA, 0), G.flat_data(SEL_UDATA, 3)
    tss = G.tss(SEL_TSS, layout.tss, TSS_SIZE - 1)
    table = bytearray(8) + kcode.descriptor() + kdata.descriptor()
    table += G.flat_code32(SEL_UCODE32, 3).descriptor() + udata.descriptor() + ucode.descriptor()
    # One TSS per CPU, 16-byte descriptors (a 64-bit TSS descriptor's size) from SEL_TSS on.
    for i in range(layout.ncpus):
        cpu_tss = layout.cpus[i][0]
        table += G.Segment(
            layout.tss_selector(i), cpu_tss, TSS_SIZE - 1, G.TYPE_TSS_AVAIL, s=0
        ).descriptor()
        if not long:
            table += bytes(8)
    memory.write(layout.gdt, bytes(table))

    # Each TSS: the CPU's ring-0 stack for interrupts taken at CPL3, IST1 for exceptions, and
    # the I/O bitmap.
    for cpu_tss, ist_top, rsp0_top, _stack in layout.cpus:
        t = bytearray(TSS_SIZE)
        if long:
            struct.pack_into("<Q", t, 4, rsp0_top)
            struct.pack_into("<Q", t, 36, ist_top)
        else:
            struct.pack_into("<II", t, 4, rsp0_top, SEL_KDATA)
        struct.pack_into("<H", t, 102, TSS_IOMAP_OFFSET)
        t[-1] = 0xFF
        memory.write(cpu_tss, bytes(t))

    idt = bytearray()
    for v in range(256):
        handler = layout.stubs + v * STUB_SIZE
        dpl = 3 if v in (3, 4) else 0  # int3/into from CPL3 report #BP/#OF, not #GP
        if long:
            idt += G.gate64(handler, SEL_KCODE, dpl=dpl, ist=1 if v < 32 else 0)
        else:
            idt += G.gate32(handler, SEL_KCODE, dpl=dpl)
    memory.write(layout.idt, bytes(idt))

    user = mode.user
    code, data = (ucode, udata) if user else (kcode, kdata)
    sregs.cs = code.to_kvm()
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, data.to_kvm())
    sregs.tr = tss.to_kvm()
    sregs.ldt = G.Segment(0, 0, 0, 0x2, s=0, present=0).to_kvm()
    sregs.gdt = S.kvm_dtable(base=layout.gdt, limit=len(table) - 1)
    sregs.idt = S.kvm_dtable(base=layout.idt, limit=len(idt) - 1)
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE
    sregs.cr4 = CR4_OSFXSR | CR4_OSXMMEXCPT

    if mode in (Mode.PAGED32, Mode.LONG, Mode.LONG_USER):
        ranges = _map_ranges(memory, layout, user)
        alloc = TableAllocator(page_tables_start(layout), layout.end, memory.write)
        if long:
            cr3 = build_identity_map_64(ranges, alloc, memory.write_u64, use_1g)
            sregs.cr4 |= CR4_PAE
            sregs.efer = EFER_LME | EFER_LMA
        else:
            cr3 = build_identity_map_32(ranges, alloc, memory.write_u32)
            sregs.cr4 |= CR4_PSE
        layout.page_tables = alloc.pages
        sregs.cr3 = cr3
        sregs.cr0 |= CR0_PG | CR0_WP

    regs.rip = entry
    regs.rsp = layout.stack_top
    if user:
        regs.rflags |= RFLAGS_IOPL3


#: Everything below this that is not RAM is mapped uncached, for MMIO devices.
MMIO_TOP = 1 << 32


def _map_ranges(memory: GuestMemory, layout: SystemLayout, user: bool) -> list[MapRange]:
    """All RAM identity-mapped read/write; in long-user mode the system area is supervisor-only
    so a CPL3 bug cannot overwrite the IDT or page tables, and faults instead. Whatever lies
    below 4 GiB and is not RAM (the MMIO hole at 3 GiB, and the space between the end of a
    small guest's RAM and it) is mapped too, uncached (PCD|PWT), as a PC's firmware maps
    device memory: so that `Machine.add_mmio_device` works in the paging modes as in the
    others, and an access there reaches the MMIO bus instead of raising #PF."""
    rw_user = PTE_RW | PTE_US
    mmio = PTE_RW | PTE_US | PTE_PCD | PTE_PWT
    ranges: list[MapRange] = []
    pos = 0
    for region in sorted(memory, key=lambda r: r.gpa):
        if pos < region.gpa and pos < MMIO_TOP:
            ranges.append(MapRange(pos, min(region.gpa, MMIO_TOP), mmio))
        pos = max(pos, region.end)
    if pos < MMIO_TOP:
        ranges.append(MapRange(pos, MMIO_TOP, mmio))
    for region in memory:
        if user and region.gpa <= layout.base < region.end:
            if region.gpa < layout.base:
                ranges.append(MapRange(region.gpa, layout.base, rw_user))
            ranges.append(MapRange(layout.base, layout.end, PTE_RW))
            if layout.end < region.end:
                ranges.append(MapRange(layout.end, region.end, rw_user))
        else:
            ranges.append(MapRange(region.gpa, region.end, rw_user))
    return ranges
