"""Virtio devices on a machine: what the CLI's --disk/--rng/--console virtio/--transport
options build, and what `kvmpy bench virtio` and the tests use.

    specs = [DeviceSpec.parse_disk("disk.img,ro,id=data"), DeviceSpec("rng")]
    vset = attach(machine, specs, transport="pci")      # after Machine(...), before run()
    ...; vset.stats(); vset.close()

Placement: virtio-mmio windows come from the MMIO hole, one 4 KiB window each, in order (an
SDK guest scans them from the hole's start); PCI has a host bridge at 0xCF8/0xCFC, ECAM at
`ECAM_BASE` and a BAR aperture allocated from the hole. Each device gets its own I/O thread
(an EventLoop) unless `shared_loop` (see docs/virtio.md for the measurement behind the
default). Notify registers get ioeventfds and interrupts go through irqfd when the backend has
them; otherwise notify writes reach the transports, which hand the work to the I/O thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..devices.pci.host import CONFIG_ADDRESS, PciHost
from ..devices.virtio.balloon import VirtioBalloon
from ..devices.virtio.block import VirtioBlock
from ..devices.virtio.console import VirtioConsole
from ..devices.virtio.device import VirtioDevice
from ..devices.virtio.mmio import WINDOW_SIZE, VirtioMmio
from ..devices.virtio.pci import VirtioPci
from ..devices.virtio.rng import VirtioRng
from ..devices.virtio.wiring import CallbackIrq, IrqLine, MsiVector, NoNotifiers, VmIoeventfds
from ..errors import ConfigError
from ..hv.base import Capability, MsiRoute, PinRoute
from .event_loop import EventLoop
from .interrupts import InterruptManager
from .resources import Resources

log = logging.getLogger(__name__)

TRANSPORTS = ("mmio", "pci")
#: ECAM (MMCONFIG) for bus 0, at a fixed address so guests without ACPI know it.
ECAM_BASE = 0xE000_0000
ECAM_SIZE = 1 << 20
PCI_APERTURE_SIZE = 16 << 20
#: IOAPIC pins for virtio-mmio devices and PCI INTx: 16-23, the IOAPIC's own. GSIs below 16
#: also reach the 8259 PIC, which an SDK guest never programs: its reset vector base is 0, so
#: IRQ 5 arrived as #BR (measured here).
MMIO_PINS = tuple(range(16, 24))
PCI_INTX_PIN = 16


@dataclass(frozen=True)
class DeviceSpec:
    """One virtio device of a machine: JSON-able, so VmConfig can carry it."""

    kind: str  # "block", "rng", "console", "net", "vsock"
    path: str = ""
    readonly: bool = False
    id: str = ""
    #: vCPU that takes this device's interrupts (None: the guest's choice).
    irq_cpu: int | None = None
    options: dict = field(default_factory=dict)

    @classmethod
    def parse_disk(cls, text: str) -> DeviceSpec:
        """PATH[,ro][,id=NAME][,irq-cpu=N] (kvmpy run --disk)."""
        parts = text.split(",")
        path, ro, ident, cpu = parts[0], False, "", None
        if not path:
            raise ConfigError(f"--disk {text!r}: the image path is missing")
        for p in parts[1:]:
            if p == "ro":
                ro = True
            elif p.startswith("id="):
                ident = p[3:]
            elif p.startswith("irq-cpu="):
                try:
                    cpu = int(p[8:])
                except ValueError:
                    raise ConfigError(f"--disk {text!r}: irq-cpu must be a number") from None
            else:
                raise ConfigError(f"--disk {text!r}: unknown option {p!r} (ro, id=NAME, irq-cpu=N)")
        return cls("block", path=path, readonly=ro, id=ident, irq_cpu=cpu)

    @classmethod
    def parse_net(cls, text: str) -> DeviceSpec:
        """tap=NAME[,mac=MAC][,irq-cpu=N] (kvmpy run --net); NAME `auto`: a new TAP."""
        from ..devices.virtio.net import parse_mac

        opts = _options(text, "--net", ("tap", "mac", "irq-cpu", "id"))
        if "tap" not in opts:
            raise ConfigError(f"--net {text!r}: say which TAP: tap=NAME (or tap=auto)")
        if opts["tap"] != "auto":
            from ..devices.virtio.tap import check_ifname

            check_ifname(opts["tap"])
        mac = opts.get("mac")
        if mac is not None:
            try:
                parse_mac(mac)
            except ValueError as e:
                raise ConfigError(f"--net {text!r}: {e}") from None
        options = {"tap": opts["tap"], "mac": mac}
        return cls("net", id=opts.get("id", ""), irq_cpu=_cpu(opts, text, "--net"),
                   options=options)  # fmt: skip

    @classmethod
    def parse_vsock(cls, text: str) -> DeviceSpec:
        """CID,uds=PATH[,irq-cpu=N] (kvmpy run --vsock)."""
        from ..devices.virtio.vsock import check_cid

        head, _, rest = text.partition(",")
        try:
            cid = int(head)
        except ValueError:
            raise ConfigError(
                f"--vsock {text!r}: starts with the guest's CID (a number >= 3)"
            ) from None
        check_cid(cid)
        opts = _options(rest, "--vsock", ("uds", "irq-cpu", "id")) if rest else {}
        if not opts.get("uds"):
            raise ConfigError(f"--vsock {text!r}: say where the host side is: uds=PATH")
        return cls("vsock", path=opts["uds"], id=opts.get("id", ""),
                   irq_cpu=_cpu(opts, text, "--vsock"), options={"cid": cid})  # fmt: skip

    def to_dict(self) -> dict:
        return {"kind": self.kind, "path": self.path, "readonly": self.readonly, "id": self.id,
                "irq_cpu": self.irq_cpu, "options": dict(self.options)}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> DeviceSpec:
        return cls(d["kind"], d.get("path", ""), bool(d.get("readonly")), d.get("id", ""),
                   d.get("irq_cpu"), dict(d.get("options", {})))  # fmt: skip


def _options(text: str, flag: str, known: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in text.split(","):
        k, eq, v = p.partition("=")
        if not eq or k not in known or not v:
            raise ConfigError(
                f"{flag} {text!r}: unknown option {p!r} ({', '.join(k + '=...' for k in known)})"
            )
        out[k] = v
    return out


def _cpu(opts: dict[str, str], text: str, flag: str) -> int | None:
    if "irq-cpu" not in opts:
        return None
    try:
        return int(opts["irq-cpu"])
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: irq-cpu must be a number") from None


def build_device(spec: DeviceSpec, index: int, console: Callable[[bytes], None] | None,
                 console_input: int | None = None, machine=None) -> VirtioDevice:  # fmt: skip
    name = spec.options.get("name")
    if spec.kind == "block":
        name = name or spec.id or f"vd{chr(ord('a') + index)}"
        return VirtioBlock(spec.path, name=name, readonly=spec.readonly, serial=spec.id)
    if spec.kind == "rng":
        return VirtioRng(name or f"rng{index}", rate=int(spec.options.get("rate", 0)))
    if spec.kind == "console":
        return VirtioConsole(name or f"hvc{index}", sink=console, input_fd=console_input)
    if spec.kind == "net":
        from ..devices.virtio.net import VirtioNet, parse_mac
        from ..devices.virtio.tap import TapBackend

        backend = spec.options.get("backend") or TapBackend.open(spec.options["tap"])
        mac = spec.options.get("mac")
        try:
            return VirtioNet(backend, name=name or spec.id or f"net{index}",
                             mac=parse_mac(mac) if mac else None)  # fmt: skip
        except BaseException:
            backend.close()
            raise
    if spec.kind == "vsock":
        from ..devices.virtio.vsock import VirtioVsock

        return VirtioVsock(int(spec.options["cid"]), spec.path, name=name or f"vsock{index}")
    if spec.kind == "balloon":
        if machine is None:
            raise ConfigError("a virtio balloon needs the machine whose memory it gives back")
        mem = machine.memory
        end = max((r.end for r in mem.regions), default=0)
        return VirtioBalloon(name or f"balloon{index}", discard=mem.discard,
                             ram_pages=mem.size // 4096, pfn_limit=end // 4096,
                             stats_interval=float(spec.options.get("stats_interval", 0)))  # fmt: skip
    raise ConfigError(
        f"unknown virtio device kind {spec.kind!r} (block, rng, console, net, vsock, balloon)"
    )


class _VmFdBackend:
    """The InterruptManager's view of today's Machine (its KVM VmFd), until the platform
    layer's VmBackend replaces it."""

    name = "kvm"

    def __init__(self, machine):
        self.vm = machine.vm
        caps = set()
        if machine.config.irqchip:
            caps |= {Capability.IRQCHIP, Capability.IRQFD, Capability.MSI}
        caps.add(Capability.IOEVENTFD)
        self.capabilities = frozenset(caps)

    def set_routes(self, routes) -> None:
        from ..kvm import constants as K
        from ..kvm import structs as S

        entries = []
        for r in routes:
            e = S.kvm_irq_routing_entry(gsi=r.gsi)
            if isinstance(r, PinRoute):
                e.type = K.KVM_IRQ_ROUTING_IRQCHIP
                e.u.irqchip.irqchip, e.u.irqchip.pin = r.chip, r.pin
            elif isinstance(r, MsiRoute):
                e.type = K.KVM_IRQ_ROUTING_MSI
                e.u.msi.address_lo = r.address & 0xFFFF_FFFF
                e.u.msi.address_hi = r.address >> 32
                e.u.msi.data = r.data
            entries.append(e)
        self.vm.set_gsi_routing(entries)

    def irq_line(self, gsi: int, level: int) -> None:
        self.vm.irq_line(gsi, level)

    def signal_msi(self, address: int, data: int) -> None:
        self.vm.signal_msi(address, data)

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        self.vm.irqfd(fd, gsi, deassign=deassign)


class VirtioSet:
    """The virtio devices of one machine, their transports and I/O threads."""

    def __init__(self) -> None:
        self.devices: list[VirtioDevice] = []
        self.transports: list = []
        self.loops: list[EventLoop] = []
        self.shared_loop: EventLoop | None = None
        self.pci: PciHost | None = None
        self.transport = "mmio"
        #: Linux command-line entries that declare the virtio-mmio windows.
        self.cmdline: list[str] = []
        self.machine = None
        self.resources: Resources | None = None
        self.interrupts: InterruptManager | None = None
        self.has_irqchip = False
        self.claims_itself = False
        self.notifiers = NoNotifiers()
        #: IOAPIC pins for virtio-mmio devices, in order (set_mmio_pins).
        self.mmio_pins: tuple[int, ...] = MMIO_PINS

    def place(self, owner: str, size: int, align: int = 0x1000) -> int:
        """An address for a window from the MMIO hole."""
        assert self.resources is not None
        base = self.resources.allocate_mmio(owner, size, align)
        if self.claims_itself:
            self.resources.release(owner)  # add_mmio_device claims it, under the device's name
        return base

    def start(self) -> None:
        for loop in self.loops:
            loop.start()

    def stats(self) -> list[dict]:
        return [t.stats() for t in self.transports]

    @contextmanager
    def quiesced(self, resume: Callable[[], bool] | None = None):
        """Hold every device still: no queue work runs until the block ends (the request under
        way finishes first; the rest stay in the available ring). A snapshot takes device
        state and guest memory inside it, so the two agree: each request is either still in
        the ring (the restored device serves it) or complete in the used ring, never half
        done. `resume()`, if given, says whether to serve what was left afterwards."""
        for d in self.devices:
            d.quiescing = True  # the I/O threads stop between chains and let go of the lock
        locks = [d.lock for d in self.devices]
        try:
            for lock in locks:
                lock.acquire()
        finally:
            for d in self.devices:
                d.quiescing = False
        try:
            yield self
        finally:
            for lock in reversed(locks):
                lock.release()
            # What was left in the rings: serve it now (the driver will not notify again),
            # unless the VM went elsewhere (a migration): then this side serves nothing more.
            if resume is None or resume():
                for d in self.devices:
                    for q in d.queues:
                        if q.ready and d.running:
                            d.notify(q.index)

    def state(self) -> list[dict]:
        return [t.state() for t in self.transports]

    def restore_state(self, states: Sequence[dict]) -> None:
        for t, s in zip(self.transports, states, strict=False):
            t.restore_state(s)

    def close(self) -> None:
        for loop in self.loops:
            loop.stop()
        self.loops.clear()
        for t in self.transports:
            t.close()
        self.transports.clear()
        if self.machine is not None and getattr(self.machine, "virtio", None) is self:
            self.machine.virtio = None


def _platform(machine):
    """(resources, interrupts, notifiers-factory): the machine's own when the platform layer
    provides them, else built here over its KVM VM."""
    res = getattr(machine, "resources", None)
    irqs = getattr(machine, "interrupts", None)
    if res is None:
        res = machine.__dict__.get("_virtio_resources")
        if res is None:
            res = Resources([(r.gpa, r.size) for r in machine.memory])
            machine.__dict__["_virtio_resources"] = res
    if irqs is None:
        irqs = machine.__dict__.get("_virtio_interrupts")
        if irqs is None:
            irqs = InterruptManager(_VmFdBackend(machine), res)
            machine.__dict__["_virtio_interrupts"] = irqs
    return res, irqs


def virtio_set(machine, transport: str = "mmio", *, shared_loop: bool = False,
               ioeventfd: bool = True) -> VirtioSet:  # fmt: skip
    """The machine's virtio devices (`machine.virtio`), created on first use. A machine has
    one transport for all its virtio devices."""
    vset = getattr(machine, "virtio", None)
    if vset is not None:
        if transport != vset.transport:
            raise ConfigError(
                f"this machine's virtio devices use {vset.transport}; all of them must (got "
                f"{transport})"
            )
        return vset
    if transport not in TRANSPORTS:
        raise ConfigError(f"unknown virtio transport {transport!r} (mmio or pci)")
    res, irqs = _platform(machine)
    vset = VirtioSet()
    vset.transport = transport
    vset.machine = machine
    vset.mmio_pins = tuple(getattr(machine, "virtio_mmio_pins", MMIO_PINS))
    vset.resources, vset.interrupts = res, irqs
    # The machine's own config says whether it has an irqchip (a backend may offer one this
    # machine did not create: irqfd on a pin then fails with EINVAL).
    vset.has_irqchip = bool(machine.config.irqchip)
    # A machine whose add_*_device claims resources itself (the platform layer) must not see
    # them claimed twice; before it, this module's Resources is the only record.
    vset.claims_itself = getattr(machine, "resources", None) is res
    caps = getattr(machine.vm, "capabilities", {Capability.IOEVENTFD})
    vset.notifiers = (
        VmIoeventfds(machine.vm, pio=False)
        if ioeventfd and Capability.IOEVENTFD in caps
        else NoNotifiers()
    )
    if shared_loop:
        vset.shared_loop = EventLoop("virtio-io")
        vset.loops.append(vset.shared_loop)
    if transport == "pci":
        if not vset.claims_itself:
            res.claim_mmio("pci-ecam", ECAM_BASE, ECAM_SIZE)
            res.claim_ports("pci-config", CONFIG_ADDRESS, 8)
        aperture = vset.place("pci-aperture", PCI_APERTURE_SIZE, PCI_APERTURE_SIZE)
        host = vset.pci = PciHost(aperture, PCI_APERTURE_SIZE, ECAM_BASE)
        machine.add_pio_device(CONFIG_ADDRESS, 8, host.port_device)
        machine.add_mmio_device(ECAM_BASE, ECAM_SIZE, host.ecam_device)
        machine.add_mmio_device(aperture, PCI_APERTURE_SIZE, host.aperture_device)
    machine.virtio = vset
    on_close = getattr(machine, "on_close", None)
    if on_close is not None:
        on_close(vset.close)  # I/O threads and image files go with the machine
    return vset


def set_mmio_pins(machine, pins: Sequence[int]) -> None:
    """The IOAPIC pins `machine`'s virtio-mmio devices take, in order (before the first
    one): a Linux guest needs ISA IRQs (vmm/linux.py), SDK guests use MMIO_PINS."""
    if getattr(machine, "virtio", None) is not None:
        raise ConfigError("set the virtio-mmio pins before adding virtio devices")
    machine.virtio_mmio_pins = tuple(pins)


def add_device(machine, spec: DeviceSpec, transport: str = "mmio", *,
               console: Callable[[bytes], None] | None = None,
               console_input: int | None = None, **set_options):  # fmt: skip
    """Build one virtio device on `machine` and start its I/O thread; returns its transport
    (a VirtioMmio window or a VirtioPci function)."""
    vset = virtio_set(machine, transport, **set_options)
    i = len(vset.devices)
    sink = console if console is not None else machine.console_write
    dev = build_device(spec, i, sink, console_input, machine=machine)
    try:
        dev.poll_us = max(0, int(spec.options.get("poll_us", 0)))
        loop = vset.shared_loop or EventLoop(f"virtio-{dev.name}")
        if loop is not vset.shared_loop:
            vset.loops.append(loop)
        dev.use_loop(loop)
        irqs = vset.interrupts
        if transport == "mmio":
            base = vset.place(f"virtio-mmio-{dev.name}", WINDOW_SIZE)
            pins = vset.mmio_pins
            pin = pins[i] if i < len(pins) else None
            if vset.has_irqchip and pin is not None:
                irq = IrqLine(irqs.pin(f"virtio-{dev.name}", pin), irqfd=True)
            else:
                irq, pin = CallbackIrq(), None  # polling only
            t = VirtioMmio(dev, machine.memory, irq, base=base, notifiers=vset.notifiers)
            t.pin = pin
            machine.add_mmio_device(base, WINDOW_SIZE, t)
            if pin is not None:
                vset.cmdline.append(t.kernel_cmdline(pin))
        else:
            assert vset.pci is not None
            vectors, intx = None, None
            if vset.has_irqchip:
                # Each MSI-X entry gets its own GSI and a vector from the pool: its route
                # until the guest programs the entry (entries are masked until then).
                def vectors(k, cpu, dev=dev):
                    line = irqs.msi(f"virtio-{dev.name}-v{k}", cpu=cpu or 0)
                    return MsiVector(line, cpu=cpu)

                if i < 8:
                    intx = IrqLine(irqs.pin(f"virtio-{dev.name}-intx", PCI_INTX_PIN + i),
                                   irqfd=False)  # fmt: skip
            t = VirtioPci(dev, machine.memory, vectors, intx=intx, notifiers=vset.notifiers,
                          irq_cpu=spec.irq_cpu, intx_line=PCI_INTX_PIN + i % 8)  # fmt: skip
            vset.pci.add(t)
    except BaseException:
        dev.close()
        raise
    vset.devices.append(dev)
    vset.transports.append(t)
    loop.start()
    return t


def attach(
    machine,
    specs: Sequence[DeviceSpec],
    transport: str = "mmio",
    *,
    console: Callable[[bytes], None] | None = None,
    console_input: int | None = None,
    shared_loop: bool = False,
    ioeventfd: bool = True,
) -> VirtioSet:
    """Build `specs` as virtio devices on `machine` (see the module docstring)."""
    vset = virtio_set(machine, transport, shared_loop=shared_loop, ioeventfd=ioeventfd)
    try:
        for spec in specs:
            add_device(machine, spec, transport, console=console, console_input=console_input)
    except BaseException:
        vset.close()
        raise
    return vset


#: The IDT vector of kvmpy/virtio.h's interrupt handler (KV_VIRTIO_VECTOR).
GUEST_VECTOR = 0x50


def install_guest_handlers(machine, vset: VirtioSet | None = None) -> bool:
    """If the loaded SDK image includes kvmpy/virtio.h and the machine has an in-kernel
    irqchip, install its ring-0 interrupt handler and DPL-3 wait gate and tell the guest
    (kvmpy_virtio_irq_ready = 1). Returns whether it did.

    virtio-mmio pins are IOAPIC inputs, which an SDK guest cannot program (the IOAPIC is not
    mapped for it, and xAPIC-style MMIO from ring 0 is not usable on every host): for `vset`'s
    mmio devices kvmpy programs their redirection entries itself, as firmware would, to the
    handler's vector on vCPU 0 (edge-triggered, as irqfd delivers them). PCI devices need
    nothing: the guest programs MSI-X."""
    image = machine.image
    symbols = image.symbols if image is not None else {}
    names = ("kvmpy_virtio_irq_entry", "kvmpy_virtio_wait_gate", "kvmpy_virtio_irq_ready")
    if not all(n in symbols for n in names) or not machine.config.irqchip:
        return False
    machine.set_interrupt_handler(GUEST_VECTOR, symbols["kvmpy_virtio_irq_entry"])
    # The int3 gate is one per image: kvmpy/smp.h's (and ipc.h's) take it when present; the
    # guest then waits for interrupts by spinning on the count (irq_ready = 2).
    ready = 1
    if any(n in symbols for n in ("kvmpy_smp_gate", "kvmpy_ipc_wait_gate")):
        ready = 2
    else:
        machine.set_interrupt_handler(3, symbols["kvmpy_virtio_wait_gate"], dpl=3)
    if vset is not None and vset.transport == "mmio":
        pins = [t.pin for t in vset.transports if getattr(t, "pin", None) is not None]
        if pins:
            _route_ioapic_pins(machine, pins, GUEST_VECTOR, cpu=0)
    machine.memory.write_u64(symbols["kvmpy_virtio_irq_ready"], ready)
    return True


def _route_ioapic_pins(machine, pins: Sequence[int], vector: int, cpu: int) -> None:
    vm = machine.vm if hasattr(machine.vm, "get_irqchip") else machine.vm.fd  # KVM's VmFd
    chip = vm.get_irqchip(2)  # the IOAPIC
    for pin in pins:
        # fixed delivery, physical destination, active high, edge, unmasked
        chip.chip.ioapic.redirtbl[pin] = vector | (cpu & 0xFF) << 56
    vm.set_irqchip(chip)


# --- device kinds (VmConfig "devices" entries; devices/registry.py) ----------------------------


def _spec_args(kind: str, id: str, *, path: str = "", readonly: bool = False, serial: str = "",
               irq_cpu: int | None = None, poll_us: int = 0, rate: int = 0) -> DeviceSpec:  # fmt: skip
    for name, value in (("readonly", readonly),):
        if not isinstance(value, bool):
            raise ConfigError(f"device {id}: {name} must be true or false")
    for name, value in (("poll_us", poll_us), ("rate", rate)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1 << 32:
            raise ConfigError(f"device {id}: {name} must be a non-negative integer")
    if irq_cpu is not None and (isinstance(irq_cpu, bool) or not isinstance(irq_cpu, int)
                                or not 0 <= irq_cpu <= 255):  # fmt: skip
        raise ConfigError(f"device {id}: irq_cpu must be a vCPU number")
    options = {"poll_us": poll_us, "rate": rate, "name": id}
    return DeviceSpec(kind, str(path), readonly, serial, irq_cpu, options)


def balloon(machine) -> VirtioBalloon | None:
    """The machine's virtio balloon, if it has one."""
    vset = getattr(machine, "virtio", None)
    for d in vset.devices if vset is not None else ():
        if isinstance(d, VirtioBalloon):
            return d
    return None


def _register_kinds() -> None:
    """virtio-blk, virtio-rng and virtio-console as registry kinds, where the platform's
    device registry exists: `machine.add_device("virtio-blk", "vda", path="disk.img",
    transport="pci")`, rebuilt from a snapshot's VmConfig."""
    try:
        from ..devices.registry import device_kind
    except ImportError:  # a kvmpy without the device registry
        return

    def transport_of(value: str) -> str:
        if value not in TRANSPORTS:
            raise ConfigError(f"unknown virtio transport {value!r} (mmio or pci)")
        return value

    @device_kind("virtio-blk")
    def virtio_blk(machine, id, *, path: str, readonly: bool = False, serial: str = "",
                   transport: str = "mmio", irq_cpu: int | None = None, poll_us: int = 0):  # fmt: skip
        spec = _spec_args("block", id, path=path, readonly=readonly, serial=serial,
                          irq_cpu=irq_cpu, poll_us=poll_us)  # fmt: skip
        return add_device(machine, spec, transport_of(transport))

    @device_kind("virtio-rng")
    def virtio_rng(machine, id, *, transport: str = "mmio", rate: int = 0,
                   irq_cpu: int | None = None):  # fmt: skip
        return add_device(machine, _spec_args("rng", id, rate=rate, irq_cpu=irq_cpu),
                          transport_of(transport))  # fmt: skip

    @device_kind("virtio-net")
    def virtio_net(machine, id, *, tap: str, mac: str | None = None, transport: str = "mmio",
                   irq_cpu: int | None = None):  # fmt: skip
        if not isinstance(tap, str) or not (mac is None or isinstance(mac, str)):
            raise ConfigError(f"device {id}: tap and mac are strings")
        text = f"tap={tap}" + (f",mac={mac}" if mac else "")
        spec = DeviceSpec.parse_net(text)
        spec = DeviceSpec("net", id=id, irq_cpu=_spec_args("net", id, irq_cpu=irq_cpu).irq_cpu,
                          options={**spec.options, "name": id})  # fmt: skip
        return add_device(machine, spec, transport_of(transport))

    @device_kind("virtio-vsock")
    def virtio_vsock(machine, id, *, cid: int, uds: str, transport: str = "mmio",
                     irq_cpu: int | None = None):  # fmt: skip
        from ..devices.virtio.vsock import check_cid

        if not isinstance(uds, str) or not uds:
            raise ConfigError(f"device {id}: uds must be a path")
        spec = DeviceSpec("vsock", path=uds, id=id,
                          irq_cpu=_spec_args("vsock", id, irq_cpu=irq_cpu).irq_cpu,
                          options={"cid": check_cid(cid), "name": id})  # fmt: skip
        return add_device(machine, spec, transport_of(transport))

    @device_kind("virtio-balloon")
    def virtio_balloon(machine, id, *, transport: str = "mmio", stats_interval: float = 0,
                       irq_cpu: int | None = None):  # fmt: skip
        if balloon(machine) is not None:
            raise ConfigError("a machine has at most one virtio balloon")
        if (isinstance(stats_interval, bool) or not isinstance(stats_interval, int | float)
                or not 0 <= stats_interval <= 3600):  # fmt: skip
            raise ConfigError(f"device {id}: stats_interval must be 0 to 3600 seconds")
        spec = _spec_args("balloon", id, irq_cpu=irq_cpu)
        spec.options["stats_interval"] = stats_interval
        return add_device(machine, spec, transport_of(transport))

    @device_kind("virtio-console")
    def virtio_console(machine, id, *, transport: str = "mmio", irq_cpu: int | None = None):
        return add_device(machine, _spec_args("console", id, irq_cpu=irq_cpu),
                          transport_of(transport),
                          console_input=getattr(machine, "console_input", None))  # fmt: skip


_register_kinds()
