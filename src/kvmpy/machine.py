"""A machine: guest memory, vCPUs, buses, devices and interrupts, assembled from a config.

    from kvmpy.machine import Machine, MachineConfig

    with Machine(MachineConfig(mode="long-user", memory="64M", vcpus=2)) as m:
        m.load_file("hello.elf")
        m.hypercalls.register(64, lambda ctx, a0, *_: a0 * 2, "double")
        result = m.run()
    print(result.stop_reason, result.exit_code, result.exits, result.regs["rax"])

The builder order follows Firecracker's: validate the config, create the VM and its memory,
then vCPUs and devices; loading an image places kvmpy's own structures around it and sets the
entry state. The machine is the `VmOps` its backend calls back (hv/base.py) and owns the
parts every device shares: `resources` (ports, MMIO windows, GSIs, vectors), `interrupts` (GSI
routing), `event_loop` (file descriptors served off the vCPU threads) and the vCPU threads
(vmm/vcpus.py). docs/design.md draws the layers.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

from . import signals
from .arch.x86 import gdt as G
from .arch.x86 import modes
from .arch.x86.modes import BootState, Mode, SystemLayout
from .bus import MmioBus, PortBus
from .devices import Device, Effect, Output, RaiseIrq, StopVm
from .devices.debugcon import PORT as DEBUGCON_PORT
from .devices.debugcon import DebugConsole
from .errors import ConfigError, KvmUnavailable
from .hv.base import Capability, Hypervisor, VcpuBackend, require
from .hv.signals import install_kick_handler
from .hypercalls import PORT as HYPERCALL_PORT
from .hypercalls import Hypercalls
from .kvm import Kvm
from .kvm import structs as S
from .limits import check_duration
from .loader import Image, load_file
from .memory import GuestMemory
from .result import RunResult, Stop, StopReason
from .stats import ExitStats
from .vmm.config import (
    MAX_MEMORY,
    MIN_MEMORY,
    DeviceConfig,
    ImageBoot,
    MachineConfig,
    VmConfig,
    check_memory_size,
)
from .vmm.event_loop import EventLoop
from .vmm.interrupts import InterruptManager
from .vmm.resources import MMIO_HOLE_START, Resources
from .vmm.smp import SmpState
from .vmm.vcpus import VcpuSet

log = logging.getLogger(__name__)

# x86 keeps [3 GiB, 4 GiB) for MMIO (LAPIC, IOAPIC, PCI holes); RAM beyond 3 GiB continues
# at 4 GiB, as on PCs and in Firecracker.
MMIO_HOLE_END = 4 << 30

#: IDT vectors kvmpy/smp.h's ring-0 handlers use (see that header).
SMP_GATE_VECTOR = 3
SMP_IPI_VECTOR = 0xF0


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


def make_hypervisor(accel: str = "auto", kvm: Kvm | None = None) -> Hypervisor:
    """The backend `accel` names; "auto" falls back to unicorn when /dev/kvm is not usable
    (an explicit "kvm" is refused there instead)."""
    if accel == "unicorn":
        from .hv.unicorn import UnicornHypervisor

        return UnicornHypervisor()
    if accel not in ("kvm", "auto"):
        raise ConfigError(f"unknown accelerator {accel!r}")
    from .hv.kvm import KvmHypervisor

    try:
        return KvmHypervisor(kvm)
    except KvmUnavailable as e:
        if accel == "kvm":
            raise
        from .hv.unicorn import UnicornHypervisor

        hv = UnicornHypervisor()
        log.warning("%s; running on the unicorn backend (binary translation) instead", e)
        return hv


class Machine:
    def __init__(
        self,
        config: MachineConfig | None = None,
        *,
        kvm: Kvm | None = None,
        hypervisor: Hypervisor | None = None,
        console: Callable[[bytes], None] | BinaryIO | None = None,
        capture_output: bool = True,
        capture_limit: int = 1 << 20,
    ):
        self.config = config = (config or MachineConfig()).validated()
        self.mode: Mode = config.mode  # type: ignore[assignment]
        self._own_hv = hypervisor is None
        self.hv: Hypervisor | None = None
        self.vm = None
        self.memory = GuestMemory()
        self.vcpus: list[VcpuBackend] = []
        self.pio_bus = PortBus()
        self.mmio_bus = MmioBus()
        self.hypercalls = Hypercalls()
        self.resources: Resources | None = None
        self.interrupts: InterruptManager | None = None
        self.smp: SmpState | None = None
        self.layout: SystemLayout | None = None
        self.boot: BootState | None = None
        self.image: Image | None = None
        self.entry_ip = 0
        # The guest decides how much it prints: keep only the last `capture_limit` bytes so a
        # guest that prints forever cannot grow the VMM's memory without bound.
        self._output = bytearray() if capture_output else None
        self._capture_limit = max(0, capture_limit)
        self._sink = _sink(console)
        self._output_lock = threading.Lock()
        #: Bytes the guest has output so far (a restored machine continues the count).
        self.output_bytes = 0
        self._vcpuset: VcpuSet | None = None
        self._event_loop: EventLoop | None = None
        self._ioeventfds: list[tuple[int, int, int, int | None, bool, bool]] = []
        self._closers: list[Callable[[], None]] = []
        #: The devices built by kind (add_device), as the VmConfig lists them.
        self.device_configs: list[DeviceConfig] = []
        self.devices: dict[str, Any] = {}
        #: What was loaded (an ImageBoot or LinuxBoot), for the VmConfig.
        self.boot_source: Any = None
        #: Called with every chunk of guest console output, under the output lock (the Linux
        #: platform watches for boot milestones and panics there).
        self.output_watchers: list[Callable[[bytes], None]] = []
        #: Asked when a device ends the VM (a StopVm effect): (reason, message) -> the
        #: (reason, message) to stop with. The Linux platform turns the reset that follows a
        #: kernel panic into `guest_panic`.
        self.on_guest_stop: Callable[[StopReason, str], tuple[StopReason, str]] | None = None
        #: time.monotonic() when the vCPUs first started (None before the first run()).
        self.started_at: float | None = None
        #: The Linux guest platform (vmm/linux.py), for a machine that boots Linux.
        self.linux: Any = None
        try:
            self.hv = hypervisor or make_hypervisor(config.accel, kvm)
            self._build()
        except BaseException:
            self.close()
            raise

    # --- construction --------------------------------------------------------------------------

    def _build(self) -> None:
        c = self.config
        assert self.hv is not None
        if c.irqchip:
            require(self.hv, Capability.IRQCHIP, "the in-kernel irqchip" if c.vcpus == 1 else "SMP")
        if c.pit:
            require(self.hv, Capability.PIT, "the in-kernel PIT")
        self.vm = vm = self.hv.create_vm()
        ram = ram_layout(c.memory)  # type: ignore[arg-type]
        for i, (gpa, size) in enumerate(ram):
            region = self.memory.add_region(gpa, size, name=f"ram{i}", anonymous=c.mergeable)
            if c.mergeable:
                self.memory.set_mergeable(region)
        self.memory.attach(vm)
        self.resources = Resources(ram)
        if c.irqchip:
            vm.create_irqchip(c.pit)
        self.interrupts = InterruptManager(vm, self.resources)
        for i in range(c.vcpus):
            self.vcpus.append(vm.create_vcpu(i, self))
        install_kick_handler()
        self.smp = SmpState(self.vcpus, wake=self._wake_vcpus)
        if c.vcpus > 1:
            self.smp.register(self.hypercalls)
        self.smp.register_pv(self.hypercalls)
        self.debugcon = DebugConsole()
        self.add_pio_device(DEBUGCON_PORT, 1, self.debugcon)
        self.add_pio_device(HYPERCALL_PORT, 4, HypercallPort())
        self.resources.claim_ports("kvmpy exception stubs", modes.FAULT_PORT, 1)

    def add_pio_device(self, base: int, length: int, device: Device) -> None:
        assert self.resources is not None
        self.resources.claim_ports(device.name, base, length)
        self.pio_bus.register(base, length, device)

    def add_mmio_device(self, base: int, length: int, device: Device) -> None:
        assert self.resources is not None
        if self.memory.is_ram(base) or self.memory.is_ram(base + length - 1):
            raise ConfigError(f"MMIO range of {device.name} at {base:#x} overlaps guest RAM")
        self.resources.claim_mmio(device.name, base, length)
        if base + length > modes.MMIO_TOP:
            # kvmpy's page tables map device memory below 4 GiB only (and 32-bit modes reach
            # no further).
            raise ConfigError(f"MMIO range of {device.name} at {base:#x} is not below 4 GiB")
        self.mmio_bus.register(base, length, device)

    def add_device(self, kind: str, id: str | None = None, **args: Any) -> Any:
        """Build a device of a registered kind (devices/registry.py) and record it in this
        machine's VmConfig, so snapshots rebuild it."""
        from .devices import registry

        if id is None:
            id = f"{kind}{sum(1 for d in self.device_configs if d.kind == kind)}"
        if id in self.devices:
            raise ConfigError(f"this machine has a device {id!r} already")
        cfg = DeviceConfig(kind, id, args)
        VmConfig(self.config, None, (*self.device_configs, cfg)).validated()
        device = registry.create(self, kind, id, dict(args))
        self.device_configs.append(cfg)
        self.devices[id] = device
        return device

    def vm_config(self) -> VmConfig:
        """The whole machine as a VmConfig: what `kvmpy restore` rebuilds it from."""
        return VmConfig(self.config, self.boot_source, tuple(self.device_configs))

    def ioeventfd(
        self, addr: int, length: int, datamatch: int | None = None, *, pio: bool = False,
        fd: int | None = None,
    ) -> int:  # fmt: skip
        """An eventfd the backend signals, without a VMM exit, when the guest writes `length`
        bytes (equal to `datamatch`, if given) to `addr`. `fd` wires an existing eventfd (one
        another VMM process passed us); otherwise a new one is created, owned by the machine."""
        require(self.vm, Capability.IOEVENTFD, "an ioeventfd")
        own = fd is None
        if fd is None:
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self.vm.ioeventfd(fd, addr, length, datamatch, pio)
        except BaseException:
            if own:
                os.close(fd)
            raise
        self._ioeventfds.append((fd, addr, length, datamatch, pio, own))
        return fd

    @property
    def event_loop(self) -> EventLoop:
        """The machine's I/O thread for consoles, sockets and slow devices (started on first
        use). A callback that fails stops the VM with `vmm_error`."""
        if self._event_loop is None:
            self._event_loop = EventLoop(
                f"{self.config.name}-io",
                on_error=lambda e: self.request_stop(
                    StopReason.VMM_ERROR, f"an I/O handler failed: {e}"
                ),
            )
            self._event_loop.start()
        return self._event_loop

    def on_close(self, fn: Callable[[], None]) -> None:
        """Run `fn()` when the machine closes (devices release threads and files there)."""
        self._closers.append(fn)

    # --- loading -------------------------------------------------------------------------------

    def load_file(self, path, load_addr: int | None = None, entry: int | None = None) -> Image:
        image = load_file(path, load_addr, entry)
        self.load(image)
        self.boot_source = ImageBoot(os.path.abspath(path), load_addr, entry)
        return image

    def load(self, image: Image, reserved: Sequence[tuple[int, int]] = ()) -> None:
        """Put `image` in RAM, build the mode's structures around it and set the entry state.

        kvmpy's structures also stay out of the `reserved` [start, end) ranges: memory the
        caller gives a meaning, such as a region shared with another VM. CPU 0 starts at the
        image's entry; the other vCPUs wait for the guest to start them (kvmpy/smp.h)."""
        image.check_mode(self.mode)
        image.place(self.memory)
        self.image = image
        boot = modes.build(
            self.mode,
            self.memory,
            image.entry,
            [*image.ranges(), *reserved],
            interrupts=self.config.irqchip,
            use_1g_pages=self._use_1g_pages(),
            ncpus=self.config.vcpus,
        )
        self.boot, self.layout = boot, boot.layout
        self.entry_ip = boot.regs.rip
        fpu = S.kvm_fpu(fcw=0x37F, mxcsr=0x1F80)
        for i, vcpu in enumerate(self.vcpus):
            vcpu.set_sregs(boot.sregs if i == 0 else boot.ap_sregs[i - 1])
            vcpu.set_regs(boot.regs if i == 0 else boot.ap_regs(i, 0))
            vcpu.set_fpu(fpu)
            if self.config.irqchip:
                vcpu.enable_x2apic(bsp=i == 0)
                if i:
                    vcpu.set_mp_state(0)  # RUNNABLE: no INIT/SIPI, kvmpy starts it (smp.py)
        self.smp.park_secondaries(boot)
        self._install_sdk_handlers(image)

    def _use_1g_pages(self) -> bool:
        if getattr(self.hv, "supports_1g_pages", False):
            return True
        f = getattr(self.hv, "kvm", None)
        return bool(f is not None and f.cpuid_supports_1g_pages())

    def _install_sdk_handlers(self, image: Image) -> None:
        """kvmpy/smp.h's ring-0 handlers, when the image has them: the gate CPL3 code reaches
        with `int3`, and the IPI handler."""
        symbols = image.symbols or {}
        if "kvmpy_smp_gate" in symbols and self.mode.bits == 64:
            self.set_interrupt_handler(SMP_GATE_VECTOR, symbols["kvmpy_smp_gate"], dpl=3)
        if "kvmpy_smp_ipi" in symbols and self.mode.bits in (32, 64):
            self.set_interrupt_handler(SMP_IPI_VECTOR, symbols["kvmpy_smp_ipi"])

    def mark_restored(self, layout: SystemLayout, entry_ip: int, boot_rflags: int = 2) -> None:
        """Make the machine runnable without `load()`: the caller (kvmpy.persist, restoring a
        snapshot or receiving a migration) has put back guest memory and the vCPU state, so
        the vCPUs go on where they were. `layout` and `entry_ip` are what `load()` recorded in
        the original machine; fault reports, SMP starts and the paged32 host check need them."""
        self.layout = layout
        self.entry_ip = entry_ip
        v0 = self.vcpus[0]
        regs = v0.get_regs()
        regs.rflags = boot_rflags
        self.boot = BootState(self.mode, regs, v0.get_sregs(), layout)
        self.smp.boot = self.boot

    def set_interrupt_handler(self, vector: int, address: int, *, dpl: int = 0) -> None:
        """Point IDT vector `vector` at guest code at `address` (after `load`), in place of
        kvmpy's stub that stops the VM.

        The handler runs in ring 0 on kvmpy's code segment, through an interrupt gate (IF
        clear on entry) and, in long modes, on the ring-0 stack of the TSS (no IST). `dpl=3`
        lets CPL3 code reach it with a software interrupt (`int3`). A guest publishes its
        handler's address through an ELF symbol; kvmpy installs it, because a CPL3 guest
        cannot write its IDT (long-user maps it supervisor-only) or run `lidt`. Every vCPU
        shares the IDT."""
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
        # vCPU threads and device threads print concurrently: one write at a time keeps each
        # write's bytes together and the count exact.
        with self._output_lock:
            self.output_bytes += len(data)
            for watch in self.output_watchers:
                watch(data)
            out = self._output
            if out is not None:
                out += data
                # Trim in big steps (not per write) so capturing stays amortized O(1) per byte.
                if len(out) > 2 * self._capture_limit:
                    del out[: len(out) - self._capture_limit]
            if self._sink is not None:
                try:
                    self._sink(data)
                except OSError as e:  # stdout closed by its reader, a full disk...
                    self._output_failed(e)

    def _output_failed(self, e: OSError) -> None:
        """The guest's output cannot be written: stop the VM (not the VMM with a traceback),
        and drop the sink so that nothing else is written to it."""
        self._sink = None
        why = "broken pipe: the reader went away" if e.errno == errno.EPIPE else e.strerror
        self.request_stop(StopReason.OUTPUT_ERROR, f"cannot write the guest's output: {why or e}")

    @property
    def output(self) -> bytes:
        """What the guest printed: all of it, or the last `capture_limit` bytes if it printed
        more (`output_bytes` counts everything)."""
        out = self._output
        if not out:
            return b""
        return bytes(out[-self._capture_limit :]) if self._capture_limit else b""

    def apply_effect(self, effect: Effect, vcpu: int = 0) -> None:
        """Carry out what a device asked for (called in the vCPU or I/O thread that ran it)."""
        if isinstance(effect, Output):
            self.console_write(effect.data)
        elif isinstance(effect, RaiseIrq):
            self.vm.irq_line(effect.gsi, effect.level)
        elif isinstance(effect, StopVm):
            try:
                reason = StopReason(effect.reason)
            except ValueError:
                reason = StopReason.VMM_ERROR
            message = effect.message or reason.value
            if self.on_guest_stop is not None:
                reason, message = self.on_guest_stop(reason, message)
            self.request_stop(reason, message)
        else:
            raise NotImplementedError(f"no handler for device effect {effect!r}")

    # --- running -------------------------------------------------------------------------------

    def run(
        self, timeout: float | None = None, *, handle_sigint: bool = False, paused: bool = False
    ) -> RunResult:
        """Run until the guest stops: every vCPU in its own thread, the calling thread waiting.
        `timeout` (seconds: finite, positive, at most 30 days) and `handle_sigint` (SIGINT and
        SIGTERM stop the VM, stop reason `interrupted`) use signals and so work from the main
        thread only. Nothing the guest or a Python handler does makes this raise: it ends as a
        stop reason.

        Calling it again after a stop continues the guest where it stopped. With `paused` the
        vCPUs start held (as after `pause()`) and enter the guest at the first `resume()`."""
        if self.boot is None:
            raise ConfigError("load an image before running the machine")
        if timeout is not None:
            timeout = check_duration(timeout)
        main = threading.current_thread() is threading.main_thread()
        if (timeout or handle_sigint) and not main:
            raise ConfigError("timeout and Ctrl-C handling need the main thread")
        vset = self._vcpu_set()
        old_handlers: dict[int, Any] = {}
        if timeout:
            old_handlers[signal.SIGALRM] = signal.signal(
                signal.SIGALRM,
                lambda *_: self.request_stop(
                    StopReason.TIMEOUT, f"time limit of {timeout:g} s reached"
                ),
            )
            signal.setitimer(signal.ITIMER_REAL, timeout)
        # SIGINT and SIGTERM alike (kvmpy.signals): the VM stops, the caller reports.
        on_signal = signals.handled(
            lambda signum: self.request_stop(
                StopReason.INTERRUPTED, signals.describe(signum), signum=signum
            )
        )
        if handle_sigint:
            on_signal.__enter__()
        t0 = time.perf_counter()
        if self.started_at is None:
            self.started_at = time.monotonic()
        try:
            vset.start(paused=paused)
            stop = vset.wait()
        finally:
            if timeout:
                signal.setitimer(signal.ITIMER_REAL, 0)
            for sig, old in old_handlers.items():
                signal.signal(sig, old)
            if handle_sigint:
                on_signal.__exit__(None, None, None)
        assert stop is not None
        return self.result(stop, time.perf_counter() - t0)

    def _vcpu_set(self, **hooks: Any) -> VcpuSet:
        vset = self._vcpuset = VcpuSet(
            self.vcpus, blocked=self.smp.blocked, on_resume=self.smp.prepare,
            name=self.config.name, **hooks,
        )  # fmt: skip
        return vset

    def start_vcpus(
        self,
        *,
        thread_init: Callable[[int], None] | None = None,
        thread_exit: Callable[[int], None] | None = None,
    ) -> VcpuSet:
        """Start every vCPU in its own thread, as run() does, and return their VcpuSet without
        waiting: for a driver that runs the machine for a while and then `end()`s the set (the
        machine goes on at its next run) or waits for its stop (`wait()`, then `result()`).
        `thread_init(i)` and `thread_exit(i)` run first and last in vCPU i's thread."""
        if self.boot is None:
            raise ConfigError("load an image before running the machine")
        if self._vcpuset is not None and self._vcpuset.running:
            raise ConfigError("the machine's vCPUs are running already")
        vset = self._vcpu_set(thread_init=thread_init, thread_exit=thread_exit)
        vset.start()
        return vset

    def request_stop(
        self,
        reason: StopReason = StopReason.INTERRUPTED,
        message: str = "",
        signum: int | None = None,
    ) -> None:
        """Stop the VM (from any thread or a signal handler): its run returns `reason`;
        `signum`: the signal that asked for it, if one did."""
        stop = Stop(reason, 0, message or "stopped by the host", signum=signum)
        vset = self._vcpuset
        if vset is not None and vset.started:
            vset.request_stop(stop)
        else:
            for v in self.vcpus:
                v.request_stop(reason, stop.message, kick=True)

    @property
    def accel(self) -> str:
        """The backend this machine runs on ("kvm" or "unicorn"; its config may say "auto")."""
        return self.hv.name

    @property
    def running(self) -> bool:
        return self._vcpuset is not None and self._vcpuset.running

    def _wake_vcpus(self) -> None:
        if self._vcpuset is not None:
            self._vcpuset.wake()

    # Pausing, for snapshots, migration and the control channel (from a thread other than the
    # vCPUs'): every vCPU leaves the guest with its pending I/O completed.

    def pause(self, *, hold: bool = True, timeout: float = 10.0) -> None:
        self._live_set().pause_all(hold=hold, timeout=timeout)

    def resume(self) -> None:
        self._live_set().resume()

    def release(self) -> None:
        """End a `pause(hold=False)` (the vCPUs go on unless someone holds them paused)."""
        self._live_set().release()

    def pause_from_guest(self) -> None:
        """From a hypercall handler (a vCPU thread): stop the world here. Every vCPU leaves
        the guest (the caller's at the end of this hypercall) and stays out until `resume()`;
        another thread waits for that with `wait_paused()` and can then snapshot the machine."""
        self._live_set().hold()

    def wait_paused(self, timeout: float = 10.0) -> None:
        """Wait until the vCPUs are out of the guest after `pause_from_guest()`."""
        deadline = time.monotonic() + timeout
        while self._vcpuset is None or not self._vcpuset.started:
            if time.monotonic() > deadline:
                from .vmm.vcpus import VcpuError

                raise VcpuError("the VM did not start")
            time.sleep(0.001)
        self._vcpuset.wait_paused(max(0.0, deadline - time.monotonic()))

    def end_run(self, stop: Stop) -> None:
        """While paused: the run ends with `stop` when the vCPUs go on (a migration that handed
        the VM over)."""
        self._live_set().end_run(stop)

    @property
    def paused(self) -> bool:
        return self._vcpuset is not None and self._vcpuset.paused

    def vcpu_cpu_times(self) -> list[float]:
        """Host CPU seconds used by each vCPU thread so far (zeros before the run)."""
        if self._vcpuset is None:
            return [0.0] * len(self.vcpus)
        return self._vcpuset.cpu_times()

    @property
    def paused_at(self) -> float:
        return self._vcpuset.paused_at if self._vcpuset is not None else 0.0

    def vcpu_call(self, index: int, fn: Callable[[], Any]) -> Any:
        """Run `fn()` in vCPU `index`'s thread, out of the guest (directly when not running)."""
        if self._vcpuset is None or not self._vcpuset.started:
            return fn()
        return self._vcpuset.call(index, fn)

    def _live_set(self) -> VcpuSet:
        if self._vcpuset is None:
            from .vmm.vcpus import VcpuError

            raise VcpuError("the VM has not started yet")
        return self._vcpuset

    def result(self, stop: Stop, duration: float = 0.0) -> RunResult:
        cpu = stop.cpu if 0 <= stop.cpu < len(self.vcpus) else 0
        vcpu = self.vcpus[cpu]
        regs = stop.regs or vcpu.get_regs()
        sregs = vcpu.get_sregs()
        cs, cpl = sregs.cs.selector, sregs.cs.dpl
        if stop.fault is not None and stop.fault.cs is not None:
            # Report the faulting context, not kvmpy's ring-0 exception stub.
            cs = stop.fault.cs
            cpl = cs & 3 if sregs.cr0 & 1 else 0
        per_vcpu = [v.stats for v in self.vcpus]
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
            stats=ExitStats.merged(per_vcpu),
            fault=stop.fault,
            signal=stop.signum,
            duration_s=duration,
            output=self.output,
            cpu=cpu,
            vcpu_stats=per_vcpu if len(per_vcpu) > 1 else [],
        )

    # --- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        if self._vcpuset is not None and self._vcpuset.running:
            self.request_stop(StopReason.INTERRUPTED, "the machine is closing")
            self._vcpuset.wait(5.0)
        for fn in reversed(self._closers):
            try:
                fn()
            except Exception:
                log.exception("closing a device failed")
        self._closers.clear()
        if self._event_loop is not None:
            self._event_loop.stop()
            self._event_loop = None
        if self.interrupts is not None:
            self.interrupts.close()
        for fd, addr, length, datamatch, pio, own in self._ioeventfds:
            if self.vm is not None:
                try:
                    self.vm.ioeventfd(fd, addr, length, datamatch, pio, deassign=True)
                except OSError:
                    pass
            if own:
                os.close(fd)
        self._ioeventfds.clear()
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        self.memory.close()
        if self._own_hv and self.hv is not None:
            self.hv.close()
            self.hv = None

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


__all__ = [
    "MAX_MEMORY",
    "MIN_MEMORY",
    "Machine",
    "MachineConfig",
    "check_memory_size",
    "ram_layout",
]
