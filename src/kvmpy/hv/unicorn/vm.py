"""The unicorn hypervisor and VM: one engine per VM, guest RAM mapped into it without copying,
MMIO pages, and the minimal interrupt controller (MSI to a vector).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError
from ..base import Capability, MsiRoute, Route, require

if TYPE_CHECKING:
    from ...memory import MemoryRegion
    from ..base import VmOps
    from .vcpu import UnicornVcpu

log = logging.getLogger(__name__)

#: What the unicorn backend does: MSIs to a vector through its own small interrupt controller,
#: 32-bit paging (which KVM-PVM refuses), and userfaultfd: a lazy restore registers the host
#: mapping of guest RAM, which the engine uses directly, so its first touch of a page is
#: served like KVM's. What lives in KVM (irqchip, irqfd, ioeventfd, dirty log) is absent.
CAPABILITIES = frozenset({Capability.MSI, Capability.PAGED32, Capability.USERFAULTFD})

MSI_ADDRESS_MASK = 0xFFF0_0000
MSI_ADDRESS_BASE = 0xFEE0_0000


def unavailable() -> str | None:
    """None if this process can run unicorn guests, else why not (one sentence)."""
    try:
        import unicorn  # noqa: F401

        from .env import UnicornUnusable, check_layout
    except ImportError as e:
        return f"the unicorn package is not installed ({e})"
    try:
        check_layout()
    except UnicornUnusable as e:
        return str(e)
    return None


def unicorn_version() -> str:
    import unicorn

    return unicorn.__version__


class UnicornHypervisor:
    """Binary translation with the unicorn engine (QEMU's TCG): no /dev/kvm needed."""

    name = "unicorn"
    capabilities = CAPABILITIES
    #: The CPU model the engines emulate has 1 GiB pages (kvmpy's long-mode maps use them
    #: where KVM's CPUID offers them, so a KVM snapshot's page tables work here too).
    supports_1g_pages = True

    def __init__(self) -> None:
        problem = unavailable()
        if problem is not None:
            raise ConfigError(f"the unicorn backend cannot run here: {problem}")

    def create_vm(self) -> UnicornVm:
        return UnicornVm()

    def close(self) -> None:
        pass


class UnicornVm:
    name = "unicorn"
    capabilities = CAPABILITIES

    def __init__(self) -> None:
        from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
        from unicorn.x86_const import UC_CPU_X86_SKYLAKE_SERVER

        # One engine mode for every kvmpy mode: unicorn's mode only picks the register API's
        # widths; what the CPU executes follows CR0/EFER/CS like a real one. Skylake-Server,
        # filtered to what TCG implements: SSE4.2, XSAVE, 1 GiB pages, no AVX.
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.uc.ctl_set_cpu_model(UC_CPU_X86_SKYLAKE_SERVER)
        self.vcpus: list[UnicornVcpu] = []
        self._regions: list[MemoryRegion] = []
        self._msi_routes: dict[int, MsiRoute] = {}
        self._irr = 0
        self._irr_lock = threading.Lock()
        self._mmio_pages: set[int] = set()
        self._ops: VmOps | None = None
        self._created_ns = time.monotonic_ns()
        self._clock_base = 0

    # --- memory --------------------------------------------------------------------------------

    def map_memory(self, region: MemoryRegion) -> None:
        from unicorn import UC_PROT_ALL, UC_PROT_EXEC, UC_PROT_READ

        perms = (UC_PROT_READ | UC_PROT_EXEC) if region.readonly else UC_PROT_ALL
        # The engine uses the memfd mapping itself: guest writes land in kvmpy's memory (and
        # in a peer VM sharing the memfd) with no copy either way.
        self.uc.mem_map_ptr(region.gpa, region.size, perms, region.hva)
        self._regions.append(region)

    def set_dirty_logging(self, region: MemoryRegion, enabled: bool) -> None:
        require(self, Capability.DIRTY_LOG, "dirty-page logging (live migration)")

    def map_mmio_page(self, page: int) -> None:
        """Route one guest-physical page to the vCPU's MMIO handler (devices, or nothing)."""
        if page in self._mmio_pages:
            return

        def read(uc, offset, size, _ud):
            return self.vcpus[0].mmio(page + offset, size, 0, False)

        def write(uc, offset, size, value, _ud):
            self.vcpus[0].mmio(page + offset, size, value, True)

        self.uc.mmio_map(page, 0x1000, read, None, write, None)
        self._mmio_pages.add(page)

    def sync_mmio(self) -> None:
        """Map the pages of every device on the machine's MMIO bus (devices may be added
        after the vCPU was made)."""
        if self._ops is None:
            return
        for base, end, _device in self._ops.mmio_bus.ranges():
            page = base & ~0xFFF
            while page < end:
                self.map_mmio_page(page)
                page += 0x1000

    # --- vCPUs ---------------------------------------------------------------------------------

    def create_irqchip(self, pit: bool) -> None:
        require(self, Capability.IRQCHIP, "the in-kernel interrupt controller (--irqchip)")

    def create_vcpu(self, index: int, ops: VmOps) -> UnicornVcpu:
        from .vcpu import UnicornVcpu

        if index != 0 or self.vcpus:
            raise ConfigError("the unicorn backend runs one vCPU per VM")
        self._ops = ops
        vcpu = UnicornVcpu(self, index, ops)
        self.vcpus.append(vcpu)
        return vcpu

    # --- interrupts ----------------------------------------------------------------------------

    def set_routes(self, routes: Sequence[Route]) -> None:
        self._msi_routes = {r.gsi: r for r in routes if isinstance(r, MsiRoute)}

    def irq_line(self, gsi: int, level: int) -> None:
        route = self._msi_routes.get(gsi)
        if route is None:
            require(self, Capability.IRQCHIP, f"interrupt line {gsi} (an IOAPIC/PIC pin)")
            return
        if level:
            self.signal_msi(route.address, route.data)

    def signal_msi(self, address: int, data: int) -> None:
        """Fixed delivery, physical destination: the vector becomes pending on vCPU 0."""
        vector = data & 0xFF
        dest = (address >> 12) & 0xFF
        if address & MSI_ADDRESS_MASK != MSI_ADDRESS_BASE or dest != 0 or vector < 16:
            # Not an interrupt message to a CPU this VM has (or an illegal vector): the APIC
            # bus drops it.
            log.debug("unicorn: dropped MSI address %#x data %#x", address, data)
            return
        with self._irr_lock:
            self._irr |= 1 << vector
        for v in self.vcpus:
            v.interrupt()

    def set_pending(self, vector: int) -> None:
        with self._irr_lock:
            self._irr |= 1 << (vector & 0xFF)

    def pending_interrupts(self) -> bool:
        return self._irr != 0

    def take_interrupt(self) -> int | None:
        """The highest pending vector, no longer pending (APIC priority: higher wins)."""
        with self._irr_lock:
            if not self._irr:
                return None
            vector = self._irr.bit_length() - 1
            self._irr &= ~(1 << vector)
            return vector

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        require(self, Capability.IRQFD, "an irqfd (interrupts injected without the VMM)")

    def ioeventfd(self, fd, addr, length, datamatch, pio, deassign=False) -> None:
        require(self, Capability.IOEVENTFD, "an ioeventfd (doorbells without a VM exit)")

    # --- state ---------------------------------------------------------------------------------

    def save_state(self) -> dict[str, Any]:
        with self._irr_lock:
            pending = [v for v in range(256) if self._irr >> v & 1]
        # "clock" as KVM's VM state has it (ns of VM time), so KVM restores this state too.
        clock = self._clock_base + time.monotonic_ns() - self._created_ns
        return {"clock": clock, "pending_vectors": pending}

    def restore_state(self, state: dict[str, Any]) -> None:
        pending = state.get("pending_vectors", [])
        if not isinstance(pending, list) or not all(
            isinstance(v, int) and 0 <= v <= 255 for v in pending
        ):
            raise ConfigError("the saved VM state's pending interrupt list is malformed")
        with self._irr_lock:
            self._irr = sum(1 << v for v in set(pending))
        clock = state.get("clock", 0)
        if isinstance(clock, int) and not isinstance(clock, bool) and 0 <= clock < 1 << 64:
            self._clock_base, self._created_ns = clock, time.monotonic_ns()

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        # Drop the engine's use of guest RAM before GuestMemory unmaps it.
        for region in self._regions:
            try:
                self.uc.mem_unmap(region.gpa, region.size)
            except Exception:
                pass
        self._regions.clear()
