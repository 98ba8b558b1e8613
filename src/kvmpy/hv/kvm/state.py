"""What KVM holds of a machine besides its RAM: each vCPU's registers and in-kernel LAPIC, the
VM's in-kernel interrupt controllers, PIT and clock, as JSON-able dicts (docs/persist.md).

KVM structures are kept as the raw bytes of their ioctl's struct, base64-encoded: that layout
is the kernel's stable ABI, so nothing is lost or reinterpreted on the way through. The
registers (`regs`, `sregs`, `fpu`, `msrs`) are also the CPU-state format every kvmpy backend
reads and writes (hv/base.py), which is what makes a snapshot portable between backends.

Capturing needs the vCPU out of KVM_RUN with its pending I/O completed: KVM finishes an
`in`/`out` only on the next KVM_RUN, and the registers read before that are not the ones the
guest will see.

Restoring follows the order the kernel's checks need (QEMU and Firecracker use the same one):
CPUID first, since it decides which MSRs and XSAVE features are valid; special registers
before the general ones (EFER and CR0/CR4 decide how the others are read); MSRs, with the APIC
base among them, before the LAPIC registers; XCR0 before the XSAVE area it governs; vCPU
events (pending exceptions, interrupt shadow, NMI) last, so nothing set later clears them;
and the VM clock at the very end, just before the vCPUs run (`apply_clock`).
"""

from __future__ import annotations

import base64
import binascii
import ctypes as C
import logging
from typing import TYPE_CHECKING, Any

from ...errors import KvmError, SnapshotError
from ...kvm import Cap
from ...kvm import constants as K
from ...kvm import structs as S

if TYPE_CHECKING:
    from . import KvmVm
    from .vcpu import KvmVcpu

log = logging.getLogger(__name__)

# <linux/kvm.h>: which parts of kvm_vcpu_events KVM_SET_VCPU_EVENTS takes from the caller.
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2

IRQCHIPS = (K.KVM_IRQCHIP_PIC_MASTER, K.KVM_IRQCHIP_PIC_SLAVE, K.KVM_IRQCHIP_IOAPIC)


# --- encoding ------------------------------------------------------------------------------------


def enc(obj) -> str:
    return base64.b64encode(bytes(obj)).decode("ascii")


def raw(text) -> bytes:
    if not isinstance(text, str):
        raise SnapshotError("a binary field of the snapshot state is not a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SnapshotError("a binary field of the snapshot state is not valid base64") from None


def dec(text, cls, what: str):
    data = raw(text)
    if len(data) != C.sizeof(cls):
        raise SnapshotError(
            f"the snapshot's {what} is {len(data)} bytes, this kvmpy expects {C.sizeof(cls)}"
        )
    return cls.from_buffer_copy(data)


def check_int(value, what: str, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise SnapshotError(f"the snapshot's {what} is not an integer in [{lo}, {hi}]")
    return value


def get(d, key: str, kind: type, what: str):
    if not isinstance(d, dict) or key not in d:
        raise SnapshotError(f"the snapshot state has no {what}")
    value = d[key]
    if not isinstance(value, kind):
        raise SnapshotError(f"the snapshot's {what} has the wrong type")
    return value


# --- the VM ----------------------------------------------------------------------------------------


def capture_vm(vm: KvmVm) -> dict[str, Any]:
    d: dict[str, Any] = {"clock": vm.fd.get_clock().clock}
    if vm.irqchip:
        d["irqchip"] = [enc(vm.fd.get_irqchip(chip)) for chip in IRQCHIPS]
        if vm.pit:
            d["pit2"] = enc(vm.fd.get_pit2())
    return d


def apply_vm(vm: KvmVm, d: dict[str, Any]) -> None:
    """The in-kernel interrupt controllers and PIT (the clock comes last: `apply_clock`)."""
    try:
        if vm.irqchip:
            chips = get(d, "irqchip", list, "irqchip state")
            if len(chips) != len(IRQCHIPS):
                raise SnapshotError("the snapshot's irqchip state is incomplete")
            for chip_id, blob in zip(IRQCHIPS, chips, strict=True):
                chip = dec(blob, S.kvm_irqchip, "irqchip state")
                if chip.chip_id != chip_id:
                    raise SnapshotError("the snapshot's irqchip state is out of order")
                vm.fd.set_irqchip(chip)
            if vm.pit:
                vm.fd.set_pit2(dec(get(d, "pit2", str, "PIT state"), S.kvm_pit_state2, "PIT"))
    except KvmError as e:
        raise SnapshotError(f"KVM refused the snapshot's VM state: {e}") from None


def apply_clock(vm: KvmVm, d: dict[str, Any]) -> None:
    try:
        vm.fd.set_clock(S.kvm_clock_data(clock=check_int(d.get("clock"), "VM clock")))
    except KvmError as e:
        raise SnapshotError(f"KVM refused the snapshot's clock: {e}") from None


# --- a vCPU ------------------------------------------------------------------------------------


def readable_msrs(vcpu: KvmVcpu) -> list[int]:
    """The MSRs of KVM_GET_MSR_INDEX_LIST that this vCPU lets us read (cached per vCPU).

    KVM_GET_MSRS stops at the first MSR it refuses and returns how many it read; an MSR the
    host lists but this vCPU's CPUID does not offer is skipped, the rest are kept."""
    cached = getattr(vcpu, "_readable_msrs", None)
    if cached is not None:
        return cached
    todo = vcpu.vm.hv.msr_index_list()
    ok: list[int] = []
    while todo:
        got = vcpu.fd.get_msrs(todo)
        ok.extend(todo[: len(got)])
        todo = todo[len(got) + 1 :]  # skip the refused one
    vcpu._readable_msrs = ok
    return ok


def _xsave_size(kvm) -> int:
    return kvm.check_extension(Cap.XSAVE2) if kvm.check_extension(Cap.XSAVE) else 0


def capture_vcpu(vcpu: KvmVcpu) -> dict[str, Any]:
    fd, kvm = vcpu.fd, vcpu.vm.kvm
    msrs = fd.get_msrs(readable_msrs(vcpu))
    d: dict[str, Any] = {
        "cpuid": [enc(e) for e in fd.get_cpuid2()],
        "sregs": enc(fd.get_sregs()),
        "regs": enc(fd.get_regs()),
        "fpu": enc(fd.get_fpu()),
        "msrs": [[index, value] for index, value in msrs.items()],
        "debugregs": enc(fd.get_debugregs()),
        "mp_state": fd.get_mp_state(),
        "vcpu_events": enc(fd.get_vcpu_events()),
    }
    size = _xsave_size(kvm)
    if kvm.check_extension(Cap.XSAVE):
        d["xsave"] = enc(fd.get_xsave(size if size > C.sizeof(S.kvm_xsave) else 0))
    if kvm.check_extension(Cap.XCRS):
        d["xcrs"] = enc(fd.get_xcrs())
    if vcpu.vm.irqchip:
        d["lapic"] = enc(fd.get_lapic())
    if kvm.check_extension(Cap.GET_TSC_KHZ):
        d["tsc_khz"] = fd.get_tsc_khz()
    return d


def apply_vcpu(vcpu: KvmVcpu, d: dict[str, Any]) -> None:
    try:
        _apply_vcpu(vcpu, d)
    except KvmError as e:
        raise SnapshotError(f"KVM refused the state of vCPU {vcpu.index}: {e}") from None


def _apply_vcpu(vcpu: KvmVcpu, d: dict[str, Any]) -> None:
    fd, kvm = vcpu.fd, vcpu.vm.kvm
    if not isinstance(d, dict):
        raise SnapshotError(f"the snapshot's state of vCPU {vcpu.index} is not an object")
    if "cpuid" in d:
        cpuid = [dec(e, S.kvm_cpuid_entry2, "CPUID entry") for e in get(d, "cpuid", list, "CPUID")]
        fd.set_cpuid2(cpuid)
    else:
        log.info("vCPU %d: the snapshot has no CPUID (another backend's): keeping KVM's",
                 vcpu.index)  # fmt: skip
    if "tsc_khz" in d and kvm.check_extension(Cap.GET_TSC_KHZ):
        khz = check_int(d["tsc_khz"], "TSC frequency", 1, 1 << 32)
        if khz != fd.get_tsc_khz():
            try:
                fd.set_tsc_khz(khz)
            except KvmError as e:
                log.warning("guest TSC runs at this host's rate, not %d kHz: %s", khz, e)
    fd.set_sregs(dec(get(d, "sregs", str, "sregs"), S.kvm_sregs, "special registers"))
    apply_msrs(vcpu, get(d, "msrs", list, "MSR list"))
    fd.set_regs(dec(get(d, "regs", str, "regs"), S.kvm_regs, "registers"))
    fd.set_fpu(dec(get(d, "fpu", str, "FPU state"), S.kvm_fpu, "FPU state"))
    if "xcrs" in d and kvm.check_extension(Cap.XCRS):
        fd.set_xcrs(dec(d["xcrs"], S.kvm_xcrs, "XCRs"))
    if "xsave" in d and kvm.check_extension(Cap.XSAVE):
        data = raw(d["xsave"])
        buf = S.xsave_buffer(max(len(data), _xsave_size(kvm)))
        C.memmove(buf, data, len(data))
        fd.set_xsave(buf)
    if "debugregs" in d:
        fd.set_debugregs(dec(d["debugregs"], S.kvm_debugregs, "debug registers"))
    if vcpu.vm.irqchip:
        if "lapic" in d:
            fd.set_lapic(dec(d["lapic"], S.kvm_lapic_state, "LAPIC state"))
        else:
            raise SnapshotError(
                f"the snapshot has no LAPIC state for vCPU {vcpu.index}, and this machine has "
                "an in-kernel irqchip"
            )
    fd.set_mp_state(check_int(d.get("mp_state", K.KVM_MP_STATE_RUNNABLE), "MP state", 0, 16))
    if "vcpu_events" in d:
        events = dec(d["vcpu_events"], S.kvm_vcpu_events, "vCPU events")
        events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR
        fd.set_vcpu_events(events)


def apply_msrs(vcpu: KvmVcpu, pairs: list) -> None:
    fd = vcpu.fd
    msrs: dict[int, int] = {}
    for pair in pairs:
        if not isinstance(pair, list) or len(pair) != 2:
            raise SnapshotError("the snapshot's MSR list is malformed")
        msrs[check_int(pair[0], "MSR index", 0, 0xFFFFFFFF)] = check_int(pair[1], "MSR value")
    items = list(msrs.items())
    refused = []
    while items:
        n = fd.set_msrs(dict(items))
        if n < len(items):
            refused.append(items[n][0])
            n += 1
        items = items[n:]
    # KVM refuses some writes of the value it just read: e.g. MSR_KVM_ASYNC_PF_INT (0x4b564d06)
    # reads as 0 but rejects 0 with an in-kernel LAPIC. Only a refused MSR whose value differs
    # on this vCPU loses state; the guest then finds it at its reset value.
    current = fd.get_msrs(refused) if refused else {}
    lost = [i for i in refused if current.get(i) != msrs[i]]
    if lost:
        log.warning("KVM refused %d MSRs of the snapshot: %s", len(lost),
                    ", ".join(f"{i:#x}={msrs[i]:#x}" for i in lost))  # fmt: skip
