"""The CPU state of a unicorn engine, in kvmpy's one CPU-state format (kvm_regs, kvm_sregs,
kvm_fpu and an MSR list).

Unicorn's register API cannot load the hidden part of a segment register (base, limit,
attributes) the way KVM_SET_SREGS does: in UC_MODE_64 a write to CS, SS, DS or ES sets the
selector only, so the CPU stays at CPL0 with whatever attributes it had; in the 16- and 32-bit
modes a write reloads the descriptor from the GDT and refuses one the current CPL may not load.
Nor can it say which exception is in flight with which error code. So this module reads and
writes the engine's `CPUX86State` (QEMU 5.0's, which unicorn 2.1 embeds) through unicorn's CPU
context, which `uc_context_save`/`uc_context_restore` copy verbatim, at the offsets below.
`check_layout()` verifies every offset against the register API (and a real #GP for the
error-code field) the first time an engine is made; a unicorn build whose layout differs is
refused with one message instead of being misread.

QEMU derives translation-time flags (`hflags`: CPL, 16/32/64-bit code and stack, long mode,
protected mode, OSFXSR...) from that state; `_hflags` recomputes them exactly as QEMU's
`x86_update_hflags()` does after KVM hands it registers, plus HF_IOBPT (see vcpu.py: it makes
every `in`/`out` check the debug registers, which gives the backend precise stops after I/O).

QEMU keeps the arithmetic flags lazily (CC_SRC/CC_OP) while the CPU executes and folds them
into `eflags` when the engine returns, so RFLAGS has two encodings: `inside` (from a hook) and
outside (between `uc_emu_start` calls).
"""

from __future__ import annotations

import ctypes as C
import functools
import struct
from dataclasses import dataclass

from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_16, UC_MODE_32, UC_MODE_64, Uc, UcError
from unicorn import x86_const as X

from ...arch.x86.vmem import Regime
from ...errors import KvmpyError
from ...kvm import structs as S
from . import lib

# --- CPUX86State (qemu/target/i386/cpu.h in unicorn 2.1.x), byte offsets ------------------------
REGS = 0  # target_ulong regs[16], QEMU order: rax rcx rdx rbx rsp rbp rsi rdi r8..r15
EIP = 128
EFLAGS = 136
CC_SRC = 152
CC_OP = 168
DF = 172
HFLAGS = 176
SEGS = 184  # SegmentCache {u32 selector; u64 base; u32 limit; u32 flags} x 6: ES CS SS DS FS GS
SEG_SIZE = 24
LDT = SEGS + 6 * SEG_SIZE
TR = LDT + SEG_SIZE
GDT = TR + SEG_SIZE
IDT = GDT + SEG_SIZE
CR = IDT + SEG_SIZE  # target_ulong cr[9]
EFER = 592
DR = 5400  # target_ulong dr[8]; error_code, exception_is_int, exception_next_eip just before
ERROR_CODE = DR - 16
EXCEPTION_IS_INT = DR - 12

R_ES, R_CS, R_SS, R_DS, R_FS, R_GS = range(6)
SEG_INDEX = {"es": R_ES, "cs": R_CS, "ss": R_SS, "ds": R_DS, "fs": R_FS, "gs": R_GS}
# kvm_regs field -> index in CPUX86State.regs
GPR_INDEX = {
    "rax": 0, "rcx": 1, "rdx": 2, "rbx": 3, "rsp": 4, "rbp": 5, "rsi": 6, "rdi": 7,
    **{f"r{i}": i for i in range(8, 16)},
}  # fmt: skip

CC_OP_EFLAGS = 1
CC_MASK = 0x8D5  # OF SF ZF AF PF CF
DF_MASK = 1 << 10
IF_MASK = 1 << 9

# Segment-cache attribute bits (QEMU's DESC_*), the descriptor's high dword.
DESC_TYPE_SHIFT = 8
DESC_S = 1 << 12
DESC_DPL_SHIFT = 13
DESC_P = 1 << 15
DESC_AVL = 1 << 20
DESC_L = 1 << 21
DESC_B = 1 << 22
DESC_G = 1 << 23

HF_CPL = 3
HF_INHIBIT_IRQ = 1 << 3
HF_CS32 = 1 << 4
HF_SS32 = 1 << 5
HF_ADDSEG = 1 << 6
HF_PE = 1 << 7
HF_TF = 1 << 8
HF_MP = 1 << 9
HF_EM = 1 << 10
HF_TS = 1 << 11
HF_IOPL = 3 << 12
HF_LMA = 1 << 14
HF_CS64 = 1 << 15
HF_VM = 1 << 17
HF_OSFXSR = 1 << 22
HF_IOBPT = 1 << 24
_HF_DERIVED = (
    HF_CPL | HF_PE | HF_MP | HF_EM | HF_TS | HF_TF | HF_VM | HF_IOPL | HF_OSFXSR | HF_LMA
    | HF_CS32 | HF_SS32 | HF_CS64 | HF_ADDSEG
)  # fmt: skip

EFER_LMA = 1 << 10
MSR_EFER = 0xC000_0080
MSR_APIC_BASE = 0x1B
APIC_BASE_DEFAULT = 0xFEE0_0000 | 1 << 8 | 1 << 11  # enabled, BSP (KVM's reset value)

#: MSRs unicorn models and a snapshot carries (the rest of a KVM MSR list is dropped).
MSRS = (
    0x174, 0x175, 0x176,  # SYSENTER_CS/ESP/EIP
    0x277,  # PAT
    0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084,  # STAR LSTAR CSTAR FMASK
    0xC000_0100, 0xC000_0101, 0xC000_0102, 0xC000_0103,  # FS/GS base, KERNEL_GS_BASE, TSC_AUX
)  # fmt: skip

_SEG = struct.Struct("<IxxxxQII")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")


class UnicornUnusable(KvmpyError):
    """This unicorn build cannot host kvmpy guests (missing, or an unexpected CPU layout)."""


def uc_mode(bits: int) -> int:
    return {16: UC_MODE_16, 32: UC_MODE_32, 64: UC_MODE_64}[bits]


def seg_flags(s: S.kvm_segment) -> int:
    """kvm_segment -> QEMU segment-cache attributes (QEMU's own kvm.c get_seg())."""
    return (
        s.type << DESC_TYPE_SHIFT
        | (DESC_P if s.present and not s.unusable else 0)
        | s.dpl << DESC_DPL_SHIFT
        | (DESC_B if s.db else 0)
        | (DESC_S if s.s else 0)
        | (DESC_L if s.l else 0)
        | (DESC_G if s.g else 0)
        | (DESC_AVL if s.avl else 0)
    )


def kvm_segment(selector: int, base: int, limit: int, flags: int) -> S.kvm_segment:
    """QEMU segment cache -> kvm_segment (QEMU's kvm.c set_seg())."""
    present = 1 if flags & DESC_P else 0
    return S.kvm_segment(
        base=base, limit=limit, selector=selector & 0xFFFF,
        type=(flags >> DESC_TYPE_SHIFT) & 15, present=present,
        dpl=(flags >> DESC_DPL_SHIFT) & 3, db=(flags >> 22) & 1, s=1 if flags & DESC_S else 0,
        l=(flags >> 21) & 1, g=1 if flags & DESC_G else 0, avl=1 if flags & DESC_AVL else 0,
        unusable=0 if present else 1,
    )  # fmt: skip


def descriptor_cache(e1: int, e2: int) -> tuple[int, int, int]:
    """An 8-byte GDT/LDT descriptor (low and high dwords) -> (base, byte limit, attributes), as
    QEMU's load_segment/get_seg_base/get_seg_limit decode it."""
    base = (e1 >> 16) | ((e2 & 0xFF) << 16) | (e2 & 0xFF00_0000)
    limit = (e1 & 0xFFFF) | (e2 & 0x000F_0000)
    if e2 & DESC_G:
        limit = (limit << 12) | 0xFFF
    return base, limit, e2 & 0x00FF_FF00


@dataclass
class SegCache:
    selector: int
    base: int
    limit: int
    flags: int


class CpuState:
    """One engine's CPUX86State, read and written as a whole through a reused uc_context."""

    def __init__(self, uc: Uc, bits: int):
        check_layout()
        self.uc = uc
        self.bits = bits
        self._h = lib.handle(uc)
        self._ctx = uc.context_save()
        size = self._ctx.size
        base = self._ctx.context.value + _data_offset()
        self.buf = memoryview((C.c_char * (size - _data_offset())).from_address(base)).cast("B")
        self._rflags_id = X.UC_X86_REG_RFLAGS if bits == 64 else X.UC_X86_REG_EFLAGS
        self._rflags = C.c_uint64()
        #: MSRs unicorn does not keep that kvmpy still reports back (the APIC base).
        self.apic_base = APIC_BASE_DEFAULT
        self.cr8 = 0

    # --- raw access --------------------------------------------------------------------------

    def load(self) -> memoryview:
        """Copy the engine's state into `buf` (and return it)."""
        err = lib.context_save(self._h, self._ctx.context)
        if err:
            raise UcError(err)
        return self.buf

    def store(self) -> None:
        """Copy `buf` back into the engine."""
        err = lib.context_restore(self._h, self._ctx.context)
        if err:
            raise UcError(err)

    def u32(self, off: int) -> int:
        return _U32.unpack_from(self.buf, off)[0]

    def u64(self, off: int) -> int:
        return _U64.unpack_from(self.buf, off)[0]

    def put_u32(self, off: int, v: int) -> None:
        _U32.pack_into(self.buf, off, v & 0xFFFF_FFFF)

    def put_u64(self, off: int, v: int) -> None:
        _U64.pack_into(self.buf, off, v & 0xFFFF_FFFF_FFFF_FFFF)

    def seg(self, i: int) -> SegCache:
        return SegCache(*_SEG.unpack_from(self.buf, SEGS + i * SEG_SIZE))

    def set_seg(self, i: int, selector: int, base: int, limit: int, flags: int) -> None:
        _SEG.pack_into(self.buf, SEGS + i * SEG_SIZE, selector & 0xFFFF, base, limit, flags)

    def table(self, off: int) -> SegCache:
        return SegCache(*_SEG.unpack_from(self.buf, off))

    def gpr(self, name: str) -> int:
        return self.u64(REGS + 8 * GPR_INDEX[name])

    def set_gpr(self, name: str, v: int) -> None:
        self.put_u64(REGS + 8 * GPR_INDEX[name], v)

    def cr(self, i: int) -> int:
        return self.u64(CR + 8 * i)

    @property
    def efer(self) -> int:
        return self.u64(EFER)

    @property
    def hflags(self) -> int:
        return self.u32(HFLAGS)

    def read_rflags(self) -> int:
        """RFLAGS through the API, which folds in QEMU's lazy arithmetic flags."""
        lib.reg_read(self._h, self._rflags_id, C.byref(self._rflags))
        return self._rflags.value

    def put_rflags(self, value: int, inside: bool) -> None:
        """Write RFLAGS into `buf`: `inside` a hook in QEMU's running-CPU encoding (arithmetic
        flags in CC_SRC, DF as +-1), else whole as between runs (QEMU splits it on entry)."""
        value |= 2
        if inside:
            self.put_u64(EFLAGS, value & ~(CC_MASK | DF_MASK))
            self.put_u64(CC_SRC, value & CC_MASK)
            self.put_u32(CC_OP, CC_OP_EFLAGS)
            _I32.pack_into(self.buf, DF, -1 if value & DF_MASK else 1)
        else:
            self.put_u64(EFLAGS, value)

    def update_hflags(self, rflags: int, inhibit_irq: bool | None = None) -> None:
        """Recompute the derived hflags from `buf`, as QEMU's x86_update_hflags() does."""
        h = self.hflags & ~_HF_DERIVED
        cs, ss = self.seg(R_CS), self.seg(R_SS)
        cr0, cr4 = self.cr(0), self.cr(4)
        h |= (ss.flags >> DESC_DPL_SHIFT) & HF_CPL
        h |= (cr0 & 1) << 7
        h |= (cr0 << 8) & (HF_MP | HF_EM | HF_TS)
        h |= rflags & (HF_TF | HF_VM | HF_IOPL)
        if cr4 & (1 << 9):
            h |= HF_OSFXSR
        if self.efer & EFER_LMA:
            h |= HF_LMA
        if h & HF_LMA and cs.flags & DESC_L:
            h |= HF_CS32 | HF_SS32 | HF_CS64
        else:
            h |= ((cs.flags >> 22) & 1) << 4
            h |= ((ss.flags >> 22) & 1) << 5
            flat = self.seg(R_DS).base | self.seg(R_ES).base | ss.base == 0
            if not cr0 & 1 or rflags & (1 << 17) or not h & HF_CS32 or not flat:
                h |= HF_ADDSEG
        h |= HF_IOBPT
        if inhibit_irq is not None:
            h = (h | HF_INHIBIT_IRQ) if inhibit_irq else (h & ~HF_INHIBIT_IRQ)
        self.put_u32(HFLAGS, h)

    # --- kvmpy's CPU-state format ------------------------------------------------------------

    def get_regs(self) -> S.kvm_regs:
        self.load()
        regs = S.kvm_regs()
        for name, i in GPR_INDEX.items():
            setattr(regs, name, self.u64(REGS + 8 * i))
        regs.rip = self.u64(EIP)
        regs.rflags = self.read_rflags()
        return regs

    def set_regs(self, regs: S.kvm_regs, inside: bool = False) -> None:
        self.load()
        for name, i in GPR_INDEX.items():
            self.put_u64(REGS + 8 * i, getattr(regs, name))
        self.put_u64(EIP, regs.rip)
        old = self.read_rflags()
        self.put_rflags(regs.rflags, inside)
        if (old ^ regs.rflags) & (HF_TF | HF_VM | HF_IOPL):
            self.update_hflags(regs.rflags)
        self.store()

    def regime(self) -> Regime:
        """What hypercalls need to walk guest pointers: control registers and CS."""
        b = self.load()
        cs = _SEG.unpack_from(b, SEGS + R_CS * SEG_SIZE)
        flags = cs[3]
        return Regime(
            _U64.unpack_from(b, CR)[0], _U64.unpack_from(b, CR + 24)[0],
            _U64.unpack_from(b, CR + 32)[0], _U64.unpack_from(b, EFER)[0], cs[1],
            (flags >> 22) & 1, (flags >> 21) & 1, _U32.unpack_from(b, HFLAGS)[0] & HF_CPL,
        )  # fmt: skip

    def get_sregs(self) -> S.kvm_sregs:
        self.load()
        sregs = S.kvm_sregs()
        for name, i in SEG_INDEX.items():
            c = self.seg(i)
            setattr(sregs, name, kvm_segment(c.selector, c.base, c.limit, c.flags))
        for name, off in (("tr", TR), ("ldt", LDT)):
            c = self.table(off)
            setattr(sregs, name, kvm_segment(c.selector, c.base, c.limit, c.flags))
        for name, off in (("gdt", GDT), ("idt", IDT)):
            c = self.table(off)
            setattr(sregs, name, S.kvm_dtable(base=c.base, limit=c.limit))
        sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4 = (self.cr(i) for i in (0, 2, 3, 4))
        sregs.cr8 = self.cr8
        sregs.efer = self.efer
        sregs.apic_base = self.apic_base
        return sregs

    def set_sregs(self, sregs: S.kvm_sregs) -> None:
        """As KVM_SET_SREGS: control registers through the API (QEMU flushes its TLB and
        updates its flags), the rest straight into the state."""
        api = self.uc.reg_write
        api(X.UC_X86_REG_CR4, sregs.cr4)
        api(X.UC_X86_REG_CR3, sregs.cr3)
        api(X.UC_X86_REG_CR0, sregs.cr0 & 0xFFFF_FFFF)
        api(X.UC_X86_REG_CR2, sregs.cr2)
        for reg, t in ((X.UC_X86_REG_TR, sregs.tr), (X.UC_X86_REG_LDTR, sregs.ldt)):
            api(reg, (t.selector, t.base, t.limit, seg_flags(t)))
        api(X.UC_X86_REG_GDTR, (0, sregs.gdt.base, sregs.gdt.limit, 0))
        api(X.UC_X86_REG_IDTR, (0, sregs.idt.base, sregs.idt.limit, 0))
        self.uc.msr_write(MSR_EFER, sregs.efer)
        rflags = self.read_rflags()
        self.load()
        # EFER whole: LMA is not writable through WRMSR, and KVM's sregs carry it.
        self.put_u64(EFER, sregs.efer)
        self.put_u64(CR, sregs.cr0)
        for name, i in SEG_INDEX.items():
            s = getattr(sregs, name)
            self.set_seg(i, s.selector, s.base, s.limit, seg_flags(s))
        self.update_hflags(rflags)
        self.store()
        self.apic_base = sregs.apic_base or APIC_BASE_DEFAULT
        self.cr8 = sregs.cr8
        self.flush_tlb()

    def flush_tlb(self) -> None:
        from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH

        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    def get_fpu(self) -> S.kvm_fpu:
        r = self.uc.reg_read
        fpu = S.kvm_fpu()
        fpu.fcw = r(X.UC_X86_REG_FPCW)
        fpu.fsw = r(X.UC_X86_REG_FPSW)
        tag = r(X.UC_X86_REG_FPTAG)
        # KVM's ftwx is FXSAVE's abridged tag (bit i: physical register i not empty).
        fpu.ftwx = sum(1 << i for i in range(8) if (tag >> (2 * i)) & 3 != 3)
        top = (fpu.fsw >> 11) & 7
        for i in range(8):  # fpr[] is ST(i) order; unicorn's FPn is physical register n
            mant, exp = r(X.UC_X86_REG_FP0 + ((top + i) & 7))
            fpu.fpr[i][:10] = list(struct.pack("<QH", mant, exp))
        nxmm = 16 if self.bits == 64 else 8
        for i in range(nxmm):
            fpu.xmm[i][:] = list(r(X.UC_X86_REG_XMM0 + i).to_bytes(16, "little"))
        fpu.mxcsr = r(X.UC_X86_REG_MXCSR)
        if self.bits == 64:
            fpu.last_ip = r(X.UC_X86_REG_FIP)
            fpu.last_dp = r(X.UC_X86_REG_FDP)
            fpu.last_opcode = r(X.UC_X86_REG_FOP)
        return fpu

    def set_fpu(self, fpu: S.kvm_fpu) -> None:
        w = self.uc.reg_write
        w(X.UC_X86_REG_FPCW, fpu.fcw)
        w(X.UC_X86_REG_FPSW, fpu.fsw)
        w(X.UC_X86_REG_FPTAG, sum(3 << (2 * i) for i in range(8) if not fpu.ftwx >> i & 1))
        top = (fpu.fsw >> 11) & 7
        for i in range(8):
            mant, exp = struct.unpack_from("<QH", bytes(fpu.fpr[i]))
            w(X.UC_X86_REG_FP0 + ((top + i) & 7), (mant, exp))
        nxmm = 16 if self.bits == 64 else 8
        for i in range(nxmm):
            w(X.UC_X86_REG_XMM0 + i, int.from_bytes(bytes(fpu.xmm[i]), "little"))
        w(X.UC_X86_REG_MXCSR, fpu.mxcsr or 0x1F80)
        if self.bits == 64:
            w(X.UC_X86_REG_FIP, fpu.last_ip)
            w(X.UC_X86_REG_FDP, fpu.last_dp)
            w(X.UC_X86_REG_FOP, fpu.last_opcode)

    def get_xsave(self, fpu: S.kvm_fpu) -> bytes:
        """`fpu` as a 4 KiB XSAVE area (FXSAVE legacy region + header, XSTATE_BV = x87|SSE).

        KVM_SET_FPU writes the legacy region without setting the SSE bit of XSTATE_BV, so on a
        vCPU with XSAVE the next XRSTOR zeroes the XMM registers (KVM's own quirk; QEMU uses
        KVM_SET_XSAVE for this reason). A state that carries this area restores on KVM whole."""
        area = bytearray(4096)
        struct.pack_into(
            "<HHBxHQQII", area, 0, fpu.fcw, fpu.fsw, fpu.ftwx, fpu.last_opcode, fpu.last_ip,
            fpu.last_dp, fpu.mxcsr, 0xFFFF,
        )  # fmt: skip
        for i in range(8):
            area[32 + 16 * i : 32 + 16 * i + 16] = bytes(fpu.fpr[i])
        for i in range(16):
            area[160 + 16 * i : 160 + 16 * i + 16] = bytes(fpu.xmm[i])
        struct.pack_into("<Q", area, 512, 0x3)  # XSTATE_BV: x87 and SSE state are in the area
        return bytes(area)

    def get_msrs(self) -> dict[int, int]:
        out = {MSR_APIC_BASE: self.apic_base}
        for index in MSRS:
            out[index] = self.uc.msr_read(index)
        return out

    def set_msrs(self, msrs: dict[int, int]) -> list[int]:
        """Write the MSRs unicorn models; returns the indices it does not (dropped)."""
        dropped = []
        for index, value in msrs.items():
            if index == MSR_APIC_BASE:
                self.apic_base = value
            elif index == MSR_EFER:
                pass  # part of sregs, which carry LMA too
            elif index in MSRS:
                self.uc.msr_write(index, value)
            else:
                dropped.append(index)
        return dropped

    def get_debugregs(self) -> S.kvm_debugregs:
        self.load()
        d = S.kvm_debugregs()
        for i in range(4):
            d.db[i] = self.u64(DR + 8 * i)
        d.dr6, d.dr7 = self.u64(DR + 48), self.u64(DR + 56)
        return d

    def set_debugregs(self, d: S.kvm_debugregs) -> None:
        w = self.uc.reg_write
        for i in range(4):
            w(X.UC_X86_REG_DR0 + i, d.db[i])
        w(X.UC_X86_REG_DR6, d.dr6)
        w(X.UC_X86_REG_DR7, d.dr7)


# --- checking the layout against the API -------------------------------------------------------


@functools.cache
def _data_offset() -> int:
    """Where CPUX86State starts inside a uc_context (after unicorn's own header)."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    magic = 0x6B76_6D70_795F_7261  # "kvmpy_ra"
    uc.reg_write(X.UC_X86_REG_RAX, magic)
    ctx = uc.context_save()
    raw = C.string_at(ctx.context.value, ctx.size)
    off = raw.find(magic.to_bytes(8, "little"))
    if off < 0 or off % 8:
        raise UnicornUnusable("cannot find the CPU state inside a unicorn context")
    return off


@functools.cache
def check_layout() -> None:
    """Verify every CPUX86State offset this module uses against the register API."""
    try:
        _check_layout()
    except UnicornUnusable:
        raise
    except (UcError, AssertionError) as e:
        raise UnicornUnusable(
            f"this unicorn build keeps its x86 CPU state differently from what kvmpy knows "
            f"(unicorn 2.1.x): {e or 'layout mismatch'}"
        ) from None


def _check_layout() -> None:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    w = uc.reg_write
    values = {X.UC_X86_REG_RAX: 0x1111, X.UC_X86_REG_RBX: 0x3333, X.UC_X86_REG_R15: 0xFFFF}
    for reg, v in values.items():
        w(reg, v)
    w(X.UC_X86_REG_RIP, 0x1234_5678)
    w(X.UC_X86_REG_RFLAGS, 0x2 | DF_MASK | 0x81)
    w(X.UC_X86_REG_CS, 0x4B)  # selector only in UC_MODE_64
    w(X.UC_X86_REG_TR, (0x30, 0xABC000, 0x2067, 0x8B00))
    w(X.UC_X86_REG_LDTR, (0x38, 0xDEF000, 0x17, 0x8200))
    w(X.UC_X86_REG_GDTR, (0, 0x5000, 0x37, 0))
    w(X.UC_X86_REG_IDTR, (0, 0x6000, 0xFFF, 0))
    w(X.UC_X86_REG_CR3, 0x7000)
    w(X.UC_X86_REG_DR7, 0x20401)
    cpu = CpuState.__new__(CpuState)
    cpu.uc, cpu._h = uc, lib.handle(uc)
    cpu._ctx = uc.context_save()
    off = _data_offset()
    cpu.buf = memoryview(C.string_at(cpu._ctx.context.value + off, cpu._ctx.size - off))
    assert cpu.u64(REGS) == 0x1111 and cpu.u64(REGS + 24) == 0x3333, "general registers"
    assert cpu.u64(REGS + 120) == 0xFFFF, "r15"
    assert cpu.u64(EIP) == 0x1234_5678, "eip"
    assert cpu.u64(CC_SRC) == 0x81 and cpu.u32(CC_OP) == CC_OP_EFLAGS, "lazy flags"
    assert _I32.unpack_from(cpu.buf, DF)[0] == -1, "direction flag"
    assert cpu.seg(R_CS).selector == 0x4B, "segment caches"
    assert cpu.table(TR) == SegCache(0x30, 0xABC000, 0x2067, 0x8B00), "task register"
    assert cpu.table(LDT) == SegCache(0x38, 0xDEF000, 0x17, 0x8200), "LDT register"
    assert (cpu.table(GDT).base, cpu.table(GDT).limit) == (0x5000, 0x37), "GDTR"
    assert (cpu.table(IDT).base, cpu.table(IDT).limit) == (0x6000, 0xFFF), "IDTR"
    assert cpu.u64(CR + 24) == 0x7000, "control registers"
    assert cpu.u64(EFER) == uc.msr_read(MSR_EFER) and cpu.u64(EFER) & EFER_LMA, "EFER"
    assert cpu.u64(DR + 56) & 0x20401 == 0x20401, "debug registers"
    assert cpu.u32(HFLAGS) & (HF_LMA | HF_CS64) == HF_LMA | HF_CS64, "hflags"
    _check_error_code(uc)


def _check_error_code(uc: Uc) -> None:
    """Raise a real #GP with a known error code (loading selector 0x28 past the GDT limit)
    and find it where the layout says."""
    uc.mem_map(0x10000, 0x1000)
    uc.mem_write(0x10000, bytes.fromhex("66b828008ed8f4"))  # mov ax, 0x28; mov ds, ax; hlt
    w = uc.reg_write
    w(X.UC_X86_REG_GDTR, (0, 0x10800, 0x17, 0))
    w(X.UC_X86_REG_DR7, 0x400)
    seen: list[tuple[int, int, int]] = []

    def on_intr(uc, intno, _):
        ctx = uc.context_save()
        raw = C.string_at(ctx.context.value + _data_offset(), ctx.size - _data_offset())
        seen.append((intno, *struct.unpack_from("<ii", raw, ERROR_CODE)))
        uc.emu_stop()

    uc.hook_add(UC_HOOK_INTR, on_intr)
    uc.emu_start(0x10000, 0x10007)
    assert seen and seen[0] == (13, 0x28, 0), f"error code (got {seen})"
