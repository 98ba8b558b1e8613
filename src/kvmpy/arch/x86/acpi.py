"""Minimal ACPI tables for a Linux guest: RSDP, XSDT, a FADT with a PM1 block, a FACS, a DSDT
that only declares `\\_S5` (so `poweroff` works), and a MADT listing the LAPICs and the IOAPIC.

Not hardware-reduced ACPI (Firecracker's choice): on x86 Linux a HW_REDUCED_ACPI FADT also
means "no 8259", so it maps no legacy ISA IRQ onto the IOAPIC, and without DSDT devices
declaring them the UART's IRQ 4 is never wired: measured with Debian's kernel, whose console
went silent after `Run /init` (its `poweroff` did work). A classic FADT keeps the PIC and the
identity ISA mappings; its PM1 control register, an I/O port that `PmControl` (a sans-IO
device) turns into a `StopVm("poweroff")` effect, takes Linux's S5 write (`SLP_TYP << 10 | SLP_EN`).
SMI_CMD is 0: the platform is always in ACPI mode, so there is no SMI handshake to model.
"""

from __future__ import annotations

import struct

from ...devices import Device, StopVm
from ...errors import ConfigError
from .mptable import APIC_DEFAULT_BASE, IOAPIC_DEFAULT_BASE

ACPI_TABLES_START = 0xE0000
ACPI_TABLES_END = 0x100000
OEM_ID = b"KVMPY "
OEM_TABLE_ID = b"KVMPYVM "
CREATOR_ID = b"KVPY"

PM1_EVT_PORT = 0x600  # PM1a status (2 bytes) + enable (2 bytes)
PM1_CNT_PORT = 0x604  # PM1a control (2 bytes)
PM_PORTS = 8
PM1_EVT_LEN = 4
PM1_CNT_LEN = 2
SCI_EN = 1 << 0
SLP_EN = 1 << 13
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 7 << 10
S5_SLP_TYP = 5
SCI_IRQ = 9

FADT_WBINVD = 1 << 0
FADT_PWR_BUTTON = 1 << 4  # "no fixed power button"
FADT_SLP_BUTTON = 1 << 5  # "no fixed sleep button"
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20
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


def build_facs() -> bytes:
    """The FACS (no checksum, 64-byte aligned): required with a classic FADT; kvmpy's guests
    never sleep to S3, so the waking vectors stay zero."""
    return struct.pack("<4sIIIII", b"FACS", 64, 0, 0, 0, 0).ljust(32, b"\0") + bytes([2]).ljust(
        32, b"\0"
    )


def build_fadt(dsdt: int, facs: int) -> bytes:
    body = bytearray(276 - 36)

    def put(offset: int, fmt: str, *values) -> None:
        struct.pack_into("<" + fmt, body, offset - 36, *values)

    put(36, "I", facs)  # FIRMWARE_CTRL
    put(40, "I", dsdt)  # DSDT (32-bit)
    put(45, "B", 0)  # preferred PM profile: unspecified
    put(46, "H", SCI_IRQ)
    put(48, "I", 0)  # SMI_CMD: none, always in ACPI mode
    put(56, "I", PM1_EVT_PORT)  # PM1a_EVT_BLK
    put(64, "I", PM1_CNT_PORT)  # PM1a_CNT_BLK
    put(88, "B", PM1_EVT_LEN)
    put(89, "B", PM1_CNT_LEN)
    put(109, "H", IAPC_8042)  # IA-PC boot architecture flags
    put(112, "I", FADT_WBINVD | FADT_PWR_BUTTON | FADT_SLP_BUTTON)
    put(131, "B", 0)  # FADT minor version (6.0)
    put(132, "Q", facs)  # X_FIRMWARE_CTRL
    put(140, "Q", dsdt)  # X_DSDT
    body[148 - 36 : 160 - 36] = _gas(PM1_EVT_PORT, 8 * PM1_EVT_LEN)  # X_PM1a_EVT_BLK
    body[172 - 36 : 184 - 36] = _gas(PM1_CNT_PORT, 8 * PM1_CNT_LEN)  # X_PM1a_CNT_BLK
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
    facs_at = xsdt_at + 64  # 64-byte aligned, as the FACS must be
    dsdt = _sdt(b"DSDT", 2, DSDT_AML)
    dsdt_at = facs_at + 64
    fadt_at = (dsdt_at + len(dsdt) + 15) & ~15
    fadt = build_fadt(dsdt_at, facs_at)
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
    for at, blob in ((rsdp_at, rsdp), (xsdt_at, xsdt), (facs_at, build_facs()),
                     (dsdt_at, dsdt), (fadt_at, fadt), (madt_at, madt)):  # fmt: skip
        out[at - base : at - base + len(blob)] = blob
    return bytes(out), rsdp_at


class PmControl(Device):
    """The FADT's PM1a event block (offsets 0-3: status, enable) and control block (offsets 4-5)
    at PM1_EVT_PORT. A control write with SLP_EN and SLP_TYP 5 (S5, soft off) powers the VM
    off; other sleep states are ignored, as `\\_S5` is the only one declared. Status bits are
    write-1-to-clear and nothing sets them (no fixed events), so SCI never fires."""

    name = "acpi-pm"

    def __init__(self) -> None:
        self.enable = 0
        self.control = SCI_EN  # always in ACPI mode (SMI_CMD is 0)

    def read(self, offset: int, size: int) -> bytes:
        regs = struct.pack("<HHH", 0, self.enable, self.control) + b"\0\0"
        out = regs[offset : offset + size] if 0 <= offset < len(regs) else b""
        return out.ljust(size, b"\0")

    def write(self, offset: int, data: bytes) -> StopVm | None:
        if not data:
            return None
        value = int.from_bytes(data[:2], "little")
        if offset == 2:
            self.enable = value & 0xFFFF if len(data) > 1 else (self.enable & 0xFF00) | value
        elif offset == 4:
            if len(data) == 1:
                value = (self.control & 0xFF00) | value
            self.control = (value & ~SLP_EN) | SCI_EN
            if value & SLP_EN and (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT == S5_SLP_TYP:
                return StopVm("poweroff", "the guest powered off (ACPI S5)")
        elif offset == 5:
            value = (data[0] << 8) | (self.control & 0xFF)
            self.control = (value & ~SLP_EN) | SCI_EN
            if value & SLP_EN and (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT == S5_SLP_TYP:
                return StopVm("poweroff", "the guest powered off (ACPI S5)")
        return None

    def state(self) -> dict:
        return {"enable": self.enable, "control": self.control}

    def restore_state(self, state: dict) -> None:
        self.enable = int(state.get("enable", 0)) & 0xFFFF
        self.control = (int(state.get("control", 0)) & 0xFFFF) | SCI_EN
