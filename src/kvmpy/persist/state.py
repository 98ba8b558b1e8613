"""A machine's state besides its RAM: the vCPUs, the VM's in-kernel devices and clock, and
kvmpy's own VMM state, as one JSON-able dict (docs/persist.md describes every field).

KVM structures are kept as the raw bytes of their ioctl's struct, base64-encoded: that layout
is the kernel's stable ABI, so nothing is lost or reinterpreted on the way through.

Capturing needs the vCPU out of KVM_RUN with its pending I/O completed (`Machine.run`'s
`on_pause` hook guarantees both): KVM finishes an `in`/`out` only on the next KVM_RUN, and the
registers read before that are not the ones the guest will see.

Restoring follows the order the kernel's checks need (QEMU and Firecracker use the same one):
CPUID first, since it decides which MSRs and XSAVE features are valid; special registers
before the general ones (EFER and CR0/CR4 decide how the others are read); MSRs, with the APIC
base among them, before the LAPIC registers; XCR0 before the XSAVE area it governs; vCPU
events (pending exceptions, interrupt shadow, NMI) last, so nothing set later clears them;
and the VM clock at the very end, just before the vCPU runs.
"""

from __future__ import annotations

import base64
import binascii
import ctypes as C
import dataclasses
import logging
import weakref
from typing import Any

from ..arch.x86.modes import Mode, SystemLayout
from ..errors import ConfigError, KvmError
from ..kvm import Cap
from ..kvm import constants as K
from ..kvm import structs as S
from ..machine import Machine, MachineConfig
from ..stats import MAX_REASON, PortStats
from .errors import SnapshotError

log = logging.getLogger(__name__)

#: Version of the layout of this dict; the snapshot format and the migration protocol carry it.
STATE_VERSION = 1

# <linux/kvm.h>: which parts of kvm_vcpu_events KVM_SET_VCPU_EVENTS takes from the caller.
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2

IRQCHIPS = (K.KVM_IRQCHIP_PIC_MASTER, K.KVM_IRQCHIP_PIC_SLAVE, K.KVM_IRQCHIP_IOAPIC)


# --- encoding ------------------------------------------------------------------------------------


def _enc(obj) -> str:
    return base64.b64encode(bytes(obj)).decode("ascii")


def _raw(text) -> bytes:
    if not isinstance(text, str):
        raise SnapshotError("a binary field of the snapshot state is not a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SnapshotError("a binary field of the snapshot state is not valid base64") from None


def _dec(text, cls, what: str):
    raw = _raw(text)
    if len(raw) != C.sizeof(cls):
        raise SnapshotError(
            f"the snapshot's {what} is {len(raw)} bytes, this kvmpy expects {C.sizeof(cls)}"
        )
    return cls.from_buffer_copy(raw)


def _int(value, what: str, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise SnapshotError(f"the snapshot's {what} is not an integer in [{lo}, {hi}]")
    return value


def _get(d, key: str, kind: type, what: str):
    if not isinstance(d, dict) or key not in d:
        raise SnapshotError(f"the snapshot state has no {what}")
    value = d[key]
    if not isinstance(value, kind):
        raise SnapshotError(f"the snapshot's {what} has the wrong type")
    return value


# --- config --------------------------------------------------------------------------------------


def config_to_dict(config: MachineConfig) -> dict[str, Any]:
    c = config.validated()
    return {
        "mode": Mode(c.mode).value,
        "memory": c.memory,
        "vcpus": c.vcpus,
        "irqchip": c.irqchip,
        "pit": c.pit,
        "name": c.name,
    }


def config_from_dict(d) -> MachineConfig:
    try:
        config = MachineConfig(
            mode=_get(d, "mode", str, "CPU mode"),
            memory=_int(_get(d, "memory", int, "memory size"), "memory size"),
            vcpus=_int(_get(d, "vcpus", int, "vCPU count"), "vCPU count"),
            irqchip=_get(d, "irqchip", bool, "irqchip flag"),
            pit=_get(d, "pit", bool, "PIT flag"),
            name=_get(d, "name", str, "machine name"),
        )
        return config.validated()
    except ConfigError as e:
        raise SnapshotError(f"the snapshot's machine configuration is not usable: {e}") from None


# --- capture -------------------------------------------------------------------------------------


def capture(machine: Machine) -> dict[str, Any]:
    """Everything but guest RAM. The vCPUs must be paused with their pending I/O completed."""
    if machine.boot is None:
        raise SnapshotError("the machine has not been loaded or restored; nothing to save")
    return {
        "version": STATE_VERSION,
        "config": config_to_dict(machine.config),
        "vm": capture_vm(machine),
        "vcpus": [capture_vcpu(machine, v.fd) for v in machine.vcpus],
        "vmm": capture_vmm(machine),
    }


def capture_vm(machine: Machine) -> dict[str, Any]:
    vm = machine.vm
    d: dict[str, Any] = {"clock": vm.get_clock().clock}
    if machine.config.irqchip:
        d["irqchip"] = [_enc(vm.get_irqchip(chip)) for chip in IRQCHIPS]
        if machine.config.pit:
            d["pit2"] = _enc(vm.get_pit2())
    return d


_msr_cache: weakref.WeakKeyDictionary[Machine, list[int]] = weakref.WeakKeyDictionary()


def readable_msrs(machine: Machine) -> list[int]:
    """The MSRs of KVM_GET_MSR_INDEX_LIST that this vCPU lets us read (cached per machine).

    KVM_GET_MSRS stops at the first MSR it refuses and returns how many it read; an MSR the
    host lists but this vCPU's CPUID does not offer is skipped, the rest are kept."""
    cached = _msr_cache.get(machine)
    if cached is not None:
        return cached
    todo = machine.kvm.msr_index_list()
    fd = machine.vcpu.fd
    ok: list[int] = []
    while todo:
        got = fd.get_msrs(todo)
        ok.extend(todo[: len(got)])
        todo = todo[len(got) + 1 :]  # skip the refused one
    _msr_cache[machine] = ok
    return ok


def _xsave_size(machine: Machine) -> int:
    return machine.kvm.check_extension(Cap.XSAVE2) if machine.kvm.check_extension(Cap.XSAVE) else 0


def capture_vcpu(machine: Machine, fd) -> dict[str, Any]:
    kvm = machine.kvm
    msrs = fd.get_msrs(readable_msrs(machine))
    d: dict[str, Any] = {
        "cpuid": [_enc(e) for e in fd.get_cpuid2()],
        "sregs": _enc(fd.get_sregs()),
        "regs": _enc(fd.get_regs()),
        "fpu": _enc(fd.get_fpu()),
        "msrs": [[index, value] for index, value in msrs.items()],
        "debugregs": _enc(fd.get_debugregs()),
        "mp_state": fd.get_mp_state(),
        "vcpu_events": _enc(fd.get_vcpu_events()),
    }
    size = _xsave_size(machine)
    if kvm.check_extension(Cap.XSAVE):
        d["xsave"] = _enc(fd.get_xsave(size if size > C.sizeof(S.kvm_xsave) else 0))
    if kvm.check_extension(Cap.XCRS):
        d["xcrs"] = _enc(fd.get_xcrs())
    if machine.config.irqchip:
        d["lapic"] = _enc(fd.get_lapic())
    if kvm.check_extension(Cap.GET_TSC_KHZ):
        d["tsc_khz"] = fd.get_tsc_khz()
    return d


def _device_key(bus: str, base: int, name: str) -> str:
    return f"{bus}:{base:#x}:{name}"


def devices(machine: Machine) -> dict[str, Any]:
    """Every device on the machine's buses, keyed by bus, base address and name."""
    found: dict[str, Any] = {}
    for port, entry in machine.pio_bus.entries.items():
        if entry.offset == 0:
            found[_device_key("pio", port, entry.device.name)] = entry.device
    for base, _end, device in machine.mmio_bus.ranges():
        found[_device_key("mmio", base, device.name)] = device
    return found


def capture_vmm(machine: Machine) -> dict[str, Any]:
    stats = machine.vcpu.stats
    return {
        "mode": machine.mode.value,
        "entry_ip": machine.entry_ip,
        "layout": dataclasses.asdict(machine.layout),
        "output_bytes": machine.output_bytes,
        "stats": {
            "counts": list(stats.counts),
            "vmm_ns": list(stats.vmm_ns),
            "timed": list(stats.timed),
            "loop_ns": stats.loop_ns,
            "ports": [dataclasses.asdict(p) for p in stats.ports.values()],
        },
        "devices": {key: dev.state() for key, dev in devices(machine).items()},
    }


# --- restore -------------------------------------------------------------------------------------


def check_version(state) -> None:
    version = _get(state, "version", int, "state version")
    if version != STATE_VERSION:
        raise SnapshotError(
            f"the snapshot state is version {version}; this kvmpy reads version {STATE_VERSION}"
        )


def apply(machine: Machine, state: dict[str, Any]) -> None:
    """Put `state` into a machine built from the same config whose RAM is already restored
    (or is being served lazily), and make it runnable."""
    check_version(state)
    vcpus = _get(state, "vcpus", list, "vCPU list")
    if len(vcpus) != len(machine.vcpus):
        raise SnapshotError(
            f"the snapshot has {len(vcpus)} vCPUs, the machine {len(machine.vcpus)}"
        )
    vmm = _get(state, "vmm", dict, "VMM state")
    vm = _get(state, "vm", dict, "VM state")
    layout, entry_ip = _layout(vmm)
    try:
        _apply_vm_devices(machine, vm)
        for v, d in zip(machine.vcpus, vcpus, strict=True):
            apply_vcpu(machine, v.fd, d)
        apply_vmm(machine, vmm)
        machine.vm.set_clock(S.kvm_clock_data(clock=_int(vm.get("clock"), "VM clock")))
    except KvmError as e:
        raise SnapshotError(f"KVM refused the snapshot's state: {e}") from None
    machine.mark_restored(layout, entry_ip)


def _apply_vm_devices(machine: Machine, vm: dict) -> None:
    if machine.config.irqchip:
        chips = _get(vm, "irqchip", list, "irqchip state")
        if len(chips) != len(IRQCHIPS):
            raise SnapshotError("the snapshot's irqchip state is incomplete")
        for chip_id, blob in zip(IRQCHIPS, chips, strict=True):
            chip = _dec(blob, S.kvm_irqchip, "irqchip state")
            if chip.chip_id != chip_id:
                raise SnapshotError("the snapshot's irqchip state is out of order")
            machine.vm.set_irqchip(chip)
        if machine.config.pit:
            machine.vm.set_pit2(_dec(_get(vm, "pit2", str, "PIT state"), S.kvm_pit_state2, "PIT"))


def apply_vcpu(machine: Machine, fd, d: dict) -> None:
    kvm = machine.kvm
    cpuid = [_dec(e, S.kvm_cpuid_entry2, "CPUID entry") for e in _get(d, "cpuid", list, "CPUID")]
    fd.set_cpuid2(cpuid)
    if "tsc_khz" in d and kvm.check_extension(Cap.GET_TSC_KHZ):
        khz = _int(d["tsc_khz"], "TSC frequency", 1, 1 << 32)
        if khz != fd.get_tsc_khz():
            try:
                fd.set_tsc_khz(khz)
            except KvmError as e:
                log.warning("guest TSC runs at this host's rate, not %d kHz: %s", khz, e)
    fd.set_sregs(_dec(_get(d, "sregs", str, "sregs"), S.kvm_sregs, "special registers"))
    _apply_msrs(fd, _get(d, "msrs", list, "MSR list"))
    fd.set_regs(_dec(_get(d, "regs", str, "regs"), S.kvm_regs, "registers"))
    fd.set_fpu(_dec(_get(d, "fpu", str, "FPU state"), S.kvm_fpu, "FPU state"))
    if "xcrs" in d and kvm.check_extension(Cap.XCRS):
        fd.set_xcrs(_dec(d["xcrs"], S.kvm_xcrs, "XCRs"))
    if "xsave" in d and kvm.check_extension(Cap.XSAVE):
        raw = _raw(d["xsave"])
        buf = S.xsave_buffer(max(len(raw), _xsave_size(machine)))
        C.memmove(buf, raw, len(raw))
        fd.set_xsave(buf)
    fd.set_debugregs(_dec(_get(d, "debugregs", str, "debug registers"), S.kvm_debugregs, "DRs"))
    if machine.config.irqchip:
        fd.set_lapic(_dec(_get(d, "lapic", str, "LAPIC"), S.kvm_lapic_state, "LAPIC state"))
    fd.set_mp_state(_int(d.get("mp_state"), "MP state", 0, 16))
    events = _dec(_get(d, "vcpu_events", str, "vCPU events"), S.kvm_vcpu_events, "vCPU events")
    events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR
    fd.set_vcpu_events(events)


def _apply_msrs(fd, pairs: list) -> None:
    msrs: dict[int, int] = {}
    for pair in pairs:
        if not isinstance(pair, list) or len(pair) != 2:
            raise SnapshotError("the snapshot's MSR list is malformed")
        msrs[_int(pair[0], "MSR index", 0, 0xFFFFFFFF)] = _int(pair[1], "MSR value")
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


def _layout(vmm: dict) -> tuple[SystemLayout, int]:
    mode = _get(vmm, "mode", str, "CPU mode")
    d = _get(vmm, "layout", dict, "system layout")
    names = {f.name for f in dataclasses.fields(SystemLayout)}
    if set(d) != names:
        raise SnapshotError("the snapshot's system layout has unexpected fields")
    try:
        Mode(mode)
        layout = SystemLayout(**d)
    except (TypeError, ValueError):
        raise SnapshotError("the snapshot's system layout is malformed") from None
    for f in names - {"page_tables"}:
        _int(getattr(layout, f), f"layout field {f}")
    if not isinstance(layout.page_tables, list):
        raise SnapshotError("the snapshot's page table list is malformed")
    return layout, _int(_get(vmm, "entry_ip", int, "entry point"), "entry point")


def apply_vmm(machine: Machine, vmm: dict) -> None:
    if _get(vmm, "mode", str, "CPU mode") != machine.mode.value:
        raise SnapshotError("the snapshot's CPU mode differs from its machine configuration")
    machine.output_bytes = _int(_get(vmm, "output_bytes", int, "output count"), "output count")
    st = _get(vmm, "stats", dict, "exit statistics")
    stats = machine.vcpu.stats
    for name in ("counts", "vmm_ns", "timed"):
        values = _get(st, name, list, f"exit statistics ({name})")
        if len(values) != MAX_REASON:
            raise SnapshotError(f"the snapshot's exit statistics ({name}) have the wrong length")
        getattr(stats, name)[:] = [_int(v, f"exit statistics ({name})") for v in values]
    stats.loop_ns = _int(_get(st, "loop_ns", int, "loop time"), "loop time")
    stats.ports.clear()
    fields = {f.name for f in dataclasses.fields(PortStats)}
    for p in _get(st, "ports", list, "port statistics"):
        if not isinstance(p, dict) or set(p) != fields or not isinstance(p["name"], str):
            raise SnapshotError("the snapshot's port statistics are malformed")
        ps = stats.port(_int(p["port"], "port", -1, 0xFFFF), p["name"])
        for f in ("reads", "writes", "time_ns", "timed"):
            setattr(ps, f, _int(p[f], "port statistics"))
    saved = _get(vmm, "devices", dict, "device states")
    present = devices(machine)
    missing = sorted(set(saved) - set(present))
    if missing:
        raise SnapshotError(
            f"the snapshot has devices this machine lacks: {', '.join(missing)} (add them "
            "before restoring)"
        )
    for key, device in present.items():
        if key in saved:
            try:
                device.restore_state(saved[key])
            except (KeyError, TypeError, ValueError) as e:
                raise SnapshotError(
                    f"the snapshot's state of device {key} is malformed: {e}"
                ) from None
