"""The KVM backend: `Hypervisor`, `VmBackend` and `VcpuBackend` on /dev/kvm.

The ioctls themselves live in `kvmpy.kvm` (one thin class per file descriptor, named after the
kernel API); this package is the policy on top: which capabilities the host offers, memslots
for guest RAM, GSI routing, the vCPU run loop (vcpu.py) and the vCPU/VM state a snapshot holds
(state.py).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ...arch.x86.cpuid import vcpu_cpuid
from ...errors import ConfigError
from ...kvm import Cap, Kvm, VmFd
from ...kvm import constants as K
from ...kvm import structs as S
from ..base import Capability, MsiRoute, PinRoute, Route
from .vcpu import KvmVcpu

if TYPE_CHECKING:
    from ...memory import MemoryRegion
    from ..base import VmOps

# Where KVM puts the real-mode TSS and identity map on Intel hosts without unrestricted guest;
# QEMU's addresses, inside the MMIO hole so they never collide with RAM.
KVM_TSS_ADDR = 0xFFFB_D000
KVM_IDENTITY_MAP_ADDR = 0xFFFB_C000

#: What kvmpy cannot run without.
REQUIRED_CAPS = (Cap.SYNC_REGS, Cap.IMMEDIATE_EXIT, Cap.USER_MEMORY)


class KvmHypervisor:
    name = "kvm"

    def __init__(self, kvm: Kvm | None = None):
        self._own = kvm is None
        self.kvm = kvm or Kvm()
        check = self.kvm.check_extension
        for cap in REQUIRED_CAPS:
            if not check(cap):
                raise ConfigError(f"this host's KVM lacks {cap.name}, which kvmpy needs")
        caps = {Capability.DIRTY_LOG, Capability.USERFAULTFD, Capability.PAGED32}
        for cap, kcaps in (
            (Capability.IRQCHIP, (Cap.IRQCHIP,)),
            (Capability.PIT, (Cap.PIT2,)),
            (Capability.IRQFD, (Cap.IRQFD,)),
            (Capability.IOEVENTFD, (Cap.IOEVENTFD,)),
            (Capability.MSI, (Cap.SIGNAL_MSI, Cap.IRQ_ROUTING)),
            (Capability.COALESCED_IO, (Cap.COALESCED_MMIO, Cap.COALESCED_PIO)),
        ):
            if all(check(c) for c in kcaps):
                caps.add(cap)
        self.capabilities = frozenset(caps)
        self._cpuid: list[S.kvm_cpuid_entry2] | None = None
        self._msrs: list[int] | None = None
        self._lock = threading.Lock()

    def supported_cpuid(self) -> list[S.kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID, cached: it costs ~0.5-0.9 ms per call here."""
        with self._lock:
            if self._cpuid is None:
                self._cpuid = self.kvm.supported_cpuid()
            return self._cpuid

    def msr_index_list(self) -> list[int]:
        with self._lock:
            if self._msrs is None:
                self._msrs = self.kvm.msr_index_list()
            return list(self._msrs)

    def create_vm(self) -> KvmVm:
        return KvmVm(self, self.kvm.create_vm())

    def close(self) -> None:
        if self._own:
            self.kvm.close()


class KvmVm:
    """A KVM VM: memslots, the in-kernel irqchip, routing, irqfds/ioeventfds, VM state."""

    name = "kvm"

    def __init__(self, hv: KvmHypervisor, fd: VmFd):
        self.hv = hv
        self.kvm = hv.kvm
        self.fd = fd
        self.capabilities = hv.capabilities
        self.irqchip = False
        self.pit = False
        self._next_slot = 0
        self.vcpus: list[KvmVcpu] = []
        fd.set_tss_addr(KVM_TSS_ADDR)
        fd.set_identity_map_addr(KVM_IDENTITY_MAP_ADDR)

    # --- memory --------------------------------------------------------------------------

    def map_memory(self, region: MemoryRegion) -> None:
        region.slot = self._next_slot
        self._next_slot += 1
        region.flags = K.KVM_MEM_READONLY if region.readonly else 0
        self.fd.set_user_memory_region(region.slot, region.gpa, region.size, region.hva,
                                       region.flags)  # fmt: skip

    def set_dirty_logging(self, region: MemoryRegion, enabled: bool) -> None:
        if region.slot is None:
            raise ConfigError(f"memory region {region.name!r} is not mapped into the VM")
        if enabled:
            region.flags |= K.KVM_MEM_LOG_DIRTY_PAGES
        else:
            region.flags &= ~K.KVM_MEM_LOG_DIRTY_PAGES
        self.fd.set_user_memory_region(region.slot, region.gpa, region.size, region.hva,
                                       region.flags)  # fmt: skip

    def get_dirty_log(self, region: MemoryRegion, bitmap) -> None:
        """Fill `bitmap` (a bit per page of the region) and reset the region's dirty state."""
        self.fd.get_dirty_log(region.slot, bitmap)

    # --- vCPUs and chips -----------------------------------------------------------------

    def create_irqchip(self, pit: bool) -> None:
        self.fd.create_irqchip()
        self.irqchip = True
        if pit:
            self.fd.create_pit2()
            self.pit = True

    def create_vcpu(self, index: int, ops: VmOps) -> KvmVcpu:
        fd = self.fd.create_vcpu(index)
        fd.set_cpuid2(vcpu_cpuid(self.hv.supported_cpuid(), index))
        vcpu = KvmVcpu(ops, fd, index)
        vcpu.vm = self
        self.vcpus.append(vcpu)
        return vcpu

    def filter_msr_writes(self, msrs: Sequence[int]) -> bool:
        """Send guest writes to `msrs` to userspace (KVM_EXIT_X86_WRMSR, which each vCPU hands
        its `on_msr_write` hook); every other MSR access stays in the kernel. Returns False
        when this host's KVM has no MSR filter (then nothing changes)."""
        check = self.kvm.check_extension
        if not (check(Cap.X86_USER_SPACE_MSR) and check(Cap.X86_MSR_FILTER)):
            return False
        self.fd.enable_cap(Cap.X86_USER_SPACE_MSR, K.KVM_MSR_EXIT_REASON_FILTER)
        # One range per MSR, its one bit clear: "deny" here means "exit to userspace".
        self.fd.set_msr_filter([(K.KVM_MSR_FILTER_WRITE, m, 1, b"\x00") for m in msrs])
        return True

    # --- interrupts ----------------------------------------------------------------------

    def set_routes(self, routes: Sequence[Route]) -> None:
        entries = []
        for r in routes:
            if isinstance(r, PinRoute):
                e = S.kvm_irq_routing_entry(gsi=r.gsi, type=K.KVM_IRQ_ROUTING_IRQCHIP)
                e.u.irqchip.irqchip = r.chip
                e.u.irqchip.pin = r.pin
            elif isinstance(r, MsiRoute):
                e = S.kvm_irq_routing_entry(gsi=r.gsi, type=K.KVM_IRQ_ROUTING_MSI)
                e.u.msi.address_lo = r.address & 0xFFFF_FFFF
                e.u.msi.address_hi = r.address >> 32
                e.u.msi.data = r.data
            else:  # pragma: no cover - Route is a closed union
                raise TypeError(r)
            entries.append(e)
        self.fd.set_gsi_routing(entries)

    def irq_line(self, gsi: int, level: int) -> None:
        self.fd.irq_line(gsi, level)

    def signal_msi(self, address: int, data: int) -> int:
        """Inject an MSI; returns how many LAPICs accepted it (0: blocked or disabled)."""
        return self.fd.signal_msi(address, data)

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        self.fd.irqfd(fd, gsi, deassign=deassign)

    def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None, pio: bool,
                  deassign: bool = False) -> None:  # fmt: skip
        self.fd.ioeventfd(fd, addr, length, datamatch=datamatch, pio=pio, deassign=deassign)

    def register_coalesced(self, addr: int, size: int, pio: bool) -> None:
        self.fd.register_coalesced_mmio(addr, size, pio=pio)

    # --- state ---------------------------------------------------------------------------

    def save_state(self) -> dict[str, Any]:
        from . import state

        return state.capture_vm(self)

    def restore_state(self, d: dict[str, Any]) -> None:
        from . import state

        state.apply_vm(self, d)
        state.apply_clock(self, d)

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        self.fd.close()


__all__ = ["KvmHypervisor", "KvmVcpu", "KvmVm"]
