"""ioctl numbers, exit reasons, capabilities and flags from <linux/kvm.h> (x86-64).

Only names kvmpy uses are here; `tests/test_kvm_layout.py` checks every ioctl number against the
C macros of the installed headers.
"""

from __future__ import annotations

import ctypes as C
import enum

from . import structs as S

# <asm-generic/ioctl.h>
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2

KVMIO = 0xAE


def _IOC(direction: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (KVMIO << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(nr: int) -> int:
    return _IOC(_IOC_NONE, nr, 0)


def _IOR(nr: int, t) -> int:
    return _IOC(_IOC_READ, nr, C.sizeof(t))


def _IOW(nr: int, t) -> int:
    return _IOC(_IOC_WRITE, nr, C.sizeof(t))


def _IOWR(nr: int, t) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, nr, C.sizeof(t))


KVM_API_VERSION = 12

# system ioctls (/dev/kvm)
KVM_GET_API_VERSION = _IO(0x00)
KVM_CREATE_VM = _IO(0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(0x02, S.kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(0x05, S.kvm_cpuid2)
KVM_GET_MSR_FEATURE_INDEX_LIST = _IOWR(0x0A, S.kvm_msr_list)

# VM ioctls
KVM_CREATE_VCPU = _IO(0x41)
KVM_GET_DIRTY_LOG = _IOW(0x42, S.kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _IOW(0x46, S.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(0x48, C.c_uint64)
KVM_CREATE_IRQCHIP = _IO(0x60)
KVM_IRQ_LINE = _IOW(0x61, S.kvm_irq_level)
KVM_GET_IRQCHIP = _IOWR(0x62, S.kvm_irqchip)
KVM_SET_IRQCHIP = _IOR(0x63, S.kvm_irqchip)
KVM_IRQ_LINE_STATUS = _IOWR(0x67, S.kvm_irq_level)
KVM_REGISTER_COALESCED_MMIO = _IOW(0x67, S.kvm_coalesced_mmio_zone)
KVM_UNREGISTER_COALESCED_MMIO = _IOW(0x68, S.kvm_coalesced_mmio_zone)
KVM_SET_GSI_ROUTING = _IOW(0x6A, S.kvm_irq_routing)
KVM_IRQFD = _IOW(0x76, S.kvm_irqfd)
KVM_CREATE_PIT2 = _IOW(0x77, S.kvm_pit_config)
KVM_IOEVENTFD = _IOW(0x79, S.kvm_ioeventfd)
KVM_SET_CLOCK = _IOW(0x7B, S.kvm_clock_data)
KVM_GET_CLOCK = _IOR(0x7C, S.kvm_clock_data)
KVM_GET_PIT2 = _IOR(0x9F, S.kvm_pit_state2)
KVM_SET_PIT2 = _IOW(0xA0, S.kvm_pit_state2)
KVM_ENABLE_CAP = _IOW(0xA3, S.kvm_enable_cap)
KVM_X86_SET_MSR_FILTER = _IOW(0xC6, S.kvm_msr_filter)
KVM_SIGNAL_MSI = _IOW(0xA5, S.kvm_msi)
KVM_CLEAR_DIRTY_LOG = _IOWR(0xC0, S.kvm_clear_dirty_log)
KVM_RESET_DIRTY_RINGS = _IO(0xC7)

# vCPU ioctls
KVM_RUN = _IO(0x80)
KVM_GET_REGS = _IOR(0x81, S.kvm_regs)
KVM_SET_REGS = _IOW(0x82, S.kvm_regs)
KVM_GET_SREGS = _IOR(0x83, S.kvm_sregs)
KVM_SET_SREGS = _IOW(0x84, S.kvm_sregs)
KVM_TRANSLATE = _IOWR(0x85, S.kvm_translation)
KVM_INTERRUPT = _IOW(0x86, S.kvm_interrupt)
KVM_GET_MSRS = _IOWR(0x88, S.kvm_msrs)
KVM_SET_MSRS = _IOW(0x89, S.kvm_msrs)
KVM_SET_SIGNAL_MASK = _IOW(0x8B, S.kvm_signal_mask)
KVM_GET_FPU = _IOR(0x8C, S.kvm_fpu)
KVM_SET_FPU = _IOW(0x8D, S.kvm_fpu)
KVM_GET_LAPIC = _IOR(0x8E, S.kvm_lapic_state)
KVM_SET_LAPIC = _IOW(0x8F, S.kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(0x90, S.kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(0x91, S.kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(0x98, S.kvm_mp_state)
KVM_SET_MP_STATE = _IOW(0x99, S.kvm_mp_state)
KVM_NMI = _IO(0x9A)
KVM_SET_GUEST_DEBUG = _IOW(0x9B, S.kvm_guest_debug)
KVM_GET_VCPU_EVENTS = _IOR(0x9F, S.kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(0xA0, S.kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(0xA1, S.kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(0xA2, S.kvm_debugregs)
KVM_GET_XSAVE = _IOR(0xA4, S.kvm_xsave)
KVM_SET_XSAVE = _IOW(0xA5, S.kvm_xsave)
KVM_GET_XCRS = _IOR(0xA6, S.kvm_xcrs)
KVM_SET_XCRS = _IOW(0xA7, S.kvm_xcrs)
KVM_KVMCLOCK_CTRL = _IO(0xAD)
KVM_GET_XSAVE2 = _IOR(0xCF, S.kvm_xsave)
KVM_SET_TSC_KHZ = _IO(0xA2)
KVM_GET_TSC_KHZ = _IO(0xA3)
KVM_SET_DEVICE_ATTR = _IOW(0xE1, S.kvm_device_attr)
KVM_GET_DEVICE_ATTR = _IOW(0xE2, S.kvm_device_attr)
KVM_HAS_DEVICE_ATTR = _IOW(0xE3, S.kvm_device_attr)

# Every ioctl number kvmpy uses, for the layout test.
IOCTLS: dict[str, int] = {
    name: value
    for name, value in list(globals().items())
    if name.startswith("KVM_")
    and isinstance(value, int)
    and (value >> _IOC_TYPESHIFT) & 0xFF == KVMIO
}


class ExitReason(enum.IntEnum):
    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    HYPERV = 27
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    X86_BUS_LOCK = 33
    NOTIFY = 37

    @classmethod
    def name_of(cls, value: int) -> str:
        try:
            return cls(value).name.lower()
        except ValueError:
            return f"exit_{value}"


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3


class Cap(enum.IntEnum):
    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    PIT = 11
    MP_STATE = 14
    COALESCED_MMIO = 15
    SYNC_MMU = 16
    USER_NMI = 22
    SET_GUEST_DEBUG = 23
    IRQ_ROUTING = 25
    IRQ_INJECT_STATUS = 26
    IRQFD = 32
    PIT2 = 33
    PIT_STATE2 = 35
    IOEVENTFD = 36
    SET_IDENTITY_MAP_ADDR = 37
    ADJUST_CLOCK = 39
    INTERNAL_ERROR_DATA = 40
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    ENABLE_CAP = 54
    XSAVE = 55
    XCRS = 56
    TSC_CONTROL = 60
    GET_TSC_KHZ = 61
    MAX_VCPUS = 66
    TSC_DEADLINE_TIMER = 72
    SYNC_REGS = 74
    KVMCLOCK_CTRL = 76
    SIGNAL_MSI = 77
    READONLY_MEM = 81
    IRQFD_RESAMPLE = 82
    X2APIC_API = 129
    IMMEDIATE_EXIT = 136
    X86_DISABLE_EXITS = 143
    COALESCED_PIO = 162
    MANUAL_DIRTY_LOG_PROTECT2 = 168
    X86_USER_SPACE_MSR = 188
    X86_MSR_FILTER = 189
    DIRTY_LOG_RING = 192
    EXIT_HYPERCALL = 201
    XSAVE2 = 208
    X86_TRIPLE_FAULT_EVENT = 218
    DIRTY_LOG_RING_ACQ_REL = 223


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2

KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2

KVM_PIT_SPEAKER_DUMMY = 1

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_HALTED = 3

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0

KVM_GUESTDBG_ENABLE = 0x1
KVM_GUESTDBG_SINGLESTEP = 0x2
KVM_GUESTDBG_USE_SW_BP = 0x10000
KVM_GUESTDBG_USE_HW_BP = 0x20000

# KVM_CAP_X86_USER_SPACE_MSR: which refused MSR accesses exit to userspace.
KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2
# KVM_X86_SET_MSR_FILTER
KVM_MSR_FILTER_DEFAULT_ALLOW = 0
KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1

KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
KVM_DIRTY_LOG_PAGE_OFFSET = 64
KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1

KVM_CLOCK_TSC_STABLE = 2

KVM_X2APIC_API_USE_32BIT_IDS = 1 << 0
KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK = 1 << 1

# vCPU device attributes (x86): the guest TSC offset, in group KVM_VCPU_TSC_CTRL.
KVM_VCPU_TSC_CTRL = 0
KVM_VCPU_TSC_OFFSET = 0

KVM_PIO_PAGE_OFFSET = 1
KVM_COALESCED_MMIO_PAGE_OFFSET = 2
