"""Exceptions and interrupts through the guest's IDT (or real-mode IVT), `syscall` and
`sysenter`: the parts of the x86 architecture unicorn hands to its user instead of doing.

Unicorn reports a guest exception (a page fault, #GP, `int3`, `int n`) to a UC_HOOK_INTR hook
and, left alone, resumes after it or stops; QEMU's own delivery code (do_interrupt_all) is not
reachable through its API. This module does what the CPU does, from the architectural
description (Intel SDM vol. 3, 6.12 and 6.14), on the engine's CPUX86State (env.py):

* real mode: FLAGS, CS and IP pushed on SS:SP, CS:IP from the IVT;
* protected mode: 32- or 16-bit interrupt and trap gates, a stack switch from the TSS when the
  handler runs at a more privileged level, the error code for the vectors that have one;
* long mode: 64-bit gates, IST stacks, RSP0 from the TSS, the 16-byte aligned frame.

A fault while delivering (a gate that is not present, an unmapped stack) becomes a double fault
and a fault while delivering that a triple fault, which stops the VM as KVM's SHUTDOWN exit
does. Task gates and virtual-8086 mode are not supported (kvmpy's modes use neither); a guest
that uses them stops with a message that says so.

Unicorn 2.1 replaces `syscall` and `sysenter` by a hook that only skips the instruction, so a
kvmpy guest's `syscall` (EFER.SCE is clear in kvmpy's modes) would run on where KVM raises #UD.
`fast_system_call` gives them their architectural behaviour.
"""

from __future__ import annotations

import struct

from ...arch.x86.paging import PageFault, translate
from ...errors import GuestMemoryError
from ...memory import GuestMemory
from . import env as E
from .env import CpuState

VECTORS_WITH_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
DF, TS, NP, SS_FAULT, GP, UD = 8, 10, 11, 12, 13, 6

RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17
RFLAGS_AC = 1 << 18

MSR_STAR, MSR_LSTAR, MSR_FMASK = 0xC000_0081, 0xC000_0082, 0xC000_0084
MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP = 0x174, 0x175, 0x176
EFER_SCE = 1


class Fault(Exception):
    """An exception raised while delivering another one."""

    def __init__(self, vector: int, error_code: int = 0):
        super().__init__(vector, error_code)
        self.vector = vector
        self.error_code = error_code


class TripleFault(Exception):
    """Delivery of a double fault faulted: the CPU shuts down."""


class Unsupported(Exception):
    """The guest asked for something this backend does not emulate (task gates, vm86)."""


class Linear:
    """Supervisor access to guest-linear memory through the guest's page tables, as the CPU
    makes for descriptor tables, the TSS and exception frames. Not-present pages raise
    `Fault(#PF)`."""

    def __init__(self, memory: GuestMemory, cpu: CpuState):
        self.memory = memory
        self.cr0, self.cr3, self.cr4 = cpu.cr(0), cpu.cr(3), cpu.cr(4)
        self.efer = cpu.efer
        self.long = bool(self.efer & E.EFER_LMA)

    def _gpa(self, addr: int) -> int:
        if not self.long:
            addr &= 0xFFFF_FFFF
        m = self.memory
        try:
            return translate(addr, self.cr0, self.cr3, self.cr4, self.efer,
                             m.read_u32, m.read_u64).gpa  # fmt: skip
        except PageFault:
            raise Fault(14, 0) from None

    def read(self, addr: int, n: int) -> bytes:
        out = b""
        while n:
            chunk = min(n, 4096 - (addr & 0xFFF))
            try:
                out += self.memory.read(self._gpa(addr), chunk)
            except GuestMemoryError:
                raise Fault(14, 0) from None
            addr += chunk
            n -= chunk
        return out

    def write(self, addr: int, data: bytes) -> None:
        pieces = []
        pos = 0
        while pos < len(data):
            chunk = min(len(data) - pos, 4096 - (addr & 0xFFF))
            pieces.append((self._gpa(addr), data[pos : pos + chunk]))
            addr += chunk
            pos += chunk
        for gpa, piece in pieces:
            try:
                self.memory.write(gpa, piece)
            except GuestMemoryError:
                raise Fault(14, 0) from None

    def u16(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 2), "little")

    def u32(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 4), "little")

    def u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")


CONTRIBUTORY = frozenset({0, 10, 11, 12, 13})


def _double_fault(first: int, first_software: bool, second: int) -> bool:
    """Whether `second`, raised while delivering `first`, makes a double fault (SDM vol. 3,
    table 6-5): contributory after contributory, or #PF/contributory after #PF."""
    if first_software:
        return False
    if first == 14:
        return second == 14 or second in CONTRIBUTORY
    return first in CONTRIBUTORY and second in CONTRIBUTORY


def deliver(
    cpu: CpuState,
    memory: GuestMemory,
    vector: int,
    *,
    error_code: int | None = None,
    software: bool = False,
    inside: bool = True,
) -> None:
    """Deliver `vector` with the guest's state in `cpu.buf` (loaded by the caller) and store the
    result into the engine. RIP in the state is the return address (the faulting instruction
    for faults, the next one for traps, software interrupts and external interrupts).

    A fault during delivery is delivered instead, or becomes #DF by the architecture's rules;
    a fault delivering #DF raises TripleFault."""
    rflags = cpu.read_rflags()
    snapshot = bytes(cpu.buf)
    for _ in range(4):
        try:
            _deliver_one(cpu, memory, vector, error_code, software, rflags, inside)
            break
        except Fault as f:
            if vector == DF:
                raise TripleFault() from None
            cpu.buf[:] = snapshot
            if _double_fault(vector, software, f.vector):
                vector, error_code = DF, 0
            else:
                vector, error_code = f.vector, f.error_code
            software = False
    else:
        raise TripleFault()
    cpu.store()


def _deliver_one(cpu, memory, vector, error_code, software, rflags, inside) -> None:
    if software or vector not in VECTORS_WITH_ERROR_CODE:
        error_code = None
    elif error_code is None:
        error_code = 0
    if not cpu.cr(0) & 1:
        _deliver_real(cpu, memory, vector, rflags, inside)
    elif rflags & RFLAGS_VM:
        raise Unsupported("an interrupt in virtual-8086 mode")
    elif cpu.efer & E.EFER_LMA:
        _deliver_long(cpu, memory, vector, error_code, software, rflags, inside)
    else:
        _deliver_protected(cpu, memory, vector, error_code, software, rflags, inside)


def _deliver_real(cpu: CpuState, memory, vector: int, rflags: int, inside: bool) -> None:
    lin = Linear(memory, cpu)
    idt = cpu.table(E.IDT)
    if vector * 4 + 3 > idt.limit:
        raise Fault(GP, vector * 8 + 2)  # real mode pushes no error code; this ends in #DF
    off, seg = struct.unpack("<HH", lin.read(idt.base + vector * 4, 4))
    ss, cs = cpu.seg(E.R_SS), cpu.seg(E.R_CS)
    sp = cpu.gpr("rsp")
    ip = cpu.u64(E.EIP)
    frame = struct.pack("<HHH", ip & 0xFFFF, cs.selector, rflags & 0xFFFF)
    new_sp = (sp - 6) & 0xFFFF
    for i in range(3):  # the stack wraps within the segment
        lin.write(ss.base + ((new_sp + 2 * i) & 0xFFFF), frame[2 * i : 2 * i + 2])
    cpu.set_gpr("rsp", (sp & ~0xFFFF) | new_sp)
    cpu.set_seg(E.R_CS, seg, seg << 4, cs.limit, cs.flags)
    cpu.put_u64(E.EIP, off)
    rflags &= ~(RFLAGS_IF | RFLAGS_TF | RFLAGS_AC | RFLAGS_RF)
    cpu.put_rflags(rflags, inside)
    cpu.update_hflags(rflags, inhibit_irq=False)


def _read_gate(lin: Linear, cpu: CpuState, vector: int, size: int, software: bool):
    idt = cpu.table(E.IDT)
    if vector * size + size - 1 > idt.limit:
        raise Fault(GP, vector * 8 + 2 + (0 if software else 1))
    e1, e2 = struct.unpack("<II", lin.read(idt.base + vector * size, 8))
    e3 = lin.u32(idt.base + vector * size + 8) if size == 16 else 0
    return e1, e2, e3


def _load_descriptor(lin: Linear, cpu: CpuState, selector: int) -> tuple[int, int]:
    """The raw descriptor for `selector` from the GDT or LDT; #GP(selector) past the limit."""
    table = cpu.table(E.LDT if selector & 4 else E.GDT)
    index = selector & ~7
    if index + 7 > table.limit:
        raise Fault(GP, selector & 0xFFFC)
    return struct.unpack("<II", lin.read(table.base + index, 8))


def _check_gate(e2: int, vector: int, software: bool, cpl: int, types) -> int:
    # Error codes name the IDT entry; EXT (bit 0) says the event came from outside the program.
    idt_error = vector * 8 + 2 + (0 if software else 1)
    gate_type = (e2 >> 8) & 0x1F
    if gate_type == 5:
        raise Unsupported(f"a task gate (IDT vector {vector})")
    if gate_type not in types:
        raise Fault(GP, idt_error)
    dpl = (e2 >> E.DESC_DPL_SHIFT) & 3
    if software and dpl < cpl:
        raise Fault(GP, idt_error)
    if not e2 & E.DESC_P:
        raise Fault(NP, idt_error)
    return gate_type


def _code_segment(lin, cpu, selector: int, cpl: int) -> tuple[int, int, int, int]:
    """Check the handler's code segment; returns (e1, e2, dpl, flags)."""
    if selector & 0xFFFC == 0:
        raise Fault(GP, 0)
    e1, e2 = _load_descriptor(lin, cpu, selector)
    if not e2 & E.DESC_S or not e2 & (1 << 11):  # not a code segment
        raise Fault(GP, selector & 0xFFFC)
    dpl = (e2 >> E.DESC_DPL_SHIFT) & 3
    if dpl > cpl:
        raise Fault(GP, selector & 0xFFFC)
    if not e2 & E.DESC_P:
        raise Fault(NP, selector & 0xFFFC)
    return e1, e2, dpl, e2 & 0x00FF_FF00


def _deliver_protected(cpu, memory, vector, error_code, software, rflags, inside) -> None:
    lin = Linear(memory, cpu)
    cpl = cpu.hflags & E.HF_CPL
    e1, e2, _ = _read_gate(lin, cpu, vector, 8, software)
    gate_type = _check_gate(e2, vector, software, cpl, (6, 7, 14, 15))
    shift = 1 if gate_type & 8 else 0  # 32-bit gate
    selector = e1 >> 16
    offset = (e2 & 0xFFFF_0000) | (e1 & 0xFFFF)
    ce1, ce2, dpl, cflags = _code_segment(lin, cpu, selector, cpl)
    conforming = ce2 & (1 << 10)
    ss, cs = cpu.seg(E.R_SS), cpu.seg(E.R_CS)
    old_esp = cpu.gpr("rsp")
    eip = cpu.u64(E.EIP)
    inner = not conforming and dpl < cpl
    if inner:
        tr = cpu.table(E.TR)
        if (tr.flags >> 8) & 0xF in (0x9, 0xB):  # 32-bit TSS
            off = 4 + 8 * dpl
            if off + 5 > tr.limit:
                raise Fault(TS, tr.selector & 0xFFFC)
            new_esp, new_ss = lin.u32(tr.base + off), lin.u16(tr.base + off + 4)
        else:
            off = 2 + 4 * dpl
            if off + 3 > tr.limit:
                raise Fault(TS, tr.selector & 0xFFFC)
            new_esp, new_ss = lin.u16(tr.base + off), lin.u16(tr.base + off + 2)
        if new_ss & 0xFFFC == 0 or new_ss & 3 != dpl:
            raise Fault(TS, new_ss & 0xFFFC)
        se1, se2 = _load_descriptor(lin, cpu, new_ss)
        if not se2 & E.DESC_S or se2 & (1 << 11) or not se2 & (1 << 9):
            raise Fault(TS, new_ss & 0xFFFC)
        if (se2 >> E.DESC_DPL_SHIFT) & 3 != dpl or not se2 & E.DESC_P:
            raise Fault(TS, new_ss & 0xFFFC)
        ss_base, ss_limit, ss_flags = E.descriptor_cache(se1, se2)
    else:
        ss_base, ss_limit, ss_flags = ss.base, ss.limit, ss.flags
        new_esp, new_ss = old_esp, ss.selector
        dpl = cpl
    pushes = [ss.selector, old_esp] if inner else []
    pushes += [rflags, cs.selector, eip]
    if error_code is not None:
        pushes.append(error_code)
    size = 4 if shift else 2
    mask = 0xFFFF_FFFF if ss_flags & E.DESC_B else 0xFFFF
    sp = new_esp
    for value in pushes:
        sp = (sp - size) & mask
        lin.write(ss_base + sp, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
    cpu.set_gpr("rsp", (new_esp & ~mask) | sp)
    if inner:
        cpu.set_seg(E.R_SS, new_ss, ss_base, ss_limit, ss_flags)
    base, limit, _ = E.descriptor_cache(ce1, ce2)
    cpu.set_seg(E.R_CS, (selector & 0xFFFC) | dpl, base, limit, cflags)
    cpu.put_u64(E.EIP, offset if shift else offset & 0xFFFF)
    rflags &= ~(RFLAGS_TF | RFLAGS_VM | RFLAGS_RF | RFLAGS_NT)
    if not gate_type & 1:  # interrupt gate
        rflags &= ~RFLAGS_IF
    cpu.put_rflags(rflags, inside)
    cpu.update_hflags(rflags, inhibit_irq=False)


def _deliver_long(cpu, memory, vector, error_code, software, rflags, inside) -> None:
    lin = Linear(memory, cpu)
    cpl = cpu.hflags & E.HF_CPL
    e1, e2, e3 = _read_gate(lin, cpu, vector, 16, software)
    gate_type = _check_gate(e2, vector, software, cpl, (14, 15))
    selector = e1 >> 16
    offset = (e3 << 32) | (e2 & 0xFFFF_0000) | (e1 & 0xFFFF)
    ist = e2 & 7
    ce1, ce2, dpl, cflags = _code_segment(lin, cpu, selector, cpl)
    if not ce2 & E.DESC_L or ce2 & E.DESC_B:
        raise Fault(GP, selector & 0xFFFC)
    conforming = ce2 & (1 << 10)
    ss, cs = cpu.seg(E.R_SS), cpu.seg(E.R_CS)
    old_rsp = cpu.gpr("rsp")
    rip = cpu.u64(E.EIP)
    if conforming:
        dpl = cpl
    tr = cpu.table(E.TR)
    if ist:
        off = 36 + 8 * (ist - 1)
    elif dpl < cpl:
        off = 4 + 8 * dpl
    else:
        off = None
    if off is not None:
        if off + 7 > tr.limit:
            raise Fault(TS, tr.selector & 0xFFFC)
        new_rsp = lin.u64(tr.base + off)
    else:
        new_rsp = old_rsp
    new_rsp &= ~0xF
    frame = [rip, cs.selector, rflags, old_rsp, ss.selector]
    if error_code is not None:
        frame = [error_code, *frame]
    sp = new_rsp - 8 * len(frame)
    lin.write(sp, b"".join(v.to_bytes(8, "little") for v in frame))
    cpu.set_gpr("rsp", sp)
    if dpl != cpl:
        # A null SS with RPL = the new CPL; QEMU keeps the DPL in the cache for CPL.
        cpu.set_seg(E.R_SS, dpl, 0, 0, dpl << E.DESC_DPL_SHIFT)
    base, limit, _ = E.descriptor_cache(ce1, ce2)
    cpu.set_seg(E.R_CS, (selector & 0xFFFC) | dpl, base, limit, cflags)
    cpu.put_u64(E.EIP, offset)
    rflags &= ~(RFLAGS_TF | RFLAGS_VM | RFLAGS_RF | RFLAGS_NT)
    if not gate_type & 1:
        rflags &= ~RFLAGS_IF
    cpu.put_rflags(rflags, inside)
    cpu.update_hflags(rflags, inhibit_irq=False)


# --- syscall / sysenter ------------------------------------------------------------------------


def fast_system_call(cpu: CpuState, memory: GuestMemory, sysenter: bool, length: int) -> None:
    """`syscall` or `sysenter` at RIP (`length` bytes long), from inside its unicorn hook,
    with the architectural result: the kernel entry point at CPL0, or #UD/#GP where the CPU
    raises them. Unicorn adds `length` to RIP after the hook returns, so the RIP stored here is
    `length` short of the target."""
    cpu.load()
    rip = cpu.u64(E.EIP)
    rflags = cpu.read_rflags()
    long64 = bool(cpu.hflags & E.HF_CS64)
    msr = cpu.uc.msr_read
    try:
        if sysenter:
            target = _sysenter(cpu, msr, rflags, long64)
        else:
            target = _syscall(cpu, msr, rip + length, rflags, long64)
    except Fault as f:
        # Fault at the instruction itself: back to it, then deliver.
        cpu.load()
        cpu.put_u64(E.EIP, rip)
        deliver(cpu, memory, f.vector, error_code=f.error_code, inside=True)
        cpu.load()
        target = cpu.u64(E.EIP)
    cpu.put_u64(E.EIP, (target - length) & 0xFFFF_FFFF_FFFF_FFFF)
    cpu.store()


def _flat(dpl: int, code: bool, long: bool) -> int:
    flags = E.DESC_P | E.DESC_S | E.DESC_G | dpl << E.DESC_DPL_SHIFT
    flags |= (0xB << 8) if code else (0x3 << 8)
    if code and long:
        return flags | E.DESC_L
    return flags | E.DESC_B


def _syscall(cpu: CpuState, msr, next_rip: int, rflags: int, long64: bool) -> int:
    # Intel CPUs (and so KVM on them) raise #UD outside 64-bit mode; kvmpy's modes clear SCE.
    if not cpu.efer & EFER_SCE or not long64:
        raise Fault(UD)
    star, lstar, fmask = msr(MSR_STAR), msr(MSR_LSTAR), msr(MSR_FMASK)
    cpu.set_gpr("rcx", next_rip)
    cpu.set_gpr("r11", rflags & ~RFLAGS_RF)
    sel = (star >> 32) & 0xFFFC
    cpu.set_seg(E.R_CS, sel, 0, 0xFFFF_FFFF, _flat(0, True, True))
    cpu.set_seg(E.R_SS, (sel + 8) & 0xFFFC, 0, 0xFFFF_FFFF, _flat(0, False, False))
    rflags = rflags & ~fmask & ~RFLAGS_RF
    cpu.put_rflags(rflags, True)
    cpu.update_hflags(rflags)
    return lstar


def _sysenter(cpu: CpuState, msr, rflags: int, long64: bool) -> int:
    cs_sel = msr(MSR_SYSENTER_CS) & 0xFFFF
    if not cpu.cr(0) & 1 or cs_sel & 0xFFFC == 0:
        raise Fault(GP, 0)
    long = bool(cpu.efer & E.EFER_LMA)
    cpu.set_seg(E.R_CS, cs_sel & 0xFFFC, 0, 0xFFFF_FFFF, _flat(0, True, long))
    cpu.set_seg(E.R_SS, (cs_sel + 8) & 0xFFFC, 0, 0xFFFF_FFFF, _flat(0, False, False))
    cpu.set_gpr("rsp", msr(MSR_SYSENTER_ESP))
    rflags &= ~(RFLAGS_VM | RFLAGS_IF | RFLAGS_RF)
    cpu.put_rflags(rflags, True)
    cpu.update_hflags(rflags)
    target = msr(MSR_SYSENTER_EIP)
    return target if long else target & 0xFFFF_FFFF
