"""Interrupts into a guest: the LAPIC kvmpy enables for an in-kernel irqchip."""

from __future__ import annotations

import pytest

from kvmpy.loader import load_raw
from kvmpy.machine import APIC_REG_SVR, APIC_SVR_ENABLE, Machine, MachineConfig

VECTOR = 0x41


def _lapic_svr(machine) -> int:
    raw = bytes(machine.vcpu.fd.get_lapic())
    return int.from_bytes(raw[APIC_REG_SVR : APIC_REG_SVR + 4], "little")


@pytest.mark.kvm
def test_irqchip_machine_enables_the_lapic(kvm, assemble):
    with Machine(MachineConfig(mode="long", memory="16M", irqchip=True), kvm=kvm) as m:
        m.load(load_raw(assemble("hlt")))
        assert _lapic_svr(m) & APIC_SVR_ENABLE
        # An enabled LAPIC accepts an MSI; a software-disabled one refuses it (returns 0).
        assert m.vm.signal_msi(0xFEE0_0000, VECTOR) == 1
