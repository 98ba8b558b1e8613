"""The backend seam: what the VMM asks of a CPU backend, and what a backend asks of the VMM.

Modelled on cloud-hypervisor's `hypervisor` crate: a `Hypervisor` makes `VmBackend`s, a VM makes
`VcpuBackend`s, and the VMM hands each vCPU a `VmOps` (the machine) that the backend calls back
for what it cannot do itself: port I/O and MMIO on the machine's buses, hypercalls, console
output, fault reports. The backend owns its whole run loop, so the seam costs one call per
`run()`, not one per exit; exits the backend handles in the kernel (KVM's in-kernel irqchip,
ioeventfd, irqfd) never reach Python at all.

Backends declare `Capability`s; a feature that needs one it lacks is refused with one sentence
(`require`), never half-run.

The CPU state a backend saves and restores is one format for every backend (see
`hv/kvm/state.py`): the x86 architectural registers laid out as <linux/kvm.h>'s kvm_regs,
kvm_sregs and kvm_fpu (a stable ABI and a complete description of the CPU), plus an MSR list;
backend-specific parts (KVM's LAPIC page, XSAVE area) ride along under their own keys and a
backend that cannot use them says what it drops.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..arch.x86.modes import Mode, SystemLayout
    from ..bus import MmioBus, PortBus
    from ..devices import Effect
    from ..hypercalls import Hypercalls
    from ..memory import GuestMemory, MemoryRegion
    from ..result import Stop, StopReason
    from ..stats import ExitStats


class Capability(enum.StrEnum):
    IRQCHIP = "irqchip"  # in-kernel LAPIC, IOAPIC and PIC (hlt sleeps in the backend)
    PIT = "pit"  # in-kernel i8254
    IRQFD = "irqfd"  # an eventfd write injects an interrupt without the VMM
    IOEVENTFD = "ioeventfd"  # a guest write to an address signals an eventfd without an exit
    MSI = "msi"  # MSI routes and direct MSI injection
    DIRTY_LOG = "dirty_log"  # which guest pages changed (live migration)
    USERFAULTFD = "userfaultfd"  # guest memory served on first touch (lazy restore)
    COALESCED_IO = "coalesced_io"  # batched writes to a port or MMIO range
    PAGED32 = "paged32"  # 32-bit paging without long mode


@dataclass(frozen=True)
class PinRoute:
    """GSI -> a pin of the in-kernel interrupt controllers (chip 0/1: PIC, 2: IOAPIC)."""

    gsi: int
    chip: int
    pin: int


@dataclass(frozen=True)
class MsiRoute:
    """GSI -> a message-signalled interrupt (x86: address 0xFEE0_0000 | dest << 12, data =
    vector)."""

    gsi: int
    address: int
    data: int


Route = PinRoute | MsiRoute


class VmOps(Protocol):
    """The machine as a backend sees it (implemented by `kvmpy.machine.Machine`)."""

    memory: GuestMemory
    pio_bus: PortBus
    mmio_bus: MmioBus
    hypercalls: Hypercalls
    mode: Mode
    layout: SystemLayout | None
    entry_ip: int

    def console_write(self, data: bytes) -> None: ...

    def apply_effect(self, effect: Effect, vcpu: int) -> None: ...


class VcpuBackend(Protocol):
    index: int
    stats: ExitStats
    #: Log every exit (kvmpy run --trace-exits).
    trace: bool
    #: Return None after every handled port-I/O exit (the on-io scheduler).
    yield_on_io: bool
    #: Time every exit instead of sampling the hypercall fast path.
    exact_timing: bool
    #: The last stop, if any.
    stopped: Stop | None

    def run(self) -> Stop | None:
        """Run in the calling thread until this vCPU stops the VM (a Stop) or a pause is
        requested (None). Calling it again continues the guest."""

    def request_pause(self, kick: bool = False) -> None:
        """Make `run()` return None soon; async-signal-safe. `kick`: interrupt a guest that
        never exits (from another thread)."""

    def request_stop(self, reason: StopReason, message: str = "", kick: bool = False) -> None: ...

    def cancel_pause(self) -> bool: ...

    def set_run_signals(self, signals: Collection[int] | None) -> None:
        """Let `signals` (blocked by the calling thread) interrupt the guest: run() returns None
        when one arrives, also one that arrived before it entered the guest."""

    def kick(self) -> None: ...

    def complete_pending_io(self) -> None:
        """Finish the instruction of the last I/O exit so the registers are the guest's."""

    def get_regs(self) -> Any: ...

    def set_regs(self, regs: Any) -> None: ...

    def get_sregs(self) -> Any: ...

    def set_sregs(self, sregs: Any) -> None: ...

    def set_fpu(self, fpu: Any) -> None: ...

    def set_msrs(self, msrs: dict[int, int]) -> int: ...

    def save_state(self) -> dict[str, Any]: ...

    def restore_state(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class VmBackend(Protocol):
    name: str
    capabilities: frozenset[Capability]

    def map_memory(self, region: MemoryRegion) -> None: ...

    def set_dirty_logging(self, region: MemoryRegion, enabled: bool) -> None: ...

    def create_irqchip(self, pit: bool) -> None: ...

    def create_vcpu(self, index: int, ops: VmOps) -> VcpuBackend: ...

    # Interrupts: the machine's InterruptManager is the only caller.
    def set_routes(self, routes: Sequence[Route]) -> None: ...

    def irq_line(self, gsi: int, level: int) -> None: ...

    def signal_msi(self, address: int, data: int) -> None: ...

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None: ...

    def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None, pio: bool,
                  deassign: bool = False) -> None: ...  # fmt: skip

    def save_state(self) -> dict[str, Any]: ...

    def restore_state(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class Hypervisor(Protocol):
    name: str
    capabilities: frozenset[Capability]

    def create_vm(self) -> VmBackend: ...

    def close(self) -> None: ...


def require(backend: Hypervisor | VmBackend, cap: Capability, feature: str) -> None:
    """Refuse `feature` in one sentence when `backend` lacks `cap`."""
    if cap not in backend.capabilities:
        raise ConfigError(
            f"{feature} needs {cap.value} support, which the {backend.name} backend does not have"
        )
