"""Fault reports every backend makes the same way: a Stop with the registers, the vector and
error code, and the disassembled faulting instruction.

kvmpy's exception stubs (arch/x86/modes.py) report an exception the guest did not handle
with an `out` to FAULT_PORT from ring 0; `fault_stub_stop` reads the exception frame the CPU
pushed and turns it into a stop reason, on any backend that delivered the exception through the
guest's IDT. The logic is the KVM run loop's (vcpu.py), taking registers as arguments.
"""

from __future__ import annotations

from ..arch.x86.modes import VECTORS_WITH_ERROR_CODE, SystemLayout
from ..arch.x86.vmem import Regime, VirtualMemory
from ..disasm import disassemble_one
from ..errors import GuestMemoryError
from ..kvm import structs as S
from ..memory import GuestMemory
from ..result import Fault, Stop, StopReason, exception_name


def fault_stub_stop(
    memory: GuestMemory, layout: SystemLayout | None, regs: S.kvm_regs, sregs: S.kvm_sregs
) -> Stop | None:
    """The Stop for an `out` to FAULT_PORT that ends at `regs.rip`, if one of kvmpy's stubs
    made it at CPL0 (a guest writing the port itself gets None: the write is ignored)."""
    if layout is None:
        return None
    regime = Regime.from_sregs(sregs)
    vector = layout.stub_vector(sregs.cs.base + regs.rip if not regime.long_mode else regs.rip)
    if vector is None or regime.cpl != 0:
        return None
    vm = VirtualMemory(memory, regime)
    bits = regime.code_bits
    slot = bits // 8
    has_error = vector in VECTORS_WITH_ERROR_CODE and bits != 16
    try:
        sp = (
            regs.rsp
            if bits == 64
            else sregs.ss.base + (regs.rsp & (0xFFFF if bits == 16 else 0xFFFFFFFF))
        )
        raw = vm.read(sp, slot * 6)
    except GuestMemoryError:
        return stop_with_fault(
            memory, StopReason.EXCEPTION, f"{exception_name(vector)} (exception frame unreadable)",
            regs, sregs,
        )  # fmt: skip
    words = [int.from_bytes(raw[i * slot : (i + 1) * slot], "little") for i in range(6)]
    error = words.pop(0) if has_error else None
    rip, cs = words[0], words[1] & 0xFFFF
    regs = S.kvm_regs.from_buffer_copy(regs)
    regs.rip = rip
    regs.rflags = words[2]
    if bits == 64 or (cs & 3):
        regs.rsp = words[3]
    else:
        regs.rsp = (regs.rsp + slot * (3 + (1 if has_error else 0))) & 0xFFFFFFFF
    cr2 = sregs.cr2 if vector == 14 else None
    where = f" at {rip:#x}"
    if cr2 is not None:
        where += f" (address {cr2:#x})"
    ring = f" in ring {cs & 3}" if bits != 16 else ""
    msg = f"{exception_name(vector)}{ring}{where}"
    if error is not None:
        msg += f", error code {error:#x}"
    code_base = (cs << 4) if bits == 16 else 0 if bits == 64 else sregs.cs.base
    return stop_with_fault(
        memory, StopReason.EXCEPTION, msg, regs, sregs, vector=vector, error_code=error,
        cr2=cr2, code_base=code_base, cs=cs,
    )  # fmt: skip


def stop_with_fault(
    memory: GuestMemory,
    reason: StopReason,
    message: str,
    regs: S.kvm_regs,
    sregs: S.kvm_sregs,
    *,
    insn_bytes: bytes | None = None,
    vector: int | None = None,
    error_code: int | None = None,
    cr2: int | None = None,
    code_base: int | None = None,
    cs: int | None = None,
) -> Stop:
    """A Stop whose message ends with the disassembled instruction at `regs.rip`."""
    regime = Regime.from_sregs(sregs)
    bits = regime.code_bits
    if code_base is None:
        code_base = 0 if bits == 64 else sregs.cs.base
    linear = code_base + regs.rip
    if insn_bytes is None:
        insn_bytes = VirtualMemory(memory, regime).read_partial(linear, 15)
    decoded = disassemble_one(insn_bytes, regs.rip, bits) if insn_bytes else None
    text = decoded[0] if decoded else None
    if decoded:
        insn_bytes = insn_bytes[: decoded[1]]
    fault = Fault(regs.rip, text, insn_bytes, vector, error_code, cr2, cs)
    if text:
        message = f"{message}; faulting instruction: {text}"
    return Stop(reason, 0, message, fault, regs)
