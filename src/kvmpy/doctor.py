"""What kind of host this is, and whether kvmpy can do its work here: which CPU backends are
usable (KVM, unicorn) and what each supports.

The host-kind probe matters because KVM hosts differ by orders of magnitude: on a VT-x/AMD-V
host guest code runs natively at every privilege level, while on KVM-PVM (a software, shadow-
paging nested hypervisor) guest ring-0 code is emulated instruction by instruction (~0.9 µs
each) and only ring-3 code runs natively. The probe times the same `dec ecx; jnz` loop at CPL0
and at CPL3 and compares.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
from dataclasses import asdict, dataclass, field

from .arch.x86.modes import Mode
from .errors import KvmpyError
from .hv.base import Capability
from .kvm import Cap, Kvm
from .loader import load_raw

# What kvmpy uses each capability for (kvmpy needs the first three; the rest enable features).
CAPABILITIES: list[tuple[Cap, str, bool]] = [
    (Cap.USER_MEMORY, "guest RAM from VMM memory", True),
    (Cap.SYNC_REGS, "one KVM_RUN per hypercall (registers in kvm_run)", True),
    (Cap.IMMEDIATE_EXIT, "preempting and pausing a vCPU from a signal", True),
    (Cap.IRQCHIP, "in-kernel LAPIC/IOAPIC (interrupts without Python)", False),
    (Cap.IRQFD, "irqfd doorbells into a guest", False),
    (Cap.IOEVENTFD, "ioeventfd doorbells out of a guest", False),
    (Cap.IRQ_ROUTING, "MSI routes for doorbells", False),
    (Cap.SIGNAL_MSI, "injecting an MSI from the VMM", False),
    (Cap.PIT2, "in-kernel PIT", False),
    (Cap.COALESCED_MMIO, "coalesced MMIO", False),
    (Cap.COALESCED_PIO, "coalesced port I/O", False),
    (Cap.READONLY_MEM, "read-only memslots", False),
    (Cap.MANUAL_DIRTY_LOG_PROTECT2, "dirty-log clearing for live migration", False),
    (Cap.DIRTY_LOG_RING, "dirty ring for live migration", False),
    (Cap.X2APIC_API, "x2APIC LAPIC state", False),
    (Cap.VCPU_EVENTS, "vCPU event state (snapshots)", False),
    (Cap.XSAVE, "XSAVE state (snapshots)", False),
    (Cap.XCRS, "XCR state (snapshots)", False),
    (Cap.ADJUST_CLOCK, "kvmclock state (snapshots)", False),
]


@dataclass
class Report:
    kvm_usable: bool
    kvm_error: str | None = None
    api_version: int | None = None
    capabilities: dict[str, dict] = field(default_factory=dict)
    missing_required: list[str] = field(default_factory=list)
    cpu_flags: dict[str, bool] = field(default_factory=dict)
    cpl0_ns_per_insn: float | None = None
    cpl3_ns_per_insn: float | None = None
    ring0_emulated: bool | None = None
    paged32_supported: bool | None = None
    host_kind: str = "unknown"
    host_summary: str = ""
    gcc: dict[str, bool] = field(default_factory=dict)
    #: name -> {"usable", "error", "supports", "lacks", ...} for every CPU backend.
    backends: dict[str, dict] = field(default_factory=dict)
    #: What `kvmpy boot` applies to Linux guests on this host (empty on VT-x/AMD-V).
    linux_profile: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def kvm_ok(self) -> bool:
        return self.kvm_usable and not self.missing_required

    @property
    def ok(self) -> bool:
        """kvmpy can run guests here (on KVM, or on the unicorn backend without it)."""
        return any(b["usable"] for b in self.backends.values()) or self.kvm_ok


def _loop_image(iterations: int) -> bytes:
    # mov ecx, N; 1: dec ecx; jnz 1b; (mov dh,5; mov dl,0; xor eax,eax; xor edi,edi; out dx,eax)
    return (
        b"\xb9" + struct.pack("<I", iterations) + b"\xff\xc9\x75\xfc"
        + b"\xb6\x05\xb2\x00\x31\xc0\x31\xff\xef"
    )  # fmt: skip


def _time_loop(kvm: Kvm | None, mode: Mode, iterations: int, accel: str = "kvm") -> float:
    """Nanoseconds per instruction of the loop (2 instructions per iteration)."""
    from .machine import Machine, MachineConfig

    with Machine(MachineConfig(mode=mode, memory="4M", accel=accel), kvm=kvm) as m:
        m.load(load_raw(_loop_image(iterations)))
        t0 = time.perf_counter_ns()
        result = m.run(timeout=30)
        dt = time.perf_counter_ns() - t0
    if result.stop_reason.value != "exit":
        raise KvmpyError(f"the {mode} probe stopped with {result.stop_reason}: {result.message}")
    return dt / (2 * iterations)


def _paged32_works(kvm: Kvm) -> bool:
    from .machine import Machine, MachineConfig

    with Machine(MachineConfig(mode=Mode.PAGED32, memory="4M"), kvm=kvm) as m:
        m.load(load_raw(_loop_image(1)))
        return m.run(timeout=10).stop_reason.value == "exit"


def _cpu_flags() -> dict[str, bool]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
            else:
                flags = set()
    except OSError:
        flags = set()
    return {name: name in flags for name in ("vmx", "svm", "hypervisor")}


def _gcc() -> dict[str, bool]:
    out = {"gcc": shutil.which("gcc") is not None}
    for flag in ("-m16", "-m32", "-m64"):
        ok = False
        if out["gcc"]:
            try:
                r = subprocess.run(
                    ["gcc", flag, "-ffreestanding", "-c", "-x", "c", "-", "-o", os.devnull],
                    input=b"int f(void){return 0;}",
                    capture_output=True,
                    timeout=30,
                )
                ok = r.returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
        out[flag] = ok
    return out


# KVM capabilities behind each backend capability (hv/kvm's mapping).
_KVM_FEATURES = {
    Capability.IRQCHIP: ("IRQCHIP",),
    Capability.PIT: ("PIT2",),
    Capability.IRQFD: ("IRQFD",),
    Capability.IOEVENTFD: ("IOEVENTFD",),
    Capability.MSI: ("SIGNAL_MSI", "IRQ_ROUTING"),
    Capability.COALESCED_IO: ("COALESCED_MMIO", "COALESCED_PIO"),
}


def _backends(rep: Report, measure: bool) -> dict[str, dict]:
    everything = sorted(c.value for c in Capability)
    if rep.kvm_ok:
        caps = {Capability.DIRTY_LOG, Capability.USERFAULTFD}
        if rep.paged32_supported is not False:
            caps.add(Capability.PAGED32)
        for cap, names in _KVM_FEATURES.items():
            if all(rep.capabilities.get(n, {}).get("value") for n in names):
                caps.add(cap)
        supports = sorted(c.value for c in caps)
        kvm = {"usable": True, "error": None, "supports": supports,
               "lacks": [c for c in everything if c not in supports]}  # fmt: skip
    else:
        error = rep.kvm_error or f"this KVM lacks {', '.join(rep.missing_required)}"
        kvm = {"usable": False, "error": error, "supports": [], "lacks": everything}
    from .hv.unicorn import CAPABILITIES, unavailable, unicorn_version

    problem = unavailable()
    supports = sorted(c.value for c in CAPABILITIES)
    uni: dict = {
        "usable": problem is None,
        "error": problem,
        "supports": supports if problem is None else [],
        "lacks": [c for c in everything if c not in supports] if problem is None else everything,
    }
    if problem is None:
        uni["version"] = unicorn_version()
        if measure:
            # The tightest loop there is: unicorn's worst case (a stop-request check per
            # translated block, here every 2 instructions); bench accel has a compute kernel.
            for key, mode in (
                ("cpl0_ns_per_insn", Mode.LONG),
                ("cpl3_ns_per_insn", Mode.LONG_USER),
            ):
                uni[key] = _time_loop(None, mode, 5_000_000, accel="unicorn")
    return {"kvm": kvm, "unicorn": uni}


def diagnose(measure: bool = True) -> Report:
    try:
        kvm = Kvm()
    except KvmpyError as e:
        rep = Report(kvm_usable=False, kvm_error=str(e), cpu_flags=_cpu_flags(), gcc=_gcc())
        rep.backends = _backends(rep, measure)
        return rep
    with kvm:
        rep = Report(kvm_usable=True, api_version=kvm.api_version(), cpu_flags=_cpu_flags())
        for cap, use, required in CAPABILITIES:
            value = kvm.check_extension(cap)
            rep.capabilities[cap.name] = {"value": value, "used_for": use, "required": required}
            if required and not value:
                rep.missing_required.append(cap.name)
        if measure and not rep.missing_required:
            rep.cpl0_ns_per_insn = _time_loop(kvm, Mode.LONG, 20_000)
            rep.cpl3_ns_per_insn = _time_loop(kvm, Mode.LONG_USER, 20_000_000)
            rep.paged32_supported = _paged32_works(kvm)
            ratio = rep.cpl0_ns_per_insn / max(rep.cpl3_ns_per_insn, 1e-3)
            rep.ring0_emulated = ratio > 20
    rep.gcc = _gcc()
    rep.backends = _backends(rep, measure)
    _classify(rep)
    return rep


def study_host() -> dict:
    """What a study's report says about the host it ran on: doctor's verdict (measured), the
    CPU model, the CPUs this process may use, the kernel, Python and the load average at the
    start (the labs and the ipc study add what is their own)."""
    import platform
    from pathlib import Path

    rep = diagnose(measure=True)
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "kind": rep.host_kind,
        "summary": rep.host_summary,
        "cpu_model": model,
        "cpus": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def linux_profile() -> list[str]:
    """What kvmpy applies to a Linux guest on a software host (boot/swhost.py), one item each."""
    from .boot.swhost import DEBIAN_SPEED_CMDLINE, SOFTWARE_HOST_CMDLINE, SPEED_CMDLINE

    return [
        "the vmlinux inside a bzImage is booted (the decompressor would run emulated)",
        f"command line: {SOFTWARE_HOST_CMDLINE}",
        f"speed only (--no-speed-cmdline leaves it out): {SPEED_CMDLINE}, and for a Debian "
        f"kernel {DEBIAN_SPEED_CMDLINE}",
        "CPUID.1 CX16 hidden",
        "emulation failures: int3 -> #BP injected, fwait skipped, clac/stac done by the VMM",
        "CPL3 syscall forwarded by a stub on the page-fault vector (installed at the LSTAR write)",
    ]


def _classify(rep: Report) -> None:
    hw = rep.cpu_flags.get("vmx") or rep.cpu_flags.get("svm")
    if rep.ring0_emulated:
        rep.host_kind = "software (KVM-PVM-like)"
        rep.host_summary = (
            f"Ring-0 guest code is emulated here: {rep.cpl0_ns_per_insn:.0f} ns per instruction "
            f"at CPL0 against {rep.cpl3_ns_per_insn:.2f} ns at CPL3 "
            f"({rep.cpl0_ns_per_insn / rep.cpl3_ns_per_insn:.0f}x). Run compute-heavy guests in "
            "long-user mode; keep ring-0 code short."
        )
        if not hw:
            rep.host_summary += " The CPU has no vmx/svm flag: this KVM is a nested, software one."
        rep.linux_profile = linux_profile()
        rep.host_summary += (
            " Linux guests (kvmpy boot) get the software-host profile here: "
            + "; ".join(rep.linux_profile)
            + " (docs/linux.md)."
        )
        uni = rep.backends.get("unicorn", {}).get("cpl0_ns_per_insn")
        if uni:
            rep.host_summary += (
                f" The unicorn backend (--accel unicorn) runs ring-0 code "
                f"{rep.cpl0_ns_per_insn / uni:.0f}x faster here."
            )
    elif rep.ring0_emulated is False:
        rep.host_kind = "hardware (VT-x/AMD-V)"
        rep.host_summary = (
            f"Guest code runs natively at every privilege level "
            f"({rep.cpl0_ns_per_insn:.2f} ns per instruction at CPL0, "
            f"{rep.cpl3_ns_per_insn:.2f} ns at CPL3). Linux guests boot without the "
            "software-host profile."
        )
    if rep.paged32_supported is False:
        rep.host_summary += (
            " 32-bit paging is not available (the paged32 mode stops with a host-limitation "
            "message)."
        )


_software_host: bool | None = None


def is_software_host(kvm: Kvm | None = None) -> bool:
    """Whether ring-0 guest code is emulated here (KVM-PVM-like), by the same CPL0/CPL3 timing
    probe as `kvmpy doctor` (~50 ms, once per process). KVMPY_SOFTWARE_HOST=1 or 0 overrides
    it (for tests of either profile on any host)."""
    global _software_host
    forced = os.environ.get("KVMPY_SOFTWARE_HOST")
    if forced in ("0", "1"):
        return forced == "1"
    if _software_host is None:
        own = kvm is None
        kvm = kvm or Kvm()
        try:
            cpl0 = _time_loop(kvm, Mode.LONG, 20_000)
            cpl3 = _time_loop(kvm, Mode.LONG_USER, 20_000_000)
        finally:
            if own:
                kvm.close()
        _software_host = cpl0 / max(cpl3, 1e-3) > 20
    return _software_host
