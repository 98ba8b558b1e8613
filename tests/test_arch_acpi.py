"""Minimal ACPI tables (checksums, pointers, \\_S5) and the sleep-control port."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.arch.x86 import acpi as A
from kvmpy.devices import StopVm


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
    # Not hardware-reduced: Linux would then assume no 8259 and map no ISA IRQ (the UART's 4).
    assert not struct.unpack_from("<I", fadt, 112)[0] & A.FADT_HW_REDUCED_ACPI
    assert struct.unpack_from("<H", fadt, 109)[0] & A.IAPC_8042
    assert struct.unpack_from("<II", fadt, 56) == (A.PM1_EVT_PORT, 0)
    assert struct.unpack_from("<I", fadt, 64)[0] == A.PM1_CNT_PORT
    assert (fadt[88], fadt[89]) == (4, 2)
    space, _, _, _, port = struct.unpack_from("<BBBBQ", fadt, 172)
    assert (space, port) == (A.GAS_SYSTEM_IO, A.PM1_CNT_PORT)
    facs_at = struct.unpack_from("<I", fadt, 36)[0]
    assert facs_at % 64 == 0 and struct.unpack_from("<Q", fadt, 132)[0] == facs_at
    data, _ = A.build_acpi_tables(2)
    assert data[facs_at - A.ACPI_TABLES_START :][:4] == b"FACS"
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


def test_pm1_control_s5_powers_off():
    dev = A.PmControl()
    s5 = A.S5_SLP_TYP << A.SLP_TYP_SHIFT
    # Linux writes SLP_TYP first, then SLP_TYP | SLP_EN (acpi_hw_legacy_sleep).
    assert dev.write(4, s5.to_bytes(2, "little")) is None
    assert dev.write(4, (3 << A.SLP_TYP_SHIFT | A.SLP_EN).to_bytes(2, "little")) is None  # S3
    assert dev.write(4, (s5 | A.SLP_EN).to_bytes(2, "little")).reason == "poweroff"
    assert dev.read(4, 2)[0] & A.SCI_EN  # always in ACPI mode
    assert dev.read(0, 2) == b"\0\0"  # no events
    dev.write(2, b"\x20\x01")
    assert dev.read(2, 2) == b"\x20\x01"
    # A byte write of the high half with SLP_EN is an S5 request too.
    assert dev.write(5, bytes([(s5 | A.SLP_EN) >> 8])).reason == "poweroff"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.booleans(), st.integers(0, 7), st.integers(1, 4), st.binary(min_size=1, max_size=4)
        ),
        max_size=50,
    )
)
def test_fuzz_pm_control(accesses):
    dev = A.PmControl()
    for is_write, offset, size, data in accesses:
        if is_write:
            effect = dev.write(offset, data)
            assert effect is None or isinstance(effect, StopVm)
        else:
            assert len(dev.read(offset, size)) == size
        assert dev.control & A.SCI_EN
