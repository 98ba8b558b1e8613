"""A machine: guest memory, vCPUs, buses and devices, assembled from a config.

    from kvmpy.machine import Machine, MachineConfig

    with Machine(MachineConfig(mode="long-user", memory="64M")) as m:
        m.load_file("hello.elf")
        m.hypercalls.register(10, lambda ctx, a0, *_: a0 * 2, "double")
        result = m.run()
    print(result.stop_reason, result.exit_code, result.exits, result.regs["rax"])

The builder order follows Firecracker's: validate the config, create the VM and its memory,
then vCPUs and devices; loading an image places kvmpy's own structures around it and sets the
entry state.
"""

from __future__ import annotations

import logging
import signal
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from .arch.x86 import gdt as G
from .arch.x86 import modes
from .arch.x86.cpuid import vcpu_cpuid
from .arch.x86.modes import BootState, Mode, SystemLayout
from .bus import MmioBus, PortBus
from .devices import Device, Effect
from .devices.debugcon import PORT as DEBUGCON_PORT
from .devices.debugcon import DebugConsole
from .errors import ConfigError
from .hypercalls import PORT as HYPERCALL_PORT
from .hypercalls import Hypercalls
from .kvm import Cap, Kvm
from .kvm import structs as S
from .loader import Image, load_file
from .memory import PAGE_SIZE, GuestMemory, parse_size
from .result import RunResult, Stop, StopReason
from .vcpu import Vcpu, install_kick_handler

log = logging.getLogger(__name__)

# x86 keeps [3 GiB, 4 GiB) for MMIO (LAPIC, IOAPIC, PCI holes); RAM beyond 3 GiB continues
# at 4 GiB, as on PCs and in Firecracker.
MMIO_HOLE_START = 3 << 30
MMIO_HOLE_END = 4 << 30
# Where KVM puts the real-mode TSS and identity map on Intel hosts without unrestricted guest;
# QEMU's addresses, inside the MMIO hole so they never collide with RAM.
KVM_TSS_ADDR = 0xFFFB_D000
KVM_IDENTITY_MAP_ADDR = 0xFFFB_C000

MAX_MEMORY = 1 << 40
MIN_MEMORY = 1 << 20

MSR_IA32_APIC_BASE = 0x1B
APIC_BASE_BSP = 1 << 8
APIC_BASE_EXTD = 1 << 10  # x2APIC: KVM-PVM shuts the vCPU down on xAPIC MMIO writes
APIC_BASE_ENABLE = 1 << 11
APIC_DEFAULT_BASE = 0xFEE0_0000
APIC_REG_SVR = 0xF0
APIC_SVR_ENABLE = 1 << 8


@dataclass(frozen=True)
class MachineConfig:
    mode: Mode | str = Mode.LONG
    memory: int | str = "64M"
    vcpus: int = 1
    #: In-kernel LAPIC/IOAPIC/PIC. With it, `hlt` sleeps in the kernel instead of stopping the VM.
    irqchip: bool = False
    #: In-kernel PIT (needs irqchip).
    pit: bool = False
    name: str = "vm"

    def validated(self) -> MachineConfig:
        mode = Mode.parse(self.mode) if isinstance(self.mode, str) else self.mode
        size = parse_size(self.memory)
        if size < MIN_MEMORY:
            raise ConfigError(f"guest memory must be at least 1M (got {self.memory})")
        if size > MAX_MEMORY:
            raise ConfigError(f"guest memory must be at most 1T (got {self.memory})")
        if size % PAGE_SIZE:
            raise ConfigError(f"guest memory must be a multiple of 4K (got {self.memory})")
        if self.vcpus != 1:
            raise ConfigError("kvmpy runs one vCPU per machine so far (SMP guests are planned)")
        if self.pit and not self.irqchip:
            raise ConfigError("the in-kernel PIT needs the in-kernel irqchip (irqchip=True)")
        return MachineConfig(mode, size, self.vcpus, self.irqchip, self.pit, self.name)


def ram_layout(size: int) -> list[tuple[int, int]]:
    """(gpa, size) of the RAM regions for `size` bytes of guest memory."""
    if size <= MMIO_HOLE_START:
        return [(0, size)]
    return [(0, MMIO_HOLE_START), (MMIO_HOLE_END, size - MMIO_HOLE_START)]


class HypercallPort(Device):
    """Port 0x500 on the bus. The run loop handles hypercalls itself; this only answers the
    odd accesses (an `in`, a string `out`) the fast path does not take."""

    name = "hypercall"

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size


class Machine:
    def __init__(
        self,
        config: MachineConfig | None = None,
        *,
        kvm: Kvm | None = None,
        console: Callable[[bytes], None] | BinaryIO | None = None,
        capture_output: bool = True,
        capture_limit: int = 1 << 20,
    ):
        self.config = config = (config or MachineConfig()).validated()
        self.mode: Mode = config.mode  # type: ignore[assignment]
        self._own_kvm = kvm is None
        self.kvm = kvm or Kvm()
        self.vm = None
        self.memory = GuestMemory()
        self.vcpus: list[Vcpu] = []
        self.pio_bus = PortBus()
        self.mmio_bus = MmioBus()
        self.hypercalls = Hypercalls()
        #: Handlers for rare exit reasons (KVM_EXIT_*), called as handler(vcpu) -> Stop | None
        #: before kvmpy's own handling; see Vcpu._slow_exit.
        self.exit_handlers: dict[int, Callable[[Vcpu], Stop | None]] = {}
        self.layout: SystemLayout | None = None
        self.boot: BootState | None = None
        self.image: Image | None = None
        self.entry_ip = 0
        # The guest decides how much it prints: keep only the last `capture_limit` bytes so a
        # guest that prints forever cannot grow the VMM's memory without bound.
        self._output = bytearray() if capture_output else None
        self._capture_limit = max(0, capture_limit)
        self._sink = _sink(console)
        #: Bytes the guest has output so far (a restored machine continues the count).
        self.output_bytes = 0
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # --- construction --------------------------------------------------------------------------

    def _build(self) -> None:
        c = self.config
        self.vm = vm = self.kvm.create_vm()
        for cap in (Cap.SYNC_REGS, Cap.IMMEDIATE_EXIT, Cap.USER_MEMORY):
            if not self.kvm.check_extension(cap):
                raise ConfigError(f"this host's KVM lacks {cap.name}, which kvmpy needs")
        vm.set_tss_addr(KVM_TSS_ADDR)
        vm.set_identity_map_addr(KVM_IDENTITY_MAP_ADDR)
        for i, (gpa, size) in enumerate(ram_layout(c.memory)):  # type: ignore[arg-type]
            self.memory.add_region(gpa, size, name=f"ram{i}")
        self.memory.attach(vm)
        if c.irqchip:
            vm.create_irqchip()
            if c.pit:
                vm.create_pit2()
        cpuid = self.kvm.supported_cpuid()
        for i in range(c.vcpus):
            fd = vm.create_vcpu(i)
            fd.set_cpuid2(vcpu_cpuid(cpuid, i))
            self.vcpus.append(Vcpu(self, fd))
        install_kick_handler()
        self.debugcon = DebugConsole()
        self.add_pio_device(DEBUGCON_PORT, 1, self.debugcon)
        self.add_pio_device(HYPERCALL_PORT, 4, HypercallPort())

    def add_pio_device(self, base: int, length: int, device: Device) -> None:
        self.pio_bus.register(base, length, device)

    def add_mmio_device(self, base: int, length: int, device: Device) -> None:
        if self.memory.is_ram(base) or self.memory.is_ram(base + length - 1):
            raise ConfigError(f"MMIO range of {device.name} at {base:#x} overlaps guest RAM")
        self.mmio_bus.register(base, length, device)

    @property
    def vcpu(self) -> Vcpu:
        return self.vcpus[0]

    # --- loading -------------------------------------------------------------------------------

    def load_file(self, path, load_addr: int | None = None, entry: int | None = None) -> Image:
        image = load_file(path, load_addr, entry)
        self.load(image)
        return image

    def load(self, image: Image, reserved: Sequence[tuple[int, int]] = ()) -> None:
        """Put `image` in RAM, build the mode's structures around it and set the entry state.

        kvmpy's structures also stay out of the `reserved` [start, end) ranges: memory the
        caller gives a meaning, such as a region shared with another VM."""
        image.check_mode(self.mode)
        image.place(self.memory)
        self.image = image
        boot = modes.build(
            self.mode,
            self.memory,
            image.entry,
            [*image.ranges(), *reserved],
            interrupts=self.config.irqchip,
            use_1g_pages=self.kvm.cpuid_supports_1g_pages(),
        )
        self.boot, self.layout = boot, boot.layout
        self.entry_ip = boot.regs.rip
        fd = self.vcpu.fd
        fd.set_sregs(boot.sregs)
        fd.set_regs(boot.regs)
        fpu = S.kvm_fpu(fcw=0x37F, mxcsr=0x1F80)
        fd.set_fpu(fpu)
        if self.config.irqchip:
            self._enable_x2apic(fd)

    def mark_restored(self, layout: SystemLayout, entry_ip: int) -> None:
        """Make the machine runnable without `load()`: the caller (kvmpy.persist, restoring a
        snapshot or receiving a migration) has put back guest memory and the vCPU state, so
        the vCPU goes on where it was. `layout` and `entry_ip` are what `load()` recorded in
        the original machine; fault reports and the paged32 host check need them."""
        self.layout = layout
        self.entry_ip = entry_ip
        fd = self.vcpu.fd
        self.boot = BootState(self.mode, fd.get_regs(), fd.get_sregs(), layout)

    def _enable_x2apic(self, fd) -> None:
        base = APIC_DEFAULT_BASE | APIC_BASE_ENABLE | APIC_BASE_EXTD | APIC_BASE_BSP
        if fd.set_msrs({MSR_IA32_APIC_BASE: base}) != 1:
            raise ConfigError("KVM refused to switch the LAPIC to x2APIC mode")
        lapic = fd.get_lapic()
        # Through the raw buffer: ctypes hands a c_char array field out as bytes cut at the
        # first NUL (offset 0 of the LAPIC page is zero), so `lapic.regs` is empty.
        raw = memoryview(lapic).cast("B")
        svr = int.from_bytes(raw[APIC_REG_SVR : APIC_REG_SVR + 4], "little")
        raw[APIC_REG_SVR : APIC_REG_SVR + 4] = (svr | APIC_SVR_ENABLE | 0xFF).to_bytes(4, "little")
        raw.release()
        fd.set_lapic(lapic)

    def set_interrupt_handler(self, vector: int, address: int, *, dpl: int = 0) -> None:
        """Point IDT vector `vector` at guest code at `address` (after `load`), in place of
        kvmpy's stub that stops the VM.

        The handler runs in ring 0 on kvmpy's code segment, through an interrupt gate (IF
        clear on entry) and, in long modes, on the ring-0 stack of the TSS (no IST). `dpl=3`
        lets CPL3 code reach it with a software interrupt (`int3`). A guest publishes its
        handler's address through an ELF symbol; kvmpy installs it, because a CPL3 guest
        cannot write its IDT (long-user maps it supervisor-only) or run `lidt`."""
        if self.layout is None:
            raise ConfigError("load an image before installing interrupt handlers")
        if not 0 <= vector <= 255:
            raise ConfigError(f"interrupt vector {vector} is outside 0..255")
        if not 0 <= dpl <= 3:
            raise ConfigError(f"gate DPL {dpl} is outside 0..3")
        if not self.memory.is_ram(address):
            raise ConfigError(f"interrupt handler address {address:#x} is not guest RAM")
        bits = self.mode.bits
        if bits == 64:
            gate = G.gate64(address, modes.SEL_KCODE, dpl=dpl)
        elif bits == 32:
            if address >= 1 << 32:
                raise ConfigError(f"interrupt handler address {address:#x} is above 4 GiB")
            gate = G.gate32(address, modes.SEL_KCODE, dpl=dpl)
        else:
            if address >= 1 << 20:
                raise ConfigError(f"real-mode handler address {address:#x} is above 1 MiB")
            segment = (address >> 4) & 0xF000
            gate = struct.pack("<HH", address - (segment << 4), segment)
        self.memory.write(self.layout.idt + vector * len(gate), gate)

    # --- output --------------------------------------------------------------------------------

    def console_write(self, data: bytes) -> None:
        self.output_bytes += len(data)
        out = self._output
        if out is not None:
            out += data
            # Trim in big steps (not per write) so capturing stays amortized O(1) per byte.
            if len(out) > 2 * self._capture_limit:
                del out[: len(out) - self._capture_limit]
        if self._sink is not None:
            self._sink(data)

    @property
    def output(self) -> bytes:
        """What the guest printed: all of it, or the last `capture_limit` bytes if it printed
        more (`output_bytes` counts everything)."""
        out = self._output
        if not out:
            return b""
        return bytes(out[-self._capture_limit :]) if self._capture_limit else b""

    def apply_effect(self, effect: Effect) -> None:
        raise NotImplementedError(f"no handler for device effect {effect!r}")

    # --- running -------------------------------------------------------------------------------

    def run(
        self,
        timeout: float | None = None,
        *,
        handle_sigint: bool = False,
        on_pause: Callable[[], Stop | None] | None = None,
    ) -> RunResult:
        """Run until the guest stops. `timeout` (seconds) and `handle_sigint` use signals and
        so work from the main thread only.

        A pause (`vcpu.request_pause`) normally just re-enters the guest. With `on_pause`, it
        is called instead, with the vCPU out of KVM_RUN and its pending I/O completed, so it
        can read or save the vCPU's state and block until the VM should go on; a Stop it
        returns ends the run (a control channel pausing, snapshotting or migrating the VM)."""
        if self.boot is None:
            raise ConfigError("load an image before running the machine")
        vcpu = self.vcpu
        main = threading.current_thread() is threading.main_thread()
        if (timeout or handle_sigint) and not main:
            raise ConfigError("timeout and Ctrl-C handling need the main thread")
        old_alarm = old_int = None
        if timeout:
            old_alarm = signal.signal(
                signal.SIGALRM,
                lambda *_: vcpu.request_stop(
                    StopReason.TIMEOUT, f"time limit of {timeout:g} s reached"
                ),
            )
            signal.setitimer(signal.ITIMER_REAL, timeout)
        if handle_sigint:
            old_int = signal.signal(
                signal.SIGINT,
                lambda *_: vcpu.request_stop(StopReason.INTERRUPTED, "interrupted (Ctrl-C)"),
            )
        t0 = time.perf_counter()
        try:
            stop = None
            while stop is None:
                stop = vcpu.run()
                if stop is None and on_pause is not None:
                    vcpu.complete_pending_io()
                    stop = on_pause()
                    if stop is not None:
                        vcpu.stopped = stop
        finally:
            if timeout:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old_alarm)
            if handle_sigint:
                signal.signal(signal.SIGINT, old_int)
        return self.result(stop, time.perf_counter() - t0)

    def result(self, stop: Stop, duration: float = 0.0) -> RunResult:
        regs = stop.regs or self.vcpu.fd.get_regs()
        sregs = self.vcpu.fd.get_sregs()
        cs, cpl = sregs.cs.selector, sregs.cs.dpl
        if stop.fault is not None and stop.fault.cs is not None:
            # Report the faulting context, not kvmpy's ring-0 exception stub.
            cs = stop.fault.cs
            cpl = cs & 3 if sregs.cr0 & 1 else 0
        return RunResult(
            stop_reason=stop.reason,
            exit_code=stop.exit_code,
            message=stop.message,
            regs={name: getattr(regs, name) for name in S.GPR_NAMES},
            sregs={
                "cr0": sregs.cr0,
                "cr2": sregs.cr2,
                "cr3": sregs.cr3,
                "cr4": sregs.cr4,
                "efer": sregs.efer,
                "cs": cs,
                "cpl": cpl,
            },
            stats=self.vcpu.stats,
            fault=stop.fault,
            duration_s=duration,
            output=self.output,
        )

    # --- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        self.memory.close()
        if self._own_kvm and self.kvm is not None:
            self.kvm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sink(console) -> Callable[[bytes], None] | None:
    if console is None or callable(console):
        return console
    # A binary stream: write through, flush at line ends so interactive output appears.
    write, flush = console.write, getattr(console, "flush", lambda: None)

    def sink(data: bytes) -> None:
        write(data)
        if b"\n" in data:
            flush()

    return sink
