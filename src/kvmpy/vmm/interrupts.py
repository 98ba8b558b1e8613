"""The one owner of a machine's interrupt routing.

KVM_SET_GSI_ROUTING replaces the whole routing table, so two components that each set "their"
routes would undo each other. Here every interrupt source asks this manager for a line:

    line = machine.interrupts.pin("serial0", 4)          # ISA IRQ 4 / IOAPIC pin 4
    line.set_level(True)                                  # level-triggered device
    msi = machine.interrupts.msi("doorbell0", vector=0x40, cpu=1)
    os.eventfd_write(msi.eventfd(), 1)                    # from an I/O thread: no VMM exit
    msi.configure(address, data)                          # a guest reprogrammed MSI-X

and the manager allocates GSIs (through the machine's `Resources`), keeps the table, and writes
it whole to the backend whenever a route changes. Devices never see GSI routing or KVM.

Destination CPUs are vCPU indices; kvmpy gives vCPU i the APIC ID i, so an MSI to CPU i has
address 0xFEE0_0000 | i << 12 (physical destination mode, fixed delivery).
"""

from __future__ import annotations

import os
import threading

from ..errors import ConfigError
from ..hv.base import Capability, MsiRoute, PinRoute, Route, VmBackend, require
from .resources import IOAPIC_PINS, Resources

MSI_ADDRESS_BASE = 0xFEE0_0000
#: Chips of KVM's default routing: the two 8259s (GSIs 0-15) and the IOAPIC (0-23).
PIC_MASTER, PIC_SLAVE, IOAPIC = 0, 1, 2


def msi_address(cpu: int) -> int:
    if not 0 <= cpu <= 0xFF:
        raise ConfigError(f"MSI destination CPU {cpu} is outside 0..255 (xAPIC destination)")
    return MSI_ADDRESS_BASE | cpu << 12


def default_pin_routes() -> list[PinRoute]:
    """KVM's own default table: GSI n -> IOAPIC pin n, and GSIs 0-15 also to the PICs."""
    routes: list[PinRoute] = []
    for gsi in range(IOAPIC_PINS):
        routes.append(PinRoute(gsi, IOAPIC, gsi))
        if gsi < 16 and gsi != 2:  # GSI 2 is the PIC cascade; KVM's table omits it too
            routes.append(PinRoute(gsi, PIC_MASTER if gsi < 8 else PIC_SLAVE, gsi % 8))
    return routes


class _Line:
    def __init__(self, manager: InterruptManager, owner: str, gsi: int):
        self._m = manager
        self.owner = owner
        self.gsi = gsi
        self._efd: int | None = None
        self._own_efd = True
        #: Times the VMM itself injected this line (irqfd injections are not seen here).
        self.injected = 0

    def eventfd(self) -> int:
        """An eventfd whose every write injects this interrupt in the backend, without the
        VMM (KVM's irqfd). Created on first use; owned by the line."""
        if self._efd is None:
            require(self._m.vm, Capability.IRQFD, f"the interrupt of {self.owner}")
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            try:
                self._m.vm.irqfd(efd, self.gsi)
            except BaseException:
                os.close(efd)
                raise
            self._efd = efd
        return self._efd

    def attach_eventfd(self, fd: int) -> None:
        """Make `fd` (an eventfd someone else owns, e.g. one another VMM process signals)
        inject this interrupt: KVM's irqfd without creating a new eventfd."""
        if self._efd is not None:
            raise ConfigError(f"the interrupt of {self.owner} has an eventfd already")
        require(self._m.vm, Capability.IRQFD, f"the interrupt of {self.owner}")
        self._m.vm.irqfd(fd, self.gsi)
        self._efd, self._own_efd = fd, False

    def close(self) -> None:
        if self._efd is not None:
            try:
                self._m.vm.irqfd(self._efd, self.gsi, deassign=True)
            except OSError:
                pass  # the VM is going away
            if self._own_efd:
                os.close(self._efd)
            self._efd = None


class PinInterrupt(_Line):
    """An IOAPIC/PIC input (an ISA IRQ)."""

    def set_level(self, high: bool) -> None:
        self.injected += bool(high)
        self._m.vm.irq_line(self.gsi, 1 if high else 0)

    def trigger(self) -> None:
        """An edge: raise and lower the line."""
        self.injected += 1
        self._m.vm.irq_line(self.gsi, 1)
        self._m.vm.irq_line(self.gsi, 0)


class MsiInterrupt(_Line):
    """A message-signalled interrupt: its own GSI, routed to (address, data)."""

    def __init__(self, manager: InterruptManager, owner: str, gsi: int, address: int, data: int):
        super().__init__(manager, owner, gsi)
        self.address = address
        self.data = data
        self.masked = False

    @property
    def cpu(self) -> int:
        return (self.address >> 12) & 0xFF

    @property
    def vector(self) -> int:
        return self.data & 0xFF

    def trigger(self) -> None:
        if self.masked:
            return
        self.injected += 1
        self._m.vm.signal_msi(self.address, self.data)

    def configure(self, address: int, data: int) -> None:
        """Point the interrupt at a new (address, data), e.g. after the guest wrote an MSI-X
        table entry. Values come from the guest: any are accepted, KVM delivers what x86 would
        (an address outside the MSI window is simply not an interrupt)."""
        self.address, self.data = address & 0xFFFF_FFFF_FFFF_FFFF, data & 0xFFFF_FFFF
        self._m._commit()

    def retarget(self, cpu: int, vector: int | None = None) -> None:
        self.configure(msi_address(cpu), self.data if vector is None else _vector(vector))


def _vector(vector: int) -> int:
    if not 0x10 <= vector <= 0xFF:
        raise ConfigError(f"interrupt vector {vector:#x} is outside 0x10..0xff")
    return vector


class InterruptManager:
    def __init__(self, vm: VmBackend, resources: Resources):
        self.vm = vm
        self.resources = resources
        self._lock = threading.Lock()
        self._pins: dict[int, PinInterrupt] = {}
        self._msis: dict[int, MsiInterrupt] = {}

    @property
    def has_irqchip(self) -> bool:
        return Capability.IRQCHIP in self.vm.capabilities

    def pin(self, owner: str, pin: int) -> PinInterrupt:
        """IOAPIC pin / ISA IRQ `pin` for `owner` (one owner per pin)."""
        if not 0 <= pin < IOAPIC_PINS:
            raise ConfigError(f"{owner}: IRQ {pin} is outside 0..{IOAPIC_PINS - 1}")
        self.resources.claim_gsi(owner, pin)
        line = PinInterrupt(self, owner, pin)
        with self._lock:
            self._pins[pin] = line
        return line

    def msi(self, owner: str, *, vector: int | None = None, cpu: int = 0) -> MsiInterrupt:
        """A new MSI for `owner` to `vector` on vCPU `cpu` (vector allocated when None)."""
        require(self.vm, Capability.MSI, f"the MSI of {owner}")
        if vector is None:
            vector = self.resources.allocate_vector(owner)
        else:
            vector = self.resources.claim_vector(owner, _vector(vector))
        gsi = self.resources.allocate_gsi(owner)
        line = MsiInterrupt(self, owner, gsi, msi_address(cpu), vector)
        with self._lock:
            self._msis[gsi] = line
        self._commit()
        return line

    def free(self, line: _Line) -> None:
        line.close()
        with self._lock:
            table = self._pins if isinstance(line, PinInterrupt) else self._msis
            table.pop(line.gsi, None)
        self.resources.release(line.owner)
        self._commit()

    def routes(self) -> list[Route]:
        with self._lock:
            msis = [MsiRoute(g, m.address, m.data) for g, m in sorted(self._msis.items())]
        return [*default_pin_routes(), *msis]

    def _commit(self) -> None:
        if not self.has_irqchip:
            return  # no routing table: pins and MSIs go straight to the backend's controller
        with self._lock:
            msis = [MsiRoute(g, m.address, m.data) for g, m in sorted(self._msis.items())]
            self.vm.set_routes([*default_pin_routes(), *msis])

    def lines(self) -> list[_Line]:
        with self._lock:
            return [*self._pins.values(), *self._msis.values()]

    def close(self) -> None:
        for line in self.lines():
            line.close()

    def to_dict(self) -> dict:
        """The routes MSIs were given (for snapshots: devices re-create their lines on restore,
        and reprogrammed MSI-X targets come back from here)."""
        with self._lock:
            return {
                "msi": [
                    {"owner": m.owner, "gsi": g, "address": m.address, "data": m.data}
                    for g, m in sorted(self._msis.items())
                ]
            }
