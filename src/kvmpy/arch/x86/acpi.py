"""Minimal ACPI tables for a Linux guest: RSDP, XSDT, a hardware-reduced FADT, a DSDT that only
declares `\\_S5` (so `poweroff` works), and a MADT listing the LAPICs and the IOAPIC.

Hardware-reduced ACPI (ACPI 6, FADT flag HW_REDUCED_ACPI) is Firecracker's and cloud-
hypervisor's choice too: no PM1 event/timer blocks, no SCI sources, no AML interpreter work
beyond one package. Sleep goes through the FADT's sleep control register, here an I/O port
that `SleepControl` (a sans-IO device) turns into a `PowerOff` effect when the guest asks for S5:
Linux's acpi_hw_extended_sleep writes `SLP_TYP << 2 | SLP_EN` there.
"""

from __future__ import annotations

import struct

from ...devices import Device, PowerOff
from ...errors import ConfigError
from .mptable import APIC_DEFAULT_BASE, IOAPIC_DEFAULT_BASE

ACPI_TABLES_START = 0xE0000
ACPI_TABLES_END = 0x100000
OEM_ID = b"KVMPY "
OEM_TABLE_ID = b"KVMPYVM "
CREATOR_ID = b"KVPY"

SLEEP_CONTROL_PORT = 0x600
SLEEP_STATUS_PORT = 0x601
SLP_EN = 1 << 5
SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 7 << 2
S5_SLP_TYP = 5
SCI_IRQ = 9

FADT_HW_REDUCED_ACPI = 1 << 20
FADT_PWR_BUTTON = 1 << 4  # "no fixed power button"
FADT_SLP_BUTTON = 1 << 5  # "no fixed sleep button"
IAPC_8042 = 1 << 1  # the i8042 is present (else Linux does not probe it)
MADT_PCAT_COMPAT = 1

# Generic Address Structure: address space 1 = system I/O.
GAS_SYSTEM_IO = 1


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def _sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    length = 36 + len(body)
    hdr = struct.pack(
        "<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, 1
    )
    table = bytearray(hdr + body)
    table[9] = _checksum(bytes(table))
    return bytes(table)


def _gas(port: int, width_bits: int = 8) -> bytes:
    # space, bit width, bit offset, access size (1 = byte), address
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, width_bits, 0, 1, port)


# \_S5: Name (_S5, Package (4) { 5, 0, 0, 0 }) -- NameOp, "_S5_", PackageOp, PkgLength (7),
# NumElements (4), BytePrefix 5, ZeroOp x3.
DSDT_AML = bytes([0x08]) + b"_S5_" + bytes([0x12, 0x07, 0x04, 0x0A, S5_SLP_TYP, 0x00, 0x00, 0x00])


def build_fadt(dsdt: int) -> bytes:
    body = bytearray(276 - 36)

    def put(offset: int, fmt: str, *values) -> None:
        struct.pack_into("<" + fmt, body, offset - 36, *values)

    put(40, "I", dsdt)  # DSDT (32-bit)
    put(45, "B", 0)  # preferred PM profile: unspecified
    put(46, "H", SCI_IRQ)
    put(109, "H", IAPC_8042)  # IA-PC boot architecture flags
    put(112, "I", FADT_HW_REDUCED_ACPI | FADT_PWR_BUTTON | FADT_SLP_BUTTON)
    put(131, "B", 0)  # FADT minor version (6.0)
    put(140, "Q", dsdt)  # X_DSDT
    body[244 - 36 : 256 - 36] = _gas(SLEEP_CONTROL_PORT)
    body[256 - 36 : 268 - 36] = _gas(SLEEP_STATUS_PORT)
    put(268, "8s", b"KVMPY\0\0\0")  # hypervisor vendor identity
    return _sdt(b"FACP", 6, bytes(body))


def build_madt(num_cpus: int) -> bytes:
    body = bytearray(struct.pack("<II", APIC_DEFAULT_BASE, MADT_PCAT_COMPAT))
    for cpu in range(num_cpus):
        body += struct.pack("<BBBBI", 0, 8, cpu, cpu, 1)  # processor local APIC, enabled
    body += struct.pack("<BBBBII", 1, 12, num_cpus, 0, IOAPIC_DEFAULT_BASE, 0)  # IOAPIC, GSI 0
    body += struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)  # local APIC NMI on LINT1, all CPUs
    return _sdt(b"APIC", 5, bytes(body))


def build_acpi_tables(num_cpus: int, base: int = ACPI_TABLES_START) -> tuple[bytes, int]:
    """The tables laid out from `base`; returns (bytes, RSDP address). The RSDP comes first so
    the legacy scan of 0xE0000-0xFFFFF finds it too (kvmpy also passes it in the zero page)."""
    if not 1 <= num_cpus <= 255:
        raise ConfigError(f"the MADT describes 1 to 255 CPUs, not {num_cpus}")
    rsdp_at = base
    xsdt_at = base + 64
    dsdt = _sdt(b"DSDT", 2, DSDT_AML)
    dsdt_at = xsdt_at + 64
    fadt_at = (dsdt_at + len(dsdt) + 15) & ~15
    fadt = build_fadt(dsdt_at)
    madt_at = (fadt_at + len(fadt) + 15) & ~15
    madt = build_madt(num_cpus)
    xsdt = _sdt(b"XSDT", 1, struct.pack("<QQ", fadt_at, madt_at))
    assert len(xsdt) <= 64
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, 0, 36, xsdt_at, 0))
    rsdp[8] = _checksum(bytes(rsdp[:20]))
    rsdp[32] = _checksum(bytes(rsdp))
    end = madt_at + len(madt)
    if end > ACPI_TABLES_END:
        raise ConfigError(f"ACPI tables for {num_cpus} CPUs do not fit below 1 MiB")
    out = bytearray(end - base)
    for at, blob in ((rsdp_at, rsdp), (xsdt_at, xsdt), (dsdt_at, dsdt), (fadt_at, fadt),
                     (madt_at, madt)):  # fmt: skip
        out[at - base : at - base + len(blob)] = blob
    return bytes(out), rsdp_at


class SleepControl(Device):
    """The FADT's sleep control (offset 0) and status (offset 1) registers, at
    SLEEP_CONTROL_PORT. A write of SLP_EN with SLP_TYP 5 (S5, soft off) powers the VM off;
    other sleep states are not supported and ignored, as `\\_S5` is the only one declared."""

    name = "acpi-sleep"

    def __init__(self) -> None:
        self.last_write = 0

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)  # status: WAK_STS clear

    def write(self, offset: int, data: bytes) -> PowerOff | None:
        if offset != 0 or not data:
            return None
        value = data[0]
        self.last_write = value
        if value & SLP_EN and (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT == S5_SLP_TYP:
            return PowerOff("ACPI S5")
        return None

    def state(self) -> dict:
        return {"last_write": self.last_write}

    def restore_state(self, state: dict) -> None:
        self.last_write = int(state.get("last_write", 0)) & 0xFF
