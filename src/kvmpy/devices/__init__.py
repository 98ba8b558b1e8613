"""Device models. Each is sans-IO: `read(offset, size)` and `write(offset, data)` change the
device's state and return an effect for the run loop to carry out (or None). No KVM calls happen
inside a device, so tests drive devices directly.

A device owns a plain `state()` value (a dict of JSON-able data) that snapshots save and
`restore_state()` puts back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Effect:
    """Something a device asks the VMM to do."""


@dataclass(frozen=True)
class Output(Effect):
    data: bytes


@dataclass(frozen=True)
class RaiseIrq(Effect):
    gsi: int
    level: int = 1


@dataclass(frozen=True)
class StopVm(Effect):
    """End the VM: `reason` is a `StopReason` value (e.g. "reset" for an i8042 reset)."""

    reason: str
    message: str = ""


class InterruptLine(Protocol):
    """An interrupt input a device drives (an ISA IRQ pin through the irqchip, an MSI...).

    Devices whose interrupt follows their state (a UART's IIR, the i8042's output buffer) call
    `set_level` whenever that state changes the line; the owner of interrupt routing turns it
    into KVM_IRQ_LINE or an irqfd. `trigger()` is a one-shot edge."""

    def set_level(self, level: bool) -> None: ...

    def trigger(self) -> None: ...


class NoInterrupt:
    """An unconnected interrupt line."""

    def set_level(self, level: bool) -> None:
        pass

    def trigger(self) -> None:
        pass


class Device:
    name = "device"

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> Effect | None:
        return None

    # Optional: `write_string(offset, size, data)` takes a whole `rep outs` (count items of
    # `size` bytes in `data`) in one call and returns one effect. Without it the run loop calls
    # `write` once per item.
    # Optional: `read_string(offset, size, data)` answers a whole `rep ins` batch (KVM hands
    # over up to 1 KiB per exit) by filling the writable view `data` in place, and returns one
    # effect or None. Without it the run loop calls `read` once per item.

    def state(self) -> dict:
        return {}

    def restore_state(self, state: dict) -> None:
        pass
