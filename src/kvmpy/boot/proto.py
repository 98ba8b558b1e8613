"""A Linux boot prototype on today's single-vCPU `Machine`: the pieces of issue 10 wired
together to measure them on our hosts before the platform layer (N vCPUs, interrupt owner,
event loop, `kvmpy boot`) lands. Not a public interface: `kvmpy boot` replaces it.

    from kvmpy.boot.proto import boot
    r = boot("vmlinux", initrd=cpio_bytes, script=["uname -a", "poweroff -f"], timeout=120)
    print(r.milestones, r.fallbacks, r.stop.reason)

Console output goes to `console` (a callable taking bytes) and is searched for milestones;
`script` lines are typed into the UART one at a time, each after a shell prompt.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..arch.x86.acpi import (
    ACPI_TABLES_START,
    PM1_EVT_PORT,
    PM_PORTS,
    PmControl,
    build_acpi_tables,
)
from ..arch.x86.cpuid import linux_cpuid
from ..arch.x86.modes import BootState, Mode, SystemLayout
from ..arch.x86.mptable import MPTABLE_START, build_mptable
from ..arch.x86.vmem import Regime, VirtualMemory
from ..devices import PowerOff, Reset
from ..devices.legacy.i8042 import COMMAND_PORT, DATA_PORT, I8042, KBD_IRQ
from ..devices.legacy.rtc import INDEX_PORT, CmosRtc
from ..devices.legacy.serial import COM1_IRQ, COM1_PORT, Serial16550
from ..doctor import is_software_host
from ..kvm import Cap
from ..kvm import constants as K
from ..kvm import structs as S
from ..machine import Machine, MachineConfig
from ..result import Stop, StopReason
from . import swhost
from .initramfs import INIT_MARKER
from .linux import E820_RESERVED, load_linux, open_kernel

log = logging.getLogger(__name__)

#: Guest-physical pages the VMM keeps for itself (e820 reserved): the syscall trap's tables and
#: stub. Below the EBDA, above everything Linux's real-mode trampoline needs.
VMM_PAGES = 0x9B000
BASE_CMDLINE = (
    "console=ttyS0 earlyprintk=serial,ttyS0,115200 nokaslr panic=-1 rdinit=/init "
    "mitigations=off pci=off init_on_alloc=0 8250.nr_uarts=1 audit=0 nowatchdog "
    "i8042.noaux i8042.nomux i8042.nopnp"
)


class IrqLine:
    """An ISA interrupt line driven through KVM_IRQ_LINE (the in-kernel PIC and IOAPIC)."""

    def __init__(self, vm, gsi: int) -> None:
        self.vm, self.gsi = vm, gsi
        self.raised = 0

    def set_level(self, level: bool) -> None:
        self.raised += bool(level)
        self.vm.irq_line(self.gsi, int(level))

    def trigger(self) -> None:
        self.vm.irq_line(self.gsi, 1)
        self.vm.irq_line(self.gsi, 0)


@dataclass
class ProtoResult:
    stop: Stop
    milestones: dict[str, float]
    #: The same milestones in vCPU-thread CPU seconds (see _Console).
    cpu_milestones: dict[str, float]
    fallbacks: Counter
    exits: dict
    output: bytes
    duration: float
    software_host: bool
    trap: dict = field(default_factory=dict)
    kvm_run_s: float = 0.0
    #: Times each device interrupt line was raised.
    irqs: dict = field(default_factory=dict)
    #: (rip, kernel-text words from the stack...) -> samples, when boot(sample_hz=...) ran.
    samples: Counter = field(default_factory=Counter)


class _LinuxMachine(Machine):
    def apply_effect(self, effect) -> None:
        if isinstance(effect, Reset):
            self.vcpu.request_stop(
                StopReason.RESET, f"the guest reset the machine ({effect.source})"
            )
        elif isinstance(effect, PowerOff):
            self.vcpu.request_stop(StopReason.EXIT, "the guest powered off")
        else:
            super().apply_effect(effect)


class _Console:
    """Watches console output for milestones and types the script."""

    def __init__(self, t0: float, script: list[str], sink, uart: Serial16550) -> None:
        self.t0, self.script, self.sink, self.uart = t0, list(script), sink, uart
        self.milestones: dict[str, float] = {}
        # The vCPU thread's CPU time (guest time inside KVM_RUN counts as the thread's) at each
        # milestone: on a shared, loaded machine wall time stretches, this much less.
        self.cpu_milestones: dict[str, float] = {}
        self.cpu0 = time.thread_time()
        self.tail = bytearray()
        self.ready = False

    def _mark(self, name: str, now: float) -> None:
        if name not in self.milestones:
            self.milestones[name] = now
            self.cpu_milestones[name] = time.thread_time() - self.cpu0

    def __call__(self, data: bytes) -> None:
        now = time.perf_counter() - self.t0
        self._mark("first_output", now)
        self.tail += data
        del self.tail[:-4096]
        if "run_init" not in self.milestones and b"Run /init" in self.tail:
            self._mark("run_init", now)
        if "init_marker" not in self.milestones and INIT_MARKER.encode() in self.tail:
            self._mark("init_marker", now)
            self.ready = True
        if self.sink is not None:
            self.sink(data)
        if self.ready and self.script and self.tail.endswith(b"# "):
            line = self.script.pop(0)
            self._mark(f"cmd:{line}", now)
            self.tail.clear()
            self.uart.push_input(line.encode() + b"\n")


def boot(
    kernel: str | Path,
    *,
    initrd: bytes | None = None,
    append: str = "",
    memory: str = "256M",
    timeout: float = 300,
    script: list[str] = (),  # type: ignore[assignment]
    console=None,
    software_host: bool | None = None,
    mptable: bool = True,
    acpi: bool = True,
    sample_hz: float = 0.0,
) -> ProtoResult:
    sw = is_software_host() if software_host is None else software_host
    k = open_kernel(kernel, use_vmlinux=sw)
    cmdline = " ".join(
        x for x in (BASE_CMDLINE, swhost.SOFTWARE_HOST_CMDLINE if sw else "", append) if x
    )
    m = _LinuxMachine(
        MachineConfig(mode="long", memory=memory, irqchip=True, pit=True), capture_output=True
    )
    fallbacks: Counter = Counter()
    trap_info: dict = {}
    try:
        fd = m.vcpu.fd
        fd.set_cpuid2(linux_cpuid(m.kvm.supported_cpuid(), 0, 1, software_host=sw))
        uart_irq = IrqLine(m.vm, COM1_IRQ)
        uart = Serial16550(uart_irq)
        m.add_pio_device(COM1_PORT, 8, uart)
        kbd = I8042(IrqLine(m.vm, KBD_IRQ))
        m.add_pio_device(DATA_PORT, 1, kbd.port_device(DATA_PORT))
        m.add_pio_device(COMMAND_PORT, 1, kbd.port_device(COMMAND_PORT))
        m.add_pio_device(INDEX_PORT, 2, CmosRtc())
        reserved = [(VMM_PAGES, VMM_PAGES + swhost.TrapPages.at(VMM_PAGES).size, E820_RESERVED)]
        if mptable:
            m.memory.write(MPTABLE_START, build_mptable(1))
        rsdp = None
        if acpi:
            tables, rsdp = build_acpi_tables(1)
            m.memory.write(ACPI_TABLES_START, tables)
            m.add_pio_device(PM1_EVT_PORT, PM_PORTS, PmControl())
        lb = load_linux(
            m.memory, k, cmdline=cmdline, initrd=initrd, reserved=reserved, acpi_rsdp=rsdp
        )
        fd.set_sregs(lb.sregs)
        fd.set_regs(lb.regs)
        fd.set_fpu(S.kvm_fpu(fcw=0x37F, mxcsr=0x1F80))
        m.boot = BootState(Mode.LONG, lb.regs, lb.sregs, SystemLayout())
        m.entry_ip = lb.entry
        if sw:
            _install_software_host(m, fallbacks, trap_info)
        t0 = time.perf_counter()
        watcher = _Console(t0, script, console, uart)
        watcher.cpu0 = time.thread_time()
        m._sink = watcher
        samples: Counter = Counter()
        on_pause = None
        if sample_hz:
            # A poor man's profiler: kick the vCPU out of KVM_RUN and note where it was.
            import threading

            stop_sampling = threading.Event()

            def sampler() -> None:
                while not stop_sampling.wait(1 / sample_hz):
                    m.vcpu.request_pause(kick=True)

            def on_pause():
                regs = m.vcpu.fd.get_regs()
                key: tuple = (regs.rip,)
                if regs.rip >> 47:
                    # Kernel code: kernel-text words on the stack stand in for a call chain
                    # (the guess unwinder's method), enough to tell callers apart.
                    try:
                        vm = VirtualMemory(m.memory, Regime.from_sregs(m.vcpu.fd.get_sregs()))
                        raw = vm.read_partial(regs.rsp, 512)
                        words = [
                            int.from_bytes(raw[i : i + 8], "little")
                            for i in range(0, len(raw) - 7, 8)
                        ]
                        key += tuple(w for w in words if w >> 31 == 0x1_FFFF_FFFF)[:6]
                    except Exception:  # noqa: BLE001 - a sample is best effort
                        pass
                samples[key] += 1
                return None

            threading.Thread(target=sampler, daemon=True).start()
        try:
            result = m.run(timeout=timeout, on_pause=on_pause)
        finally:
            if sample_hz:
                stop_sampling.set()
        duration = time.perf_counter() - t0
        stats = m.vcpu.stats
        return ProtoResult(
            stop=m.vcpu.stopped,
            milestones=watcher.milestones,
            cpu_milestones=watcher.cpu_milestones,
            fallbacks=fallbacks,
            exits=dict(result.exits),
            output=m.output,
            duration=duration,
            software_host=sw,
            trap=trap_info,
            kvm_run_s=(stats.loop_ns - sum(stats.vmm_ns)) / 1e9,
            samples=samples,
            irqs={"serial": uart_irq.raised, "i8042": kbd.irq.raised},
        )
    finally:
        m.close()


def _install_software_host(m: Machine, fallbacks: Counter, trap_info: dict) -> None:
    vm = m.vm
    if not (vm.check_extension(Cap.X86_USER_SPACE_MSR) and vm.check_extension(Cap.X86_MSR_FILTER)):
        log.warning("no MSR filter on this host: user-space system calls cannot be forwarded")
    else:
        vm.enable_cap(Cap.X86_USER_SPACE_MSR, K.KVM_MSR_EXIT_REASON_FILTER)
        vm.set_msr_filter([(K.KVM_MSR_FILTER_WRITE, swhost.MSR_LSTAR, 1, b"\x00")])
    pages = swhost.TrapPages.at(VMM_PAGES)

    def on_wrmsr(vcpu) -> Stop | None:
        msr = vcpu.fd.run_struct.msr
        if msr.index != swhost.MSR_LSTAR:
            msr.error = 1
            return None
        value = msr.data
        vcpu.fd.set_msrs({swhost.MSR_LSTAR: value})
        msr.error = 0
        fallbacks["lstar_write"] += 1
        if "stub_va" in trap_info:
            return None
        sregs = vcpu.fd.get_sregs()
        vmem = VirtualMemory(m.memory, Regime.from_sregs(sregs))
        try:
            plan = swhost.plan_syscall_trap(
                lstar=value,
                cr3=sregs.cr3,
                cr4=sregs.cr4,
                idt_base=sregs.idt.base,
                idt_limit=sregs.idt.limit,
                read_phys=m.memory.read,
                translate=vmem.translate,
                pages=pages,
            )
        except (swhost.TrapError, Exception) as e:  # noqa: BLE001 - reported, boot goes on
            trap_info["error"] = str(e)
            log.warning("syscall trap not installed: %s", e)
            return None
        for gpa, data in plan.writes:
            m.memory.write(gpa, data)
        trap_info.update(
            stub_va=hex(plan.stub_va), pf_handler=hex(plan.pf_handler), lstar=hex(value),
            slot=plan.slot,
        )  # fmt: skip
        return None

    def on_internal_error(vcpu) -> Stop | None:
        run = vcpu.fd.run_struct
        ef = run.emulation_failure
        insn = b""
        if (
            run.internal.suberror == K.KVM_INTERNAL_ERROR_EMULATION
            and ef.flags & K.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
        ):
            insn = bytes(ef.insn_bytes[: min(ef.insn_size, 15)])
        sregs = vcpu.fd.get_sregs()
        fb = swhost.emulation_fallback(insn, sregs.cs.selector & 3)
        if fb is None:
            return vcpu._internal_error(run)
        fallbacks[fb.name] += 1
        regs = vcpu.fd.get_regs()
        regs.rip, regs.rflags = fb.apply(regs.rip, regs.rflags)
        vcpu.fd.set_regs(regs)
        if fb.inject_vector is not None:
            ev = vcpu.fd.get_vcpu_events()
            ev.exception.injected = 1
            ev.exception.nr = fb.inject_vector
            ev.exception.has_error_code = 0
            ev.exception.pending = 0
            vcpu.fd.set_vcpu_events(ev)
        return None

    m.exit_handlers[K.ExitReason.X86_WRMSR] = on_wrmsr
    m.exit_handlers[K.ExitReason.INTERNAL_ERROR] = on_internal_error
