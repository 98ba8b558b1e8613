"""The guest ABI: hypercalls through `out dx, eax` to port 0x500 (see docs/abi.md).

Arguments arrive in rdi, rsi, rcx, rbx (edi, esi, ecx, ebx outside 64-bit mode), the number in
eax, the result goes back in rax. Errors are negative errno values. Every guest pointer is
translated through the guest's own page tables and bounds-checked against RAM; a bad pointer
gets -EFAULT and the VM goes on.

Handlers have the signature `handler(ctx, a0, a1, a2, a3) -> int`, where `ctx` is the vCPU's
`HypercallContext`. Extra hypercalls are registered with `Hypercalls.register`.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .arch.x86.vmem import Regime, VirtualMemory
from .errors import ConfigError, GuestMemoryError

if TYPE_CHECKING:
    from .hv.base import VcpuBackend, VmOps

PORT = 0x500

HC_EXIT = 0
HC_PUTC = 1
HC_PRINT32 = 2
HC_NUM_EXITS = 3
HC_PRINT_STR = 4
HC_NUM_EXITS_BY_TYPE = 5
HC_GVA_TO_HVA = 6

MAX_STRING = 4096
EFAULT = -errno.EFAULT
EINVAL = -errno.EINVAL
ENOSYS = -errno.ENOSYS

Handler = Callable[..., int]


class GuestExit(Exception):
    """Raised by the exit hypercall; the run loop turns it into a stop."""

    def __init__(self, code: int):
        self.code = code


class HypercallContext:
    """What a handler can reach: the vCPU (a backend vCPU: `get_regs`, `get_sregs`, ...), its
    machine, the machine's memory, and the vCPU's exit count.

    One per vCPU, reused for every call (the hot path allocates nothing). Handlers of an SMP
    machine run in the calling vCPU's thread, concurrently with other vCPUs' handlers.
    """

    __slots__ = ("vcpu", "machine", "memory", "exits", "cpu")

    def __init__(self, vcpu: VcpuBackend, machine: VmOps):
        self.vcpu = vcpu
        self.machine = machine
        self.memory = machine.memory
        #: Index of the vCPU making the call.
        self.cpu = vcpu.index
        #: Exits this vCPU has taken, including the one for the current hypercall.
        self.exits = 0

    def output(self, data: bytes) -> None:
        self.machine.console_write(data)

    @property
    def regime(self) -> Regime:
        return Regime.from_sregs(self.vcpu.get_sregs())

    def vmem(self) -> VirtualMemory:
        """Guest-virtual memory as the vCPU sees it now (reads the control registers once)."""
        return VirtualMemory(self.memory, self.regime)


@dataclass
class _Entry:
    name: str
    handler: Handler


class Hypercalls:
    """The hypercall table of a machine: number -> handler."""

    def __init__(self) -> None:
        self.entries: dict[int, _Entry] = {}
        #: number -> handler, the dict the run loop indexes.
        self.table: dict[int, Handler] = {}
        for nr, name, fn in (
            (HC_EXIT, "exit", hc_exit),
            (HC_PUTC, "putc", hc_putc),
            (HC_PRINT32, "print32", hc_print32),
            (HC_NUM_EXITS, "num_exits", hc_num_exits),
            (HC_PRINT_STR, "print_str", hc_print_str),
            (HC_NUM_EXITS_BY_TYPE, "num_exits_by_type", hc_num_exits_by_type),
            (HC_GVA_TO_HVA, "gva_to_hva", hc_gva_to_hva),
        ):
            self.register(nr, fn, name)

    def register(
        self, nr: int, handler: Handler, name: str | None = None, *, replace=False
    ) -> None:
        """Add hypercall `nr`. A number in use (kvmpy's own are 0-12, and it keeps 0-63 for
        itself: use 64 and up) can only be replaced with `replace=True`."""
        if not 0 <= nr <= 0xFFFFFFFF:
            raise ConfigError(f"hypercall number {nr} is outside 0..2^32-1")
        if nr in self.entries and not replace:
            raise ConfigError(
                f"hypercall {nr} is already {self.entries[nr].name!r}; pass replace=True"
            )
        self.entries[nr] = _Entry(name or getattr(handler, "__name__", f"hc{nr}"), handler)
        self.table[nr] = handler

    def name(self, nr: int) -> str:
        e = self.entries.get(nr)
        return e.name if e else f"unknown({nr})"


# --- the built-in hypercalls -------------------------------------------------------------------


def hc_exit(ctx: HypercallContext, code: int, a1: int, a2: int, a3: int) -> int:
    raise GuestExit(code & 0xFF)


def hc_putc(ctx: HypercallContext, byte: int, a1: int, a2: int, a3: int) -> int:
    ctx.output(bytes((byte & 0xFF,)))
    return 0


def hc_print32(ctx: HypercallContext, value: int, a1: int, a2: int, a3: int) -> int:
    ctx.output(b"%d\n" % (value & 0xFFFFFFFF))
    return 0


def hc_num_exits(ctx: HypercallContext, a0: int, a1: int, a2: int, a3: int) -> int:
    return ctx.exits - 1


def hc_print_str(ctx: HypercallContext, gva: int, a1: int, a2: int, a3: int) -> int:
    try:
        text = ctx.vmem().read_cstring(gva, MAX_STRING)
    except GuestMemoryError:
        return EFAULT
    if text is None:
        return EINVAL
    ctx.output(text)
    return 0


def hc_num_exits_by_type(ctx: HypercallContext, gva: int, length: int, a2: int, a3: int) -> int:
    st = ctx.vcpu.stats
    # Counts before this hypercall: its own exit is an `out` already counted.
    text = b"IO in: %d\nIO out: %d\n" % (st.io_in, st.io_out - 1)
    vm = ctx.vmem()
    if not vm.regime.long_mode:
        length &= 0xFFFFFFFF
    if length < len(text) + 1:
        return EINVAL
    try:
        vm.write(gva, text + b"\0")
    except GuestMemoryError:
        return EFAULT
    return len(text)


def hc_gva_to_hva(ctx: HypercallContext, gva: int, a1: int, a2: int, a3: int) -> int:
    vm = ctx.vmem()
    try:
        gpa = vm.translate(gva)
        return ctx.memory.gpa_to_hva(gpa)
    except GuestMemoryError:
        return EFAULT
