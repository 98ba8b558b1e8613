"""Interrupts into a guest: the LAPIC kvmpy enables, IDT handlers installed by the VMM
(`Machine.set_interrupt_handler`), MSIs delivered to them, and a CPL3 guest that sleeps in a
ring-0 `hlt` until one arrives."""

from __future__ import annotations

import struct
import threading
import time

import pytest

from kvmpy.arch.x86 import gdt as G
from kvmpy.arch.x86.modes import SEL_KCODE
from kvmpy.errors import ConfigError
from kvmpy.hv.kvm.vcpu import APIC_REG_SVR, APIC_SVR_ENABLE
from kvmpy.loader import load_raw
from kvmpy.machine import Machine, MachineConfig
from kvmpy.result import StopReason

VECTOR = 0x41

# The handler counts the interrupt and signals EOI to the x2APIC; `int3` (vector 3, DPL 3)
# sleeps in ring 0 unless an interrupt came since the guest last looked (rax = count seen).
GUEST = r"""
#include <kvmpy.h>
volatile unsigned long count;
__asm__(".globl handler\nhandler:\n"
	"push %rax\npush %rcx\npush %rdx\nincq count(%rip)\n"
	"mov $0x80b, %ecx\nxor %eax, %eax\nxor %edx, %edx\nwrmsr\n"
	"pop %rdx\npop %rcx\npop %rax\niretq\n"
	".globl wait_gate\nwait_gate:\n"
	"cmpq %rax, count(%rip)\njne 1f\nsti\nhlt\n1: iretq\n");
int main(void)
{
	unsigned long want = 5;
	while (count < want)
		__asm__ volatile("int3" : : "a"(count) : "memory");
	return (int)count;
}
"""


def _lapic_svr(machine) -> int:
    raw = bytes(machine.vcpus[0].fd.get_lapic())
    return int.from_bytes(raw[APIC_REG_SVR : APIC_REG_SVR + 4], "little")


@pytest.mark.kvm
def test_irqchip_machine_enables_the_lapic(kvm, assemble):
    with Machine(MachineConfig(mode="long", memory="16M", irqchip=True), kvm=kvm) as m:
        m.load(load_raw(assemble("hlt")))
        assert _lapic_svr(m) & APIC_SVR_ENABLE
        # An enabled LAPIC accepts an MSI; a software-disabled one refuses it (returns 0).
        assert m.vm.signal_msi(0xFEE0_0000, VECTOR) == 1


@pytest.mark.kvm
def test_installed_handler_takes_msis_while_the_guest_sleeps(kvm, build_guest):
    image = build_guest(GUEST, "long-user")
    with Machine(MachineConfig(mode="long-user", memory="16M", irqchip=True), kvm=kvm) as m:
        m.load_file(image)
        sym = m.image.symbols
        m.set_interrupt_handler(VECTOR, sym["handler"])
        m.set_interrupt_handler(3, sym["wait_gate"], dpl=3)

        def interrupts():
            for _ in range(5):
                time.sleep(0.02)
                m.vm.signal_msi(0xFEE0_0000, VECTOR)

        t = threading.Thread(target=interrupts)
        t.start()
        result = m.run(timeout=30)
        t.join()
    assert result.stop_reason is StopReason.EXIT, result.message
    assert result.exit_code == 5
    # Waiting and the interrupts themselves never left the kernel: only the exit hypercall.
    assert result.exits == {"io": 1}


@pytest.mark.kvm
def test_without_a_handler_the_interrupt_reaches_kvmpys_stub(kvm, build_guest):
    image = build_guest(GUEST, "long-user")
    with Machine(MachineConfig(mode="long-user", memory="16M", irqchip=True), kvm=kvm) as m:
        m.load_file(image)
        m.set_interrupt_handler(3, m.image.symbols["wait_gate"], dpl=3)
        threading.Timer(0.05, m.vm.signal_msi, (0xFEE0_0000, VECTOR)).start()
        result = m.run(timeout=30)
    assert result.stop_reason is StopReason.EXCEPTION
    assert result.fault.vector == VECTOR


@pytest.mark.kvm
@pytest.mark.parametrize(
    ("mode", "size"), [("long", 16), ("long-user", 16), ("protected", 8), ("real", 4)]
)
def test_set_interrupt_handler_writes_the_modes_gate(kvm, assemble, mode, size):
    bits = {"real": 16, "protected": 32}.get(mode, 64)
    with Machine(MachineConfig(mode=mode, memory="2M"), kvm=kvm) as m:
        m.load(load_raw(assemble("hlt", bits if bits != 16 else 32)))
        m.set_interrupt_handler(0x30, 0x1234, dpl=3)
        entry = m.memory.read(m.layout.idt + 0x30 * size, size)
    if size == 16:
        assert entry == G.gate64(0x1234, SEL_KCODE, dpl=3)
    elif size == 8:
        assert entry == G.gate32(0x1234, SEL_KCODE, dpl=3)
    else:
        assert struct.unpack("<HH", entry) == (0x1234, 0)


@pytest.mark.kvm
def test_set_interrupt_handler_checks_its_arguments(kvm, assemble):
    with Machine(MachineConfig(mode="long", memory="2M"), kvm=kvm) as m:
        with pytest.raises(ConfigError, match="load an image"):
            m.set_interrupt_handler(0x40, 0x1000)
        m.load(load_raw(assemble("hlt")))
        with pytest.raises(ConfigError, match="outside 0..255"):
            m.set_interrupt_handler(256, 0x1000)
        with pytest.raises(ConfigError, match="DPL"):
            m.set_interrupt_handler(0x40, 0x1000, dpl=4)
        with pytest.raises(ConfigError, match="not guest RAM"):
            m.set_interrupt_handler(0x40, 0x4000_0000)


@pytest.mark.kvm
def test_load_keeps_kvmpys_structures_out_of_reserved_ranges(kvm, assemble):
    top = 16 << 20
    reserved = (top - (4 << 20), top)
    with Machine(MachineConfig(mode="long-user", memory="16M"), kvm=kvm) as m:
        m.load(load_raw(assemble("hlt")))
        assert m.layout.end > reserved[0]  # by default they sit at the top of RAM
    with Machine(MachineConfig(mode="long-user", memory="16M"), kvm=kvm) as m:
        m.load(load_raw(assemble("hlt")), reserved=[reserved])
        for start, end in m.layout.reserved_ranges():
            assert end <= reserved[0] or start >= reserved[1]
