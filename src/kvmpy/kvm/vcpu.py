"""`VcpuFd`: a vCPU file descriptor (KVM_CREATE_VCPU) and its mmap'ed `kvm_run` page."""

from __future__ import annotations

import ctypes as C
import os

from ..errors import KvmError
from . import constants as K
from . import structs as S
from ._sys import MAP_SHARED, PROT_READ, PROT_WRITE, ioctl, mmap, munmap, view

# Byte offsets into kvm_run, used by the run loop's hot path.
RUN_EXIT_REASON = S.kvm_run.exit_reason.offset
RUN_IMMEDIATE_EXIT = S.kvm_run.immediate_exit.offset
RUN_EXIT_UNION = S.kvm_run.u.offset
RUN_VALID_REGS = S.kvm_run.kvm_valid_regs.offset
RUN_DIRTY_REGS = S.kvm_run.kvm_dirty_regs.offset
RUN_SYNC_REGS = S.kvm_run.s.offset


class VcpuFd:
    """A KVM vCPU. Methods are named after the vCPU ioctls."""

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int):
        self.fd = fd
        self.id = vcpu_id
        self.mmap_size = mmap_size
        self._run_addr = mmap(mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        #: The shared kvm_run structure (ctypes view; fine for slow paths).
        self.run_struct = S.kvm_run.from_address(self._run_addr)
        #: Raw byte view of the whole mapping (kvm_run, PIO data page, coalesced MMIO ring).
        self.run_view = view(self._run_addr, mmap_size)

    def close(self) -> None:
        if self.fd < 0:
            return
        self.run_view.release()
        del self.run_struct
        munmap(self._run_addr, self.mmap_size)
        os.close(self.fd)
        self.fd = -1

    def run(self) -> int:
        """KVM_RUN; returns the raw exit reason. A signal makes it raise InterruptedError."""
        ioctl(self.fd, K.KVM_RUN, 0, "KVM_RUN")
        return self.run_struct.exit_reason

    # --- registers -----------------------------------------------------------------------------

    def get_regs(self) -> S.kvm_regs:
        regs = S.kvm_regs()
        ioctl(self.fd, K.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: S.kvm_regs) -> None:
        ioctl(self.fd, K.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> S.kvm_sregs:
        sregs = S.kvm_sregs()
        ioctl(self.fd, K.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: S.kvm_sregs) -> None:
        ioctl(self.fd, K.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self) -> S.kvm_fpu:
        fpu = S.kvm_fpu()
        ioctl(self.fd, K.KVM_GET_FPU, fpu, "KVM_GET_FPU")
        return fpu

    def set_fpu(self, fpu: S.kvm_fpu) -> None:
        ioctl(self.fd, K.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS; MSRs the kernel does not return are left out of the result."""
        buf = S.msrs_buffer(len(indices))
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        n = ioctl(self.fd, K.KVM_GET_MSRS, buf, "KVM_GET_MSRS")
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def set_msrs(self, msrs: dict[int, int]) -> int:
        """KVM_SET_MSRS; returns how many were set (the kernel stops at the first it refuses)."""
        buf = S.msrs_buffer(len(msrs))
        for i, (index, data) in enumerate(msrs.items()):
            buf.entries[i].index = index
            buf.entries[i].data = data
        return ioctl(self.fd, K.KVM_SET_MSRS, buf, "KVM_SET_MSRS")

    def set_signal_mask(self, signals) -> None:
        """KVM_SET_SIGNAL_MASK: the signals *blocked* while KVM_RUN runs the guest (whatever the
        calling thread blocks otherwise); None: the thread's own mask again."""
        if signals is None:
            ioctl(self.fd, K.KVM_SET_SIGNAL_MASK, 0, "KVM_SET_SIGNAL_MASK")
        else:
            buf = S.signal_mask_buffer(signals)
            ioctl(self.fd, K.KVM_SET_SIGNAL_MASK, buf, "KVM_SET_SIGNAL_MASK")

    def set_cpuid2(self, entries: list[S.kvm_cpuid_entry2]) -> None:
        buf = S.cpuid2_buffer(len(entries))
        for i, e in enumerate(entries):
            buf.entries[i] = e
        ioctl(self.fd, K.KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")

    def get_cpuid2(self, max_entries: int = 256) -> list[S.kvm_cpuid_entry2]:
        buf = S.cpuid2_buffer(max_entries)
        ioctl(self.fd, K.KVM_GET_CPUID2, buf, "KVM_GET_CPUID2")
        return [S.kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

    def get_lapic(self) -> S.kvm_lapic_state:
        lapic = S.kvm_lapic_state()
        ioctl(self.fd, K.KVM_GET_LAPIC, lapic, "KVM_GET_LAPIC")
        return lapic

    def set_lapic(self, lapic: S.kvm_lapic_state) -> None:
        ioctl(self.fd, K.KVM_SET_LAPIC, lapic, "KVM_SET_LAPIC")

    def get_mp_state(self) -> int:
        st = S.kvm_mp_state()
        ioctl(self.fd, K.KVM_GET_MP_STATE, st, "KVM_GET_MP_STATE")
        return st.mp_state

    def set_mp_state(self, state: int) -> None:
        ioctl(self.fd, K.KVM_SET_MP_STATE, S.kvm_mp_state(mp_state=state), "KVM_SET_MP_STATE")

    def get_vcpu_events(self) -> S.kvm_vcpu_events:
        ev = S.kvm_vcpu_events()
        ioctl(self.fd, K.KVM_GET_VCPU_EVENTS, ev, "KVM_GET_VCPU_EVENTS")
        return ev

    def set_vcpu_events(self, ev: S.kvm_vcpu_events) -> None:
        ioctl(self.fd, K.KVM_SET_VCPU_EVENTS, ev, "KVM_SET_VCPU_EVENTS")

    def get_debugregs(self) -> S.kvm_debugregs:
        d = S.kvm_debugregs()
        ioctl(self.fd, K.KVM_GET_DEBUGREGS, d, "KVM_GET_DEBUGREGS")
        return d

    def set_debugregs(self, d: S.kvm_debugregs) -> None:
        ioctl(self.fd, K.KVM_SET_DEBUGREGS, d, "KVM_SET_DEBUGREGS")

    def get_xsave(self, size: int = 0) -> C.Array:
        """KVM_GET_XSAVE2 when `size` (from KVM_CAP_XSAVE2) is given, else KVM_GET_XSAVE."""
        buf = S.xsave_buffer(size)
        if size:
            ioctl(self.fd, K.KVM_GET_XSAVE2, buf, "KVM_GET_XSAVE2")
        else:
            ioctl(self.fd, K.KVM_GET_XSAVE, buf, "KVM_GET_XSAVE")
        return buf

    def set_xsave(self, buf: C.Array) -> None:
        ioctl(self.fd, K.KVM_SET_XSAVE, buf, "KVM_SET_XSAVE")

    def get_xcrs(self) -> S.kvm_xcrs:
        x = S.kvm_xcrs()
        ioctl(self.fd, K.KVM_GET_XCRS, x, "KVM_GET_XCRS")
        return x

    def set_xcrs(self, x: S.kvm_xcrs) -> None:
        ioctl(self.fd, K.KVM_SET_XCRS, x, "KVM_SET_XCRS")

    def get_tsc_khz(self) -> int:
        return ioctl(self.fd, K.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        ioctl(self.fd, K.KVM_SET_TSC_KHZ, khz, "KVM_SET_TSC_KHZ")

    def has_device_attr(self, group: int, attr: int) -> bool:
        try:
            ioctl(self.fd, K.KVM_HAS_DEVICE_ATTR, S.kvm_device_attr(group=group, attr=attr))
        except KvmError:
            return False
        return True

    def get_device_attr_u64(self, group: int, attr: int) -> int:
        value = C.c_uint64()
        da = S.kvm_device_attr(group=group, attr=attr, addr=C.addressof(value))
        ioctl(self.fd, K.KVM_GET_DEVICE_ATTR, da, "KVM_GET_DEVICE_ATTR")
        return value.value

    def set_device_attr_u64(self, group: int, attr: int, value: int) -> None:
        v = C.c_uint64(value & 0xFFFF_FFFF_FFFF_FFFF)
        da = S.kvm_device_attr(group=group, attr=attr, addr=C.addressof(v))
        ioctl(self.fd, K.KVM_SET_DEVICE_ATTR, da, "KVM_SET_DEVICE_ATTR")

    def get_tsc_offset(self) -> int:
        """The guest TSC's offset from the host's (signed), KVM_VCPU_TSC_OFFSET (Linux 5.16+)."""
        raw = self.get_device_attr_u64(K.KVM_VCPU_TSC_CTRL, K.KVM_VCPU_TSC_OFFSET)
        return raw - (1 << 64) if raw >> 63 else raw

    def set_tsc_offset(self, offset: int) -> None:
        """Set it: with offset 0 (and no TSC scaling) `rdtsc` in the guest reads the host's
        TSC, so every VM on the host shares one timebase."""
        self.set_device_attr_u64(K.KVM_VCPU_TSC_CTRL, K.KVM_VCPU_TSC_OFFSET, offset)

    def kvmclock_ctrl(self) -> None:
        ioctl(self.fd, K.KVM_KVMCLOCK_CTRL, 0, "KVM_KVMCLOCK_CTRL")

    # --- other ---------------------------------------------------------------------------------

    def translate(self, linear_address: int) -> S.kvm_translation:
        tr = S.kvm_translation(linear_address=linear_address)
        ioctl(self.fd, K.KVM_TRANSLATE, tr, "KVM_TRANSLATE")
        return tr

    def interrupt(self, irq: int) -> None:
        ioctl(self.fd, K.KVM_INTERRUPT, S.kvm_interrupt(irq=irq), "KVM_INTERRUPT")

    def nmi(self) -> None:
        ioctl(self.fd, K.KVM_NMI, 0, "KVM_NMI")

    def set_guest_debug(self, control: int, debugreg: list[int] | None = None) -> None:
        dbg = S.kvm_guest_debug(control=control)
        for i, v in enumerate(debugreg or []):
            dbg.arch.debugreg[i] = v
        ioctl(self.fd, K.KVM_SET_GUEST_DEBUG, dbg, "KVM_SET_GUEST_DEBUG")
