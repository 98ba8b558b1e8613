"""A Linux guest on a Machine: the PC platform Linux expects, its firmware tables, the boot,
and (on a software KVM host only) the software-host profile. docs/linux.md tells the story.

    config = linux_config("vmlinux", initrd="rootfs.cpio", vcpus=2)   # a VmConfig
    with builder.build(config) as m:             # attach() then load(): the builder calls them
        result = m.run()
    m.linux.milestones                           # first_line, run_init, init_marker (s)

What a Linux machine has, beyond kvmpy's bare machine:

* the in-kernel LAPIC, IOAPIC, 8259 and PIT (`VmConfig.validated` turns them on);
* legacy devices from the device registry (vmm/legacy.py), listed in the VmConfig so
  snapshots rebuild them: COM1, the i8042 (`reboot`), the CMOS clock, the ACPI PM1 block
  (`poweroff`);
* an MP table and ACPI tables (RSDP, XSDT, classic FADT, FACS, DSDT with `\\_S5`, MADT) for N
  CPUs, so Linux starts every application processor itself, through INIT/SIPI in the in-kernel
  LAPIC: kvmpy's SDK start-up (vmm/smp.py) is not used, the vCPU threads just enter KVM_RUN and
  the kernel holds the APs until their SIPI;
* a normalised CPUID per vCPU (`arch.x86.cpuid.linux_cpuid`: topology, no PV hypercalls kvmpy
  does not back);
* virtio-mmio devices on the free ISA IRQs, announced on the command line (see
  LINUX_MMIO_PINS), virtio-pci through the PCI host bridge;
* stop reasons: ACPI S5 -> `poweroff`, the i8042 reset -> `reboot`, a kernel panic ->
  `guest_panic` with the last console lines (boot/monitor.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..arch.x86.acpi import ACPI_TABLES_END, ACPI_TABLES_START, build_acpi_tables
from ..arch.x86.cpuid import linux_cpuid
from ..arch.x86.modes import BootState, Mode, SystemLayout
from ..arch.x86.mptable import MPTABLE_START, build_mptable
from ..arch.x86.vmem import Regime, VirtualMemory
from ..boot import swhost
from ..boot.linux import E820_ACPI, E820_RESERVED, Kernel, load_linux, open_kernel
from ..boot.monitor import ConsoleMonitor
from ..errors import ConfigError, KvmpyError
from ..hv.base import Capability, require
from ..kvm import structs as S
from ..memory import format_size
from ..result import StopReason
from .config import DEFAULT_LINUX_MEMORY, DeviceConfig, LinuxBoot, MachineConfig, VmConfig

if TYPE_CHECKING:
    from ..machine import Machine

log = logging.getLogger(__name__)

#: kvmpy's part of every Linux command line (the user's --append comes after it and wins):
#: the console on COM1 (and early messages before its driver), no KASLR (the syscall trap and
#: the boot protocol load at fixed addresses), reboot at once on a panic (the VMM reports it),
#: `/init` from the initramfs, and no work for devices that are not there. `mitigations=off`:
#: a VM of one's own code, and a software host pays for every mitigation in emulated ring 0.
BASE_CMDLINE = (
    "console=ttyS0 earlyprintk=serial,ttyS0,115200 nokaslr panic=-1 rdinit=/init "
    "mitigations=off init_on_alloc=0 8250.nr_uarts=1 audit=0 nowatchdog "
    "i8042.noaux i8042.nomux i8042.nopnp"
)
#: Without a PCI host bridge: skip the probe of 0xCF8 (and a PCI subsystem with nothing on it).
NO_PCI_CMDLINE = "pci=off"
PCI_NO_ACPI_CMDLINE = "pci=noacpi"

#: Guest-physical pages kvmpy keeps for itself (e820 reserved): the syscall trap's tables and
#: stub on a software host. Below the EBDA (MP table at 0x9FC00), above what Linux's real-mode
#: trampoline takes.
VMM_PAGES = 0x9B000

#: IOAPIC pins for a Linux guest's virtio-mmio devices: the ISA IRQs a PC leaves free (not the
#: timer 0, keyboard 1, cascade 2, COM2/COM1 3-4, RTC 8, ACPI SCI 9, FPU 13). A
#: `virtio_mmio.device=` entry names an IRQ number, and Linux has a descriptor only for the
#: ISA IRQs 0-15 and the pins its firmware table lists: with ACPI (the MADT) pins 16-23 exist
#: only for devices the DSDT declares, so an IRQ 16 from the command line fails to register.
#: ISA IRQs are edge-triggered and active high in both the MP table and ACPI's defaults, which
#: is what irqfd delivers. SDK guests keep 16-23 (vmm/virtio.py: their 8259 is never set up).
LINUX_MMIO_PINS = (5, 6, 7, 10, 11, 12, 14, 15)

#: The legacy devices of a Linux machine: (kind, id).
PLATFORM_DEVICES = (("serial", "com1"), ("i8042", "i8042"), ("cmos-rtc", "rtc"))
ACPI_DEVICE = ("acpi-pm", "acpi-pm")

_notice_lock = threading.Lock()
_noticed = False
_noticed_speed: set[str] = set()


def linux_config(
    kernel: str,
    *,
    initrd: str | None = None,
    cmdline: str = "",
    vcpus: int = 1,
    memory: int | str = DEFAULT_LINUX_MEMORY,
    acpi: bool = True,
    mptable: bool = True,
    speed_cmdline: bool = True,
    name: str = "linux",
) -> VmConfig:
    """A VmConfig for a Linux guest with kvmpy's platform devices (add virtio devices with
    `with_device`)."""
    machine = MachineConfig(mode=Mode.LONG, memory=memory, vcpus=vcpus, irqchip=True, pit=True,
                            name=name, accel="kvm")  # fmt: skip
    boot = LinuxBoot(os.path.abspath(kernel), os.path.abspath(initrd) if initrd else None,
                     cmdline, acpi, mptable, speed_cmdline)  # fmt: skip
    return with_platform_devices(VmConfig(machine, boot)).validated()


def with_platform_devices(config: VmConfig) -> VmConfig:
    """`config` with the legacy devices a Linux machine has, first, unless it lists them
    already (a snapshot's config, or a hand-written one that places them itself)."""
    boot = config.boot
    assert isinstance(boot, LinuxBoot)
    wanted = list(PLATFORM_DEVICES) + ([ACPI_DEVICE] if boot.acpi else [])
    have = {d.kind for d in config.devices}
    ids = {d.id for d in config.devices}
    missing = []
    for kind, id_ in wanted:
        if kind in have:
            continue
        if id_ in ids:
            raise ConfigError(f"device id {id_!r} is taken; kvmpy's {kind} device needs it")
        missing.append(DeviceConfig(kind, id_, {}))
    return replace(config, devices=(*missing, *config.devices))


@dataclass
class Milestones:
    """Seconds from the first KVM_RUN (and the process's CPU seconds) at each milestone."""

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)


class LinuxPlatform:
    """The Linux side of one machine (`machine.linux`)."""

    def __init__(self, machine: Machine, boot: LinuxBoot, software_host: bool):
        self.machine = machine
        self.boot = boot
        self.software_host = software_host
        self.monitor = ConsoleMonitor()
        self.cpu_at: dict[str, float] = {}
        self.swhost: SoftwareHostProfile | None = None
        self.cmdline = ""
        self.speed_cmdline = ""  # the speed-only switches added (set by load)
        self.kernel_info: dict[str, Any] = {}
        self._cpu0 = time.process_time()

    # --- attach: what every machine of this kind has, booted or restored ----------------------

    def attach(self) -> None:
        m = self.machine
        require(m.vm, Capability.IRQCHIP, "a Linux guest")
        hv = m.hv
        if not hasattr(hv, "supported_cpuid") or not hasattr(m.vm, "filter_msr_writes"):
            raise ConfigError(f"a Linux guest needs the KVM backend (this machine runs on "
                              f"{m.accel})")  # fmt: skip
        n = len(m.vcpus)
        supported = hv.supported_cpuid()
        for i, v in enumerate(m.vcpus):
            v.set_cpuid(linux_cpuid(supported, i, n, software_host=self.software_host))
        if self.software_host:
            _notice_software_host()
            self.swhost = SoftwareHostProfile(m, swhost.TrapPages.at(VMM_PAGES))
            self.swhost.install()
        m.output_watchers.append(self._on_output)
        m.on_guest_stop = self._on_guest_stop
        m.linux = self

    def _on_output(self, data: bytes) -> None:
        m = self.machine
        now = time.monotonic() - m.started_at if m.started_at is not None else 0.0
        before = len(self.monitor.milestones)
        ended = self.monitor.feed(data, now)
        if len(self.monitor.milestones) != before:
            cpu = time.process_time() - self._cpu0
            for name in self.monitor.milestones:
                self.cpu_at.setdefault(name, cpu)
        if ended is not None:
            m.request_stop(StopReason.GUEST_PANIC, ended.message)

    def _on_guest_stop(self, reason: StopReason, message: str) -> tuple[StopReason, str]:
        if reason is StopReason.REBOOT and self.monitor.panic is not None:
            # panic=-1: the kernel resets the machine right after its panic message.
            return StopReason.GUEST_PANIC, self.monitor.ended().message
        return reason, message

    @property
    def milestones(self) -> Milestones:
        return Milestones(dict(self.monitor.milestones), dict(self.cpu_at))

    # --- load: a fresh boot -------------------------------------------------------------------

    def load(self) -> None:
        m, boot = self.machine, self.boot
        n = len(m.vcpus)
        kernel = open_kernel(boot.kernel, use_vmlinux=self.software_host)
        self.speed_cmdline = speed_cmdline_for(boot, kernel, self.software_host)
        if self.speed_cmdline:
            _notice_speed_cmdline(self.speed_cmdline)
        initrd = _read_initrd(boot.initrd, m.memory.size) if boot.initrd else None
        reserved: list[tuple[int, int, int]] = []
        if self.swhost is not None:
            reserved.append((VMM_PAGES, VMM_PAGES + self.swhost.pages.size, E820_RESERVED))
        if boot.mptable:
            m.memory.write(MPTABLE_START, build_mptable(n))
        rsdp = None
        if boot.acpi:
            if not any(d.kind == ACPI_DEVICE[0] for d in m.device_configs):
                raise ConfigError("ACPI tables need the acpi-pm device (the FADT's PM1 block)")
            tables, rsdp = build_acpi_tables(n)
            m.memory.write(ACPI_TABLES_START, tables)
            reserved.append((ACPI_TABLES_START, ACPI_TABLES_END, E820_ACPI))
        self.cmdline = self.full_cmdline()
        lb = load_linux(m.memory, kernel, cmdline=self.cmdline, initrd=initrd,
                        reserved=reserved, acpi_rsdp=rsdp)  # fmt: skip
        bsp = m.vcpus[0]
        bsp.set_sregs(lb.sregs)
        bsp.set_regs(lb.regs)
        bsp.set_fpu(S.kvm_fpu(fcw=0x37F, mxcsr=0x1F80))
        # The application processors stay as KVM made them: waiting for INIT/SIPI in the
        # in-kernel LAPIC (their threads block inside KVM_RUN until the kernel starts them).
        layout = linux_layout()
        m.layout = layout
        m.boot = BootState(Mode.LONG, lb.regs, lb.sregs, layout)
        m.entry_ip = lb.entry
        self.kernel_info = {
            "kernel": boot.kernel,
            "format": "vmlinux" if kernel.vmlinux is not None else "bzImage",
            "from_bzimage": kernel.bzimage is not None,
            "entry": lb.entry,
            "kernel_range": list(lb.kernel_range),
            "initrd_range": list(lb.initrd_range) if lb.initrd_range else None,
            "cmdline": lb.cmdline.decode(),
        }

    def full_cmdline(self) -> str:
        m = self.machine
        parts = [BASE_CMDLINE]
        vset = getattr(m, "virtio", None)
        if vset is None or vset.pci is None:
            parts.append(NO_PCI_CMDLINE)
        elif self.boot.acpi:
            # Our DSDT declares no PCI root bridge (PNP0A03), and with ACPI x86 Linux scans only
            # the roots ACPI declares: it found no device. Without ACPI for PCI it probes bus 0
            # through 0xCF8 (measured: the devices bind, MSI-X works).
            parts.append(PCI_NO_ACPI_CMDLINE)
        if self.software_host:
            parts.append(swhost.SOFTWARE_HOST_CMDLINE)
            if self.speed_cmdline:
                parts.append(self.speed_cmdline)
        if vset is not None:
            parts += vset.cmdline
        if self.boot.cmdline:
            parts.append(self.boot.cmdline)
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        ms = self.milestones
        d: dict[str, Any] = {
            "software_host": self.software_host,
            "speed_cmdline": self.speed_cmdline,
            "milestones_s": {k: round(v, 3) for k, v in ms.wall.items()},
            "milestones_cpu_s": {k: round(v, 3) for k, v in ms.cpu.items()},
            **self.kernel_info,
        }
        if self.swhost is not None:
            d["syscall_trap"] = dict(self.swhost.trap)
        return d


def speed_cmdline_for(boot: LinuxBoot, kernel: Kernel, software_host: bool) -> str:
    """The speed-only switches for this kernel ("" for none): only on a software host, unless
    `boot.speed_cmdline` is off; a Debian kernel gets its initcall_blacklist too."""
    if not software_host or not boot.speed_cmdline:
        return ""
    h = kernel.header
    vmlinux = kernel.vmlinux.data if kernel.vmlinux is not None else None
    return swhost.speed_cmdline(swhost.is_debian_kernel(h.kernel_version if h else "", vmlinux))


def linux_layout() -> SystemLayout:
    """A Linux guest has none of kvmpy's own structures (GDT, IDT, stubs, per-CPU pages): the
    layout a snapshot records is empty."""
    return SystemLayout(ncpus=0)


def _read_initrd(path: str, memory_size: int) -> bytes:
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise ConfigError(f"initrd {path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"initrd {path}: {e.strerror}") from None
    if size >= memory_size:
        raise ConfigError(
            f"the initrd {path} ({format_size(size)}) does not fit in guest memory "
            f"({format_size(memory_size)}); give the guest more memory (--mem)"
        )
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"initrd {path}: {e.strerror}") from None


def _notice_speed_cmdline(line: str) -> None:
    with _notice_lock:
        if line in _noticed_speed:
            return
        _noticed_speed.add(line)
    log.warning(
        "speed-only kernel command line on this software host: '%s' (kernel text stays "
        "writable; --no-speed-cmdline, or boot.speed_cmdline false, leaves it out; "
        "docs/linux.md)",
        line,
    )


def _notice_software_host() -> None:
    global _noticed
    with _notice_lock:
        if _noticed:
            return
        _noticed = True
    log.warning(
        "software KVM host (ring-0 guest code is emulated): applying the software-host profile "
        "for Linux (docs/linux.md)"
    )


# --- the software-host profile -----------------------------------------------------------------


class SoftwareHostProfile:
    """The run-loop half of boot/swhost.py on a machine's KVM vCPUs: emulation-failure
    fallbacks, and the LSTAR write that installs the syscall trap. Each event is counted in the
    vCPU's exit statistics (`ExitStats.fallbacks`)."""

    def __init__(self, machine: Machine, pages: swhost.TrapPages):
        self.machine = machine
        self.pages = pages
        self._lock = threading.Lock()
        #: What the trap installation found (or why it was not installed).
        self.trap: dict[str, Any] = {}
        self.filtering = False

    def install(self) -> None:
        m = self.machine
        self.filtering = m.vm.filter_msr_writes([swhost.MSR_LSTAR])
        if not self.filtering:
            log.warning("this host's KVM has no MSR filter: user-space system calls cannot be "
                        "forwarded, and /init will crash at its first one")  # fmt: skip
        for v in m.vcpus:
            v.on_emulation_failure = self.emulation_failure
            v.on_msr_write = self.msr_write

    def emulation_failure(self, vcpu, insn: bytes | None) -> bool:
        if not insn:
            return False
        sregs = vcpu.get_sregs()
        fb = swhost.emulation_fallback(insn, sregs.cs.selector & 3)
        if fb is None:
            return False
        regs = vcpu.get_regs()
        regs.rip, regs.rflags = fb.apply(regs.rip, regs.rflags)
        vcpu.set_regs(regs)
        if fb.inject_vector is not None:
            vcpu.inject_exception(fb.inject_vector)
        vcpu.stats.count_fallback(fb.name)
        return True

    def msr_write(self, vcpu, index: int, value: int) -> bool:
        if index != swhost.MSR_LSTAR:
            return False
        if vcpu.set_msrs({index: value}) != 1:
            return False
        vcpu.stats.count_fallback("lstar_write")
        with self._lock:
            if "stub_va" not in self.trap and "error" not in self.trap:
                self._install_trap(vcpu, value)
        return True

    def _install_trap(self, vcpu, lstar: int) -> None:
        m = self.machine
        sregs = vcpu.get_sregs()
        vmem = VirtualMemory(m.memory, Regime.from_sregs(sregs))
        try:
            plan = swhost.plan_syscall_trap(
                lstar=lstar, cr3=sregs.cr3, cr4=sregs.cr4, idt_base=sregs.idt.base,
                idt_limit=sregs.idt.limit, read_phys=m.memory.read, translate=vmem.translate,
                pages=self.pages,
            )  # fmt: skip
        except swhost.TrapInstalled:
            self.trap.update(stub_va="installed before", lstar=hex(lstar))
            return
        except (swhost.TrapError, KvmpyError) as e:
            # The boot goes on; the first system call from user space will show the problem.
            self.trap["error"] = str(e)
            log.warning("the syscall trap was not installed: %s", e)
            return
        for gpa, data in plan.writes:
            m.memory.write(gpa, data)
        vcpu.stats.count_fallback("syscall_trap_installed")
        self.trap.update(stub_va=hex(plan.stub_va), pf_handler=hex(plan.pf_handler),
                         lstar=hex(lstar), slot=plan.slot)  # fmt: skip


# --- the builder's entry points ------------------------------------------------------------------


def attach(machine: Machine, boot: LinuxBoot, *, software_host: bool | None = None) -> None:
    """Make `machine` a Linux machine (before its config's devices are added)."""
    if software_host is None:
        from ..doctor import is_software_host

        software_host = is_software_host()
    LinuxPlatform(machine, boot, software_host).attach()
    _prepare_virtio(machine)


def _prepare_virtio(machine: Machine) -> None:
    """A Linux guest's virtio-mmio devices go on the free ISA IRQs (LINUX_MMIO_PINS)."""
    from .virtio import set_mmio_pins

    set_mmio_pins(machine, LINUX_MMIO_PINS)


def load(machine: Machine, boot: LinuxBoot) -> None:
    platform = machine.linux
    if platform is None:
        attach(machine, boot)
        platform = machine.linux
    platform.load()
