"""A machine's state besides its RAM, as one JSON-able dict (docs/persist.md):

    {"version": 2,
     "config": the machine's VmConfig: machine, boot source, devices (what to rebuild it from),
     "vm":     the backend VM's state (KVM: in-kernel irqchip, PIT, clock),
     "vcpus":  one dict per vCPU in the backends' shared CPU-state format (hv/base.py),
     "vmm":    kvmpy's own state: layout, exit statistics, SMP state, devices}

The backend parts are captured and applied by the backend (hv/kvm/state.py); this module is
the container and kvmpy's own part. Capturing needs every vCPU paused with its pending I/O
completed (`Machine.pause`); each vCPU's state is read in its own thread.

Restoring: each vCPU's state, then kvmpy's, then the VM's (KVM's clock last, just before the
vCPUs run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

from ..arch.x86.modes import Mode, SystemLayout
from ..errors import ConfigError
from ..machine import Machine
from ..stats import MAX_REASON, PortStats
from ..vmm.config import VmConfig
from .errors import SnapshotError

log = logging.getLogger(__name__)

#: Version of the layout of this dict; the snapshot format and the migration protocol carry it.
#: 2: N vCPUs (per-vCPU statistics, per-CPU layout, SMP state), backend-neutral VM state.
STATE_VERSION = 2


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


def config_to_dict(machine: Machine) -> dict[str, Any]:
    """The machine's whole VmConfig (machine, boot source, devices) as saved."""
    return machine.vm_config().to_dict()


def with_accel(config: VmConfig, accel: str) -> VmConfig:
    machine = dataclasses.replace(config.machine, accel=accel).validated()
    return dataclasses.replace(config, machine=machine)


def config_from_dict(d) -> VmConfig:
    """The machine to restore on. A KVM machine's state restores on KVM where /dev/kvm is
    usable and on unicorn elsewhere (the CPU-state format is shared); `kvmpy restore --accel`
    overrides it (`with_accel`)."""
    try:
        config = VmConfig.from_dict(d)
        if config.machine.accel == "kvm":
            config = with_accel(config, "auto")
        return config
    except ConfigError as e:
        raise SnapshotError(f"the snapshot's machine configuration is not usable: {e}") from None


# --- capture -------------------------------------------------------------------------------------


def devices_quiesced(machine: Machine, resume=None):
    """A context in which no device I/O thread touches guest RAM (the machine's virtio
    devices, if any: kvmpy.vmm.virtio.VirtioSet.quiesced)."""
    vset = getattr(machine, "virtio", None)
    if vset is None:
        return contextlib.nullcontext()
    return vset.quiesced(resume=resume)


def capture(machine: Machine) -> dict[str, Any]:
    """Everything but guest RAM. The vCPUs must be paused with their pending I/O completed."""
    if machine.boot is None:
        raise SnapshotError("the machine has not been loaded or restored; nothing to save")
    return {
        "version": STATE_VERSION,
        "config": config_to_dict(machine),
        "vm": machine.vm.save_state(),
        "vcpus": [machine.vcpu_call(i, v.save_state) for i, v in enumerate(machine.vcpus)],
        "vmm": capture_vmm(machine),
    }


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


def _stats_dict(stats) -> dict[str, Any]:
    return {
        "counts": list(stats.counts),
        "vmm_ns": list(stats.vmm_ns),
        "timed": list(stats.timed),
        "loop_ns": stats.loop_ns,
        "ports": [dataclasses.asdict(p) for p in stats.ports.values()],
        "fallbacks": dict(stats.fallbacks),
    }


def capture_vmm(machine: Machine) -> dict[str, Any]:
    return {
        "mode": machine.mode.value,
        "entry_ip": machine.entry_ip,
        "boot_rflags": machine.boot.regs.rflags,
        "layout": dataclasses.asdict(machine.layout),
        "output_bytes": machine.output_bytes,
        "stats": [_stats_dict(v.stats) for v in machine.vcpus],
        "smp": machine.smp.state(),
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
    for v, d in zip(machine.vcpus, vcpus, strict=True):
        v.restore_state(d)
    apply_vmm(machine, vmm)
    machine.vm.restore_state(vm)
    machine.mark_restored(layout, entry_ip, _int(vmm.get("boot_rflags", 2), "boot flags"))


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
    for f in names - {"page_tables", "cpus"}:
        _int(getattr(layout, f), f"layout field {f}")
    if not isinstance(layout.page_tables, list):
        raise SnapshotError("the snapshot's page table list is malformed")
    if (
        not isinstance(layout.cpus, list)
        or len(layout.cpus) != layout.ncpus
        or not all(isinstance(c, list) and len(c) == 4 for c in layout.cpus)
    ):
        raise SnapshotError("the snapshot's per-CPU layout is malformed")
    for c in layout.cpus:
        for x in c:
            _int(x, "per-CPU layout")
    return layout, _int(_get(vmm, "entry_ip", int, "entry point"), "entry point")


def _apply_stats(stats, st) -> None:
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
    fallbacks = st.get("fallbacks", {})
    if not isinstance(fallbacks, dict) or not all(isinstance(k, str) for k in fallbacks):
        raise SnapshotError("the snapshot's fallback counts are malformed")
    stats.fallbacks = {k: _int(v, "fallback count") for k, v in fallbacks.items()}


def apply_vmm(machine: Machine, vmm: dict) -> None:
    if _get(vmm, "mode", str, "CPU mode") != machine.mode.value:
        raise SnapshotError("the snapshot's CPU mode differs from its machine configuration")
    machine.output_bytes = _int(_get(vmm, "output_bytes", int, "output count"), "output count")
    stats = _get(vmm, "stats", list, "exit statistics")
    if len(stats) != len(machine.vcpus):
        raise SnapshotError("the snapshot's exit statistics do not match its vCPU count")
    for v, st in zip(machine.vcpus, stats, strict=True):
        _apply_stats(v.stats, st)
    smp = _get(vmm, "smp", dict, "SMP state")
    try:
        for key in ("parked", "waiting", "pending"):
            if len(_get(smp, key, list, f"SMP state ({key})")) != len(machine.vcpus):
                raise SnapshotError(f"the snapshot's SMP state ({key}) has the wrong length")
        machine.smp.restore(smp)
    except (TypeError, ValueError, IndexError):
        raise SnapshotError("the snapshot's SMP state is malformed") from None
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
