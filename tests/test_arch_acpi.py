"""Minimal ACPI tables (checksums, pointers, \\_S5) and the sleep-control port."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from kvmpy.arch.x86 import acpi as A
from kvmpy.devices import PowerOff


def tables(n=2):
    data, rsdp = A.build_acpi_tables(n)
    base = A.ACPI_TABLES_START

    def at(addr):
        length = struct.unpack_from("<I", data, addr - base + 4)[0]
        blob = data[addr - base : addr - base + length]
        assert sum(blob) & 0xFF == 0, blob[:4]
        return blob

    assert rsdp == base and data[:8] == b"RSD PTR "
    assert sum(data[:20]) & 0xFF == 0 and sum(data[:36]) & 0xFF == 0
    xsdt = at(struct.unpack_from("<Q", data, 24)[0])
    fadt_at, madt_at = struct.unpack_from("<QQ", xsdt, 36)
    fadt, madt = at(fadt_at), at(madt_at)
    dsdt = at(struct.unpack_from("<Q", fadt, 140)[0])
    return xsdt, fadt, madt, dsdt


def test_tables_link_up_with_good_checksums():
    xsdt, fadt, madt, dsdt = tables()
    assert (xsdt[:4], fadt[:4], madt[:4], dsdt[:4]) == (b"XSDT", b"FACP", b"APIC", b"DSDT")
    assert struct.unpack_from("<I", fadt, 112)[0] & A.FADT_HW_REDUCED_ACPI
    assert struct.unpack_from("<H", fadt, 109)[0] & A.IAPC_8042
    space, _, _, _, port = struct.unpack_from("<BBBBQ", fadt, 244)
    assert (space, port) == (A.GAS_SYSTEM_IO, A.SLEEP_CONTROL_PORT)
    assert A.DSDT_AML in dsdt


def test_madt_lists_every_cpu_and_the_ioapic():
    _, _, madt, _ = tables(3)
    pos, lapics, ioapics = 44, [], []
    while pos < len(madt):
        kind, length = madt[pos], madt[pos + 1]
        if kind == 0:
            lapics.append(madt[pos + 3])
        elif kind == 1:
            ioapics.append(struct.unpack_from("<I", madt, pos + 4)[0])
        pos += length
    assert lapics == [0, 1, 2] and ioapics == [0xFEC0_0000]


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) cross-check")
def test_iasl_disassembles_the_dsdt(tmp_path):
    _, _, _, dsdt = tables()
    (tmp_path / "dsdt.dat").write_bytes(dsdt)
    subprocess.run(["iasl", "-d", "dsdt.dat"], cwd=tmp_path, capture_output=True, check=True)
    text = (tmp_path / "dsdt.dsl").read_text()
    assert "Name (_S5, Package (0x04)" in text


def test_sleep_control_s5_powers_off():
    dev = A.SleepControl()
    assert dev.write(0, bytes([A.S5_SLP_TYP << 2])) is None  # no SLP_EN
    assert dev.write(0, bytes([3 << 2 | A.SLP_EN])) is None  # S3: not offered
    assert isinstance(dev.write(0, bytes([A.S5_SLP_TYP << 2 | A.SLP_EN])), PowerOff)
    assert dev.write(1, b"\xff") is None
    assert dev.read(1, 1) == b"\x00"
