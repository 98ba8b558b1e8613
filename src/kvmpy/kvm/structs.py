"""ctypes mirrors of the structures in <linux/kvm.h> and <asm/kvm.h> (x86-64).

Field names, order and sizes follow the kernel headers exactly; `tests/test_kvm_layout.py`
compiles a C program against the installed headers and checks every size and offset listed in
`LAYOUT_CHECKS` below. Nothing here has behaviour: the classes are plain data.
"""

from __future__ import annotations

import ctypes as C

u8, u16, u32, u64 = C.c_uint8, C.c_uint16, C.c_uint32, C.c_uint64
s32, s64 = C.c_int32, C.c_int64


class Struct(C.Structure):
    def to_dict(self) -> dict:
        """A plain-data copy (nested structs and arrays become dicts and lists)."""
        return {name: _plain(getattr(self, name)) for name, *_ in self._fields_}


class Union(C.Union):
    pass


def _plain(value):
    if isinstance(value, Struct):
        return value.to_dict()
    if isinstance(value, C.Array):
        return [_plain(v) for v in value]
    return value


# --- memory ------------------------------------------------------------------------------------


class kvm_userspace_memory_region(Struct):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_dirty_log(Struct):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_clear_dirty_log(Struct):
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class kvm_dirty_gfn(Struct):
    _fields_ = [("flags", u32), ("slot", u32), ("offset", u64)]


class kvm_coalesced_mmio_zone(Struct):
    _fields_ = [("addr", u64), ("size", u32), ("pio", u32)]


class kvm_coalesced_mmio(Struct):
    _fields_ = [("phys_addr", u64), ("len", u32), ("pio", u32), ("data", u8 * 8)]


class kvm_coalesced_mmio_ring(Struct):
    _fields_ = [("first", u32), ("last", u32)]


class kvm_translation(Struct):
    _fields_ = [
        ("linear_address", u64),
        ("physical_address", u64),
        ("valid", u8),
        ("writeable", u8),
        ("usermode", u8),
        ("pad", u8 * 5),
    ]


# --- registers ---------------------------------------------------------------------------------

GPR_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rip", "rflags",
)  # fmt: skip


class kvm_regs(Struct):
    _fields_ = [(name, u64) for name in GPR_NAMES]


class kvm_segment(Struct):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(Struct):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256
SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


class kvm_sregs(Struct):
    _fields_ = [(name, kvm_segment) for name in SEGMENT_NAMES] + [
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(Struct):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class kvm_msr_entry(Struct):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(Struct):
    """Header only; the entries follow it (see `msrs_buffer`)."""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_signal_mask(Struct):
    """Header only; `len` bytes of sigset follow it (see `signal_mask_buffer`)."""

    _fields_ = [("len", u32)]


class kvm_msr_list(Struct):
    _fields_ = [("nmsrs", u32)]


class kvm_cpuid_entry2(Struct):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_cpuid2(Struct):
    """Header only; the entries follow it (see `cpuid2_buffer`)."""

    _fields_ = [("nent", u32), ("padding", u32)]


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(Struct):
    _fields_ = [("regs", C.c_char * KVM_APIC_REG_SIZE)]


class _events_exception(Struct):
    _fields_ = [
        ("injected", u8),
        ("nr", u8),
        ("has_error_code", u8),
        ("pending", u8),
        ("error_code", u32),
    ]


class _events_interrupt(Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _events_nmi(Struct):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _events_smi(Struct):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class _events_triple_fault(Struct):
    _fields_ = [("pending", u8)]


class kvm_vcpu_events(Struct):
    _fields_ = [
        ("exception", _events_exception),
        ("interrupt", _events_interrupt),
        ("nmi", _events_nmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", _events_smi),
        ("triple_fault", _events_triple_fault),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


class kvm_mp_state(Struct):
    _fields_ = [("mp_state", u32)]


class kvm_debugregs(Struct):
    _fields_ = [
        ("db", u64 * 4),
        ("dr6", u64),
        ("dr7", u64),
        ("flags", u64),
        ("reserved", u64 * 9),
    ]


class kvm_xsave(Struct):
    """The fixed 4 KiB part; KVM_GET_XSAVE2 may need more (size from KVM_CAP_XSAVE2)."""

    _fields_ = [("region", u32 * 1024)]


KVM_MAX_XCRS = 16


class kvm_xcr(Struct):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(Struct):
    _fields_ = [
        ("nr_xcrs", u32),
        ("flags", u32),
        ("xcrs", kvm_xcr * KVM_MAX_XCRS),
        ("padding", u64 * 16),
    ]


class kvm_sync_regs(Struct):
    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


class kvm_guest_debug_arch(Struct):
    _fields_ = [("debugreg", u64 * 8)]


class kvm_guest_debug(Struct):
    _fields_ = [("control", u32), ("pad", u32), ("arch", kvm_guest_debug_arch)]


class kvm_debug_exit_arch(Struct):
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


# --- interrupts and devices --------------------------------------------------------------------


class kvm_irq_level(Struct):
    _fields_ = [("irq", u32), ("level", u32)]  # `irq` doubles as `status` for *_STATUS


class kvm_interrupt(Struct):
    _fields_ = [("irq", u32)]


class kvm_pic_state(Struct):
    _fields_ = [
        (name, u8)
        for name in (
            "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select",
            "poll", "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi",
            "special_fully_nested_mode", "init4", "elcr", "elcr_mask",
        )
    ]  # fmt: skip


KVM_IOAPIC_NUM_PINS = 24


class kvm_ioapic_state(Struct):
    _fields_ = [
        ("base_address", u64),
        ("ioregsel", u32),
        ("id", u32),
        ("irr", u32),
        ("pad", u32),
        ("redirtbl", u64 * KVM_IOAPIC_NUM_PINS),
    ]


class _irqchip_union(Union):
    _fields_ = [("dummy", C.c_char * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(Struct):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", _irqchip_union)]


class kvm_pit_config(Struct):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_pit_channel_state(Struct):
    _fields_ = [
        ("count", u32),
        ("latched_count", u16),
        ("count_latched", u8),
        ("status_latched", u8),
        ("status", u8),
        ("read_state", u8),
        ("write_state", u8),
        ("write_latch", u8),
        ("rw_mode", u8),
        ("mode", u8),
        ("bcd", u8),
        ("gate", u8),
        ("count_load_time", s64),
    ]


class kvm_pit_state2(Struct):
    _fields_ = [
        ("channels", kvm_pit_channel_state * 3),
        ("flags", u32),
        ("reserved", u32 * 9),
    ]


class kvm_clock_data(Struct):
    _fields_ = [
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    ]


class kvm_device_attr(Struct):
    """KVM_{SET,GET,HAS}_DEVICE_ATTR on a device or vCPU fd; `addr` points at the value."""

    _fields_ = [("flags", u32), ("group", u32), ("attr", u64), ("addr", u64)]


class kvm_irqfd(Struct):
    _fields_ = [
        ("fd", u32),
        ("gsi", u32),
        ("flags", u32),
        ("resamplefd", u32),
        ("pad", u8 * 16),
    ]


class kvm_ioeventfd(Struct):
    _fields_ = [
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", s32),
        ("flags", u32),
        ("pad", u8 * 36),
    ]


class kvm_msi(Struct):
    _fields_ = [
        ("address_lo", u32),
        ("address_hi", u32),
        ("data", u32),
        ("flags", u32),
        ("devid", u32),
        ("pad", u8 * 12),
    ]


class kvm_irq_routing_irqchip(Struct):
    _fields_ = [("irqchip", u32), ("pin", u32)]


class kvm_irq_routing_msi(Struct):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("devid", u32)]


class _routing_union(Union):
    _fields_ = [
        ("irqchip", kvm_irq_routing_irqchip),
        ("msi", kvm_irq_routing_msi),
        ("pad", u32 * 8),
    ]


class kvm_irq_routing_entry(Struct):
    _fields_ = [
        ("gsi", u32),
        ("type", u32),
        ("flags", u32),
        ("pad", u32),
        ("u", _routing_union),
    ]


class kvm_irq_routing(Struct):
    """Header only; the entries follow it (see `routing_buffer`)."""

    _fields_ = [("nr", u32), ("flags", u32)]


class kvm_msr_filter_range(Struct):
    _fields_ = [("flags", u32), ("nmsrs", u32), ("base", u32), ("bitmap", u64)]


class kvm_msr_filter(Struct):
    _fields_ = [("flags", u32), ("ranges", kvm_msr_filter_range * 16)]


class kvm_enable_cap(Struct):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


# --- kvm_run -----------------------------------------------------------------------------------


class _run_hw(Struct):
    _fields_ = [("hardware_exit_reason", u64)]


class _run_fail_entry(Struct):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _run_ex(Struct):
    _fields_ = [("exception", u32), ("error_code", u32)]


class _run_io(Struct):
    _fields_ = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),
    ]


class _run_debug(Struct):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class _run_mmio(Struct):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _run_hypercall(Struct):
    _fields_ = [
        ("nr", u64),
        ("args", u64 * 6),
        ("ret", u64),
        ("longmode", u32),
        ("pad", u32),
    ]


class _run_internal(Struct):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _run_emulation_failure(Struct):
    _fields_ = [
        ("suberror", u32),
        ("ndata", u32),
        ("flags", u64),
        ("insn_size", u8),
        ("insn_bytes", u8 * 15),
    ]


class _run_system_event(Struct):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class _run_msr(Struct):
    _fields_ = [
        ("error", u8),
        ("pad", u8 * 7),
        ("reason", u32),
        ("index", u32),
        ("data", u64),
    ]


class _run_exit_union(Union):
    _fields_ = [
        ("hw", _run_hw),
        ("fail_entry", _run_fail_entry),
        ("ex", _run_ex),
        ("io", _run_io),
        ("debug", _run_debug),
        ("mmio", _run_mmio),
        ("hypercall", _run_hypercall),
        ("internal", _run_internal),
        ("emulation_failure", _run_emulation_failure),
        ("system_event", _run_system_event),
        ("msr", _run_msr),
        ("padding", C.c_char * 256),
    ]


SYNC_REGS_SIZE_BYTES = 2048


class _run_sync_union(Union):
    _fields_ = [("regs", kvm_sync_regs), ("padding", C.c_char * SYNC_REGS_SIZE_BYTES)]


class kvm_run(Struct):
    _anonymous_ = ("u",)
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("u", _run_exit_union),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", _run_sync_union),
    ]


# --- variable-length buffers -------------------------------------------------------------------


def cpuid2_buffer(nent: int) -> C.Structure:
    class kvm_cpuid2_n(Struct):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * nent)]

    buf = kvm_cpuid2_n()
    buf.nent = nent
    return buf


def msrs_buffer(nmsrs: int) -> C.Structure:
    class kvm_msrs_n(Struct):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * nmsrs)]

    buf = kvm_msrs_n()
    buf.nmsrs = nmsrs
    return buf


def msr_list_buffer(nmsrs: int) -> C.Structure:
    class kvm_msr_list_n(Struct):
        _fields_ = [("nmsrs", u32), ("indices", u32 * nmsrs)]

    buf = kvm_msr_list_n()
    buf.nmsrs = nmsrs
    return buf


def routing_buffer(nr: int) -> C.Structure:
    class kvm_irq_routing_n(Struct):
        _fields_ = [("nr", u32), ("flags", u32), ("entries", kvm_irq_routing_entry * nr)]

    buf = kvm_irq_routing_n()
    buf.nr = nr
    return buf


def xsave_buffer(size: int) -> C.Array:
    """KVM_GET_XSAVE2 writes `size` bytes (KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2), at least 4096)."""
    return (C.c_uint8 * max(size, C.sizeof(kvm_xsave)))()


# Every structure whose size and field offsets the layout test checks against the C headers.
def signal_mask_buffer(signals) -> C.Array:
    """struct kvm_signal_mask with the kernel's 8-byte x86-64 sigset of `signals` (bit sig-1)."""
    bits = 0
    for sig in signals:
        bits |= 1 << (int(sig) - 1)
    buf = (u8 * (C.sizeof(kvm_signal_mask) + 8))()
    C.memmove(buf, (8).to_bytes(4, "little") + bits.to_bytes(8, "little"), 12)
    return buf


LAYOUT_CHECKS: dict[str, type] = {
    name: obj
    for name, obj in list(globals().items())
    if name.startswith("kvm_") and isinstance(obj, type) and issubclass(obj, Struct | Union)
}
