"""`VmFd`: a VM file descriptor (KVM_CREATE_VM)."""

from __future__ import annotations

import ctypes as C
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from . import constants as K
from . import structs as S
from ._sys import ioctl
from .vcpu import VcpuFd

if TYPE_CHECKING:
    from .system import Kvm


class VmFd:
    """A KVM virtual machine. Methods are named after the VM ioctls."""

    def __init__(self, fd: int, kvm: Kvm):
        self.fd = fd
        self.kvm = kvm

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, K.KVM_CHECK_EXTENSION, int(cap), "KVM_CHECK_EXTENSION(vm)")

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        ec = S.kvm_enable_cap(cap=int(cap), flags=flags)
        for i, a in enumerate(args):
            ec.args[i] = a
        ioctl(self.fd, K.KVM_ENABLE_CAP, ec, f"KVM_ENABLE_CAP({K.Cap(cap).name})")

    def set_msr_filter(
        self, ranges: list[tuple[int, int, int, bytes]], default_allow: bool = True
    ) -> None:
        """KVM_X86_SET_MSR_FILTER: each range is (flags, base, nmsrs, bitmap), a set bit
        allowing the access; a refused access exits to userspace if KVM_CAP_X86_USER_SPACE_MSR
        was enabled with KVM_MSR_EXIT_REASON_FILTER (else the guest gets #GP)."""
        if len(ranges) > 16:
            raise ValueError("KVM takes at most 16 MSR filter ranges")
        flt = S.kvm_msr_filter(flags=0 if default_allow else 1)
        keep = []
        for i, (flags, base, nmsrs, bitmap) in enumerate(ranges):
            buf = C.create_string_buffer(bytes(bitmap), max(len(bitmap), (nmsrs + 7) // 8))
            keep.append(buf)
            flt.ranges[i] = S.kvm_msr_filter_range(
                flags=flags, nmsrs=nmsrs, base=base, bitmap=C.addressof(buf)
            )
        ioctl(self.fd, K.KVM_X86_SET_MSR_FILTER, flt, "KVM_X86_SET_MSR_FILTER")
        del keep  # KVM copied the bitmaps

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        fd = ioctl(self.fd, K.KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU")
        return VcpuFd(fd, vcpu_id, self.kvm.vcpu_mmap_size())

    # --- memory ------------------------------------------------------------------------------

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        region = S.kvm_userspace_memory_region(
            slot=slot,
            flags=flags,
            guest_phys_addr=guest_phys_addr,
            memory_size=memory_size,
            userspace_addr=userspace_addr,
        )
        ioctl(self.fd, K.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, K.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        ioctl(self.fd, K.KVM_SET_IDENTITY_MAP_ADDR, C.c_uint64(addr), "KVM_SET_IDENTITY_MAP_ADDR")

    def get_dirty_log(self, slot: int, bitmap: C.Array) -> None:
        """Fills `bitmap` (one bit per page of the slot) and resets the slot's dirty state."""
        log = S.kvm_dirty_log(slot=slot, dirty_bitmap=C.addressof(bitmap))
        ioctl(self.fd, K.KVM_GET_DIRTY_LOG, log, "KVM_GET_DIRTY_LOG")

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: C.Array) -> None:
        log = S.kvm_clear_dirty_log(
            slot=slot, num_pages=num_pages, first_page=first_page, dirty_bitmap=C.addressof(bitmap)
        )
        ioctl(self.fd, K.KVM_CLEAR_DIRTY_LOG, log, "KVM_CLEAR_DIRTY_LOG")

    def reset_dirty_rings(self) -> int:
        return ioctl(self.fd, K.KVM_RESET_DIRTY_RINGS, 0, "KVM_RESET_DIRTY_RINGS")

    def register_coalesced_mmio(self, addr: int, size: int, pio: bool = False) -> None:
        zone = S.kvm_coalesced_mmio_zone(addr=addr, size=size, pio=int(pio))
        ioctl(self.fd, K.KVM_REGISTER_COALESCED_MMIO, zone, "KVM_REGISTER_COALESCED_MMIO")

    def unregister_coalesced_mmio(self, addr: int, size: int, pio: bool = False) -> None:
        zone = S.kvm_coalesced_mmio_zone(addr=addr, size=size, pio=int(pio))
        ioctl(self.fd, K.KVM_UNREGISTER_COALESCED_MMIO, zone, "KVM_UNREGISTER_COALESCED_MMIO")

    # --- interrupts ----------------------------------------------------------------------------

    def create_irqchip(self) -> None:
        ioctl(self.fd, K.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self, flags: int = K.KVM_PIT_SPEAKER_DUMMY) -> None:
        ioctl(self.fd, K.KVM_CREATE_PIT2, S.kvm_pit_config(flags=flags), "KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: int) -> None:
        ioctl(self.fd, K.KVM_IRQ_LINE, S.kvm_irq_level(irq=irq, level=level), "KVM_IRQ_LINE")

    def get_irqchip(self, chip_id: int) -> S.kvm_irqchip:
        chip = S.kvm_irqchip(chip_id=chip_id)
        ioctl(self.fd, K.KVM_GET_IRQCHIP, chip, "KVM_GET_IRQCHIP")
        return chip

    def set_irqchip(self, chip: S.kvm_irqchip) -> None:
        ioctl(self.fd, K.KVM_SET_IRQCHIP, chip, "KVM_SET_IRQCHIP")

    def get_pit2(self) -> S.kvm_pit_state2:
        pit = S.kvm_pit_state2()
        ioctl(self.fd, K.KVM_GET_PIT2, pit, "KVM_GET_PIT2")
        return pit

    def set_pit2(self, pit: S.kvm_pit_state2) -> None:
        ioctl(self.fd, K.KVM_SET_PIT2, pit, "KVM_SET_PIT2")

    def set_gsi_routing(self, entries: Iterable[S.kvm_irq_routing_entry]) -> None:
        entries = list(entries)
        buf = S.routing_buffer(len(entries))
        for i, e in enumerate(entries):
            buf.entries[i] = e
        ioctl(self.fd, K.KVM_SET_GSI_ROUTING, buf, "KVM_SET_GSI_ROUTING")

    def irqfd(
        self, fd: int, gsi: int, deassign: bool = False, resamplefd: int | None = None
    ) -> None:
        flags = K.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        if resamplefd is not None:
            flags |= K.KVM_IRQFD_FLAG_RESAMPLE
        req = S.kvm_irqfd(fd=fd, gsi=gsi, flags=flags, resamplefd=resamplefd or 0)
        ioctl(self.fd, K.KVM_IRQFD, req, "KVM_IRQFD")

    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        datamatch: int | None = None,
        pio: bool = True,
        deassign: bool = False,
    ) -> None:
        flags = (K.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (
            K.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0
        )
        if datamatch is not None:
            flags |= K.KVM_IOEVENTFD_FLAG_DATAMATCH
        req = S.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags)
        ioctl(self.fd, K.KVM_IOEVENTFD, req, "KVM_IOEVENTFD")

    def signal_msi(self, address: int, data: int) -> int:
        msi = S.kvm_msi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data)
        return ioctl(self.fd, K.KVM_SIGNAL_MSI, msi, "KVM_SIGNAL_MSI")

    # --- clock ---------------------------------------------------------------------------------

    def get_clock(self) -> S.kvm_clock_data:
        clock = S.kvm_clock_data()
        ioctl(self.fd, K.KVM_GET_CLOCK, clock, "KVM_GET_CLOCK")
        return clock

    def set_clock(self, clock: S.kvm_clock_data) -> None:
        ioctl(self.fd, K.KVM_SET_CLOCK, clock, "KVM_SET_CLOCK")
