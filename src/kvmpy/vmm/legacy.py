"""The PC's legacy devices as device kinds (devices/registry.py), so a `VmConfig` lists them
and a snapshot rebuilds them: what a Linux guest expects to find on a PC.

    serial     a 16550A UART (COM1: port 0x3F8, IRQ 4)        devices/legacy/serial.py
    i8042      keyboard controller: `reboot` (0x60, 0x64, IRQ 1) devices/legacy/i8042.py
    cmos-rtc   the CMOS clock with the host's time (0x70-0x71)  devices/legacy/rtc.py
    acpi-pm    the FADT's PM1 block: `poweroff` (0x600-0x607)   arch/x86/acpi.py

Each claims its ports through the machine (so a collision names both owners) and its
interrupt as a pin of the machine's interrupt owner (`machine.interrupts.pin`): the devices set
the line's level, the owner turns it into KVM_IRQ_LINE.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..arch.x86.acpi import PM1_EVT_PORT, PM_PORTS, PmControl
from ..devices import NoInterrupt
from ..devices.legacy import i8042, rtc, serial
from ..devices.registry import device_kind
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..machine import Machine

#: ISA ports a device kind here may be placed at.
MAX_PORT = 0xFFFF


def _int(id: str, name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"device {id}: {name} must be an integer in {lo:#x}..{hi:#x}")
    return value


def _pin(machine: Machine, id: str, irq: int):
    """IRQ `irq` from the interrupt owner, or an unconnected line on a machine without an
    irqchip (nothing could take the interrupt there)."""
    if not machine.config.irqchip:
        return NoInterrupt()
    return machine.interrupts.pin(id, irq)


@device_kind("serial")
def make_serial(machine: Machine, id: str, *, port: int = serial.COM1_PORT,
                irq: int = serial.COM1_IRQ,
                input_limit: int = serial.DEFAULT_INPUT_LIMIT) -> serial.Serial16550:  # fmt: skip
    port = _int(id, "port", port, 0, MAX_PORT - serial.PORTS + 1)
    irq = _int(id, "irq", irq, 0, 23)
    input_limit = _int(id, "input_limit", input_limit, 1, 1 << 24)
    dev = serial.Serial16550(_pin(machine, id, irq), input_limit)
    dev.name = id
    machine.add_pio_device(port, serial.PORTS, dev)
    return dev


@device_kind("i8042")
def make_i8042(machine: Machine, id: str, *, irq: int = i8042.KBD_IRQ) -> i8042.I8042:
    irq = _int(id, "irq", irq, 0, 23)
    dev = i8042.I8042(_pin(machine, id, irq))
    dev.name = id
    # Two one-port ranges: 0x61 (port B, the PC speaker and PIT gate) sits between them and
    # belongs to the in-kernel PIT. The controller's state is saved through the data port.
    for port in (i8042.DATA_PORT, i8042.COMMAND_PORT):
        p = dev.port_device(port)
        p.name = id
        machine.add_pio_device(port, 1, p)
    return dev


@device_kind("cmos-rtc")
def make_cmos_rtc(machine: Machine, id: str) -> rtc.CmosRtc:
    dev = rtc.CmosRtc()
    dev.name = id
    machine.add_pio_device(rtc.INDEX_PORT, 2, dev)
    return dev


@device_kind("acpi-pm")
def make_acpi_pm(machine: Machine, id: str) -> PmControl:
    dev = PmControl()
    dev.name = id
    machine.add_pio_device(PM1_EVT_PORT, PM_PORTS, dev)
    return dev
