"""Guest faults as data: the stop reports every backend gives for an exception, a triple fault
or an instruction the CPU could not run, with registers and the disassembled instruction.

kvmpy's exception stubs (arch/x86/modes.py) report an unhandled exception with an `out` to
FAULT_PORT; `fault_stub_stop` reads the exception frame the CPU pushed on the stub's stack and
turns it into a Stop that names the faulting context (not the stub). The registers and memory
come from the backend and the machine (`VmOps`), so KVM and any other backend report alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...disasm import disassemble_one
from ...errors import GuestMemoryError
from ...result import Fault, Stop, StopReason, exception_name
from .modes import VECTORS_WITH_ERROR_CODE
from .vmem import Regime, VirtualMemory

if TYPE_CHECKING:
    from ...hv.base import VmOps


def fault_stub_stop(ops: VmOps, regs: Any, sregs: Any, cpu: int) -> Stop | None:
    """The stop for an `out` to FAULT_PORT from one of kvmpy's exception stubs, or None when
    the `out` did not come from a stub (the guest wrote the port itself: ignored)."""
    layout = ops.layout
    if layout is None:
        return None
    regime = Regime.from_sregs(sregs)
    vector = layout.stub_vector(sregs.cs.base + regs.rip if not regime.long_mode else regs.rip)
    if vector is None or regime.cpl != 0:
        return None
    vm = VirtualMemory(ops.memory, regime)
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
            ops, StopReason.EXCEPTION, f"{exception_name(vector)} (exception frame unreadable)",
            regs, sregs, cpu,
        )  # fmt: skip
    words = [int.from_bytes(raw[i * slot : (i + 1) * slot], "little") for i in range(6)]
    error = words.pop(0) if has_error else None
    rip, cs = words[0], words[1] & 0xFFFF
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
        ops, StopReason.EXCEPTION, msg, regs, sregs, cpu,
        vector=vector, error_code=error, cr2=cr2, code_base=code_base, cs=cs,
    )  # fmt: skip


def stop_with_fault(
    ops: VmOps,
    reason: StopReason,
    message: str,
    regs: Any,
    sregs: Any,
    cpu: int,
    *,
    insn_bytes: bytes | None = None,
    vector: int | None = None,
    error_code: int | None = None,
    cr2: int | None = None,
    code_base: int | None = None,
    cs: int | None = None,
) -> Stop:
    """A Stop carrying the faulting instruction (read from guest memory when the backend did
    not hand over its bytes) and the registers."""
    regime = Regime.from_sregs(sregs)
    bits = regime.code_bits
    if code_base is None:
        code_base = 0 if bits == 64 else sregs.cs.base
    linear = code_base + regs.rip
    if insn_bytes is None:
        insn_bytes = VirtualMemory(ops.memory, regime).read_partial(linear, 15)
    decoded = disassemble_one(insn_bytes, regs.rip, bits) if insn_bytes else None
    text = decoded[0] if decoded else None
    if decoded:
        insn_bytes = insn_bytes[: decoded[1]]
    fault = Fault(regs.rip, text, insn_bytes, vector, error_code, cr2, cs)
    if text:
        message = f"{message}; faulting instruction: {text}"
    return Stop(reason, 0, message, fault, regs, cpu=cpu)


PAGED32_REFUSED = (
    "this host's KVM cannot run 32-bit paged guests (the vCPU shut down before its first "
    "instruction; KVM-PVM drops CR0.PG outside long mode): use --mode protected or long, or a "
    "VT-x/AMD-V host"
)
