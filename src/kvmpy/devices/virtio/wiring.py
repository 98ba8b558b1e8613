"""How a transport reaches the machine: interrupt lines and ioeventfds, behind small
interfaces so transports are tested (and fuzzed) without KVM.

`IrqLine` wraps an `InterruptManager` line (vmm/interrupts.py). `fire()` is called from a
device's I/O thread: with irqfd it is one eventfd write and KVM injects the interrupt without
the VMM; without irqfd it is the backend's inject call. `Notifiers` hands out ioeventfds for
notify registers (None when the backend has no ioeventfd: the bus then delivers the write to
the transport, which wakes the queue itself).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol


class Irq(Protocol):
    def fire(self) -> None: ...

    def set_level(self, high: bool) -> None: ...


class Notifiers(Protocol):
    def add(self, addr: int, length: int, datamatch: int | None) -> int | None:
        """An eventfd signalled by guest writes to [addr, addr+length) (with `datamatch`,
        only writes of that value), or None if the backend cannot."""

    def remove(self, fd: int) -> None: ...


class IrqLine:
    """An interrupt line of the machine's InterruptManager (a PinInterrupt or an
    MsiInterrupt). `irqfd`: deliver through an eventfd (the line's irqfd)."""

    def __init__(self, line, irqfd: bool = True):
        self.line = line
        self._efd: int | None = line.eventfd() if irqfd else None
        self.fired = 0

    def fire(self) -> None:
        self.fired += 1
        if self._efd is not None:
            os.eventfd_write(self._efd, 1)
        else:
            self.line.trigger()

    def set_level(self, high: bool) -> None:
        self.line.set_level(high)


class MsiVector:
    """One MSI-X table entry's interrupt: an MsiInterrupt whose message the guest programs.
    `cpu` (kvmpy's --irq-cpu) overrides the destination the guest wrote, so the VMM decides
    which vCPU takes the interrupt; None keeps the guest's choice."""

    def __init__(self, line, cpu: int | None = None, irqfd: bool = True):
        self.line = line
        self.cpu = cpu
        self._irqfd = irqfd
        self._efd: int | None = None
        self.fired = 0

    def configure(self, address: int, data: int) -> None:
        if self.cpu is not None:
            address = (address & ~(0xFF << 12)) | (self.cpu & 0xFF) << 12
        self.line.configure(address, data)

    def fire(self) -> None:
        self.fired += 1
        if self._irqfd:
            if self._efd is None:
                self._efd = self.line.eventfd()
            os.eventfd_write(self._efd, 1)
        else:
            self.line.trigger()

    def set_level(self, high: bool) -> None:  # MSIs are edges
        if high:
            self.fire()


class CallbackIrq:
    """An Irq that calls a function (tests, and machines without an interrupt controller)."""

    def __init__(self, on_fire: Callable[[], None] | None = None):
        self.on_fire = on_fire
        self.fired = 0
        self.level = False

    def fire(self) -> None:
        self.fired += 1
        if self.on_fire is not None:
            self.on_fire()

    def set_level(self, high: bool) -> None:
        if high and not self.level:
            self.fire()
        self.level = high


class NoNotifiers:
    """No ioeventfds: every notify write reaches the transport."""

    def add(self, addr: int, length: int, datamatch: int | None) -> int | None:
        return None

    def remove(self, fd: int) -> None:
        pass


class VmIoeventfds:
    """ioeventfds of a VM backend (anything with KVM's `ioeventfd(fd, addr, length,
    datamatch, pio, deassign)`)."""

    def __init__(self, vm, pio: bool = False):
        self.vm = vm
        self.pio = pio
        self._fds: dict[int, tuple[int, int, int | None]] = {}

    def add(self, addr: int, length: int, datamatch: int | None) -> int | None:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self.vm.ioeventfd(fd, addr, length, datamatch=datamatch, pio=self.pio)
        except BaseException:
            os.close(fd)
            raise
        self._fds[fd] = (addr, length, datamatch)
        return fd

    def remove(self, fd: int) -> None:
        spec = self._fds.pop(fd, None)
        if spec is None:
            return
        addr, length, datamatch = spec
        try:
            self.vm.ioeventfd(fd, addr, length, datamatch=datamatch, pio=self.pio, deassign=True)
        except OSError:
            pass  # the VM is going away
        os.close(fd)
