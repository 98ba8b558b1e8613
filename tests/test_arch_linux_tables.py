"""The MP table and the normalised CPUID for Linux guests."""

from __future__ import annotations

import pytest

from kvmpy.arch.x86 import cpuid as C
from kvmpy.arch.x86.mptable import MPTABLE_START, build_mptable, parse_mptable
from kvmpy.errors import ConfigError
from kvmpy.kvm.structs import kvm_cpuid_entry2


@pytest.mark.parametrize("n", [1, 2, 8, 32])
def test_mptable(n):
    data = build_mptable(n)
    t = parse_mptable(data)  # checks both checksums
    assert [cpu for cpu, _ in t["cpus"]] == list(range(n))
    assert t["cpus"][0][1] == 3 and all(flags == 1 for _, flags in t["cpus"][1:])  # BSP first
    assert t["buses"] == ["ISA   "]
    assert t["ioapics"] == [(n, 0xFEC0_0000)]
    assert t["irqs"] == [(irq, irq) for irq in range(16)]  # IRQ n on pin n
    assert sorted(pin for _, pin in t["lints"]) == [0, 1]
    assert int.from_bytes(data[4:8], "little") == MPTABLE_START + 16


def test_mptable_limits():
    with pytest.raises(ConfigError):
        build_mptable(0)
    with pytest.raises(ConfigError, match="does not fit"):
        build_mptable(60)


def supported():
    def e(fn, idx=0, eax=0, ebx=0, ecx=0, edx=0, flags=0):
        return kvm_cpuid_entry2(
            function=fn, index=idx, flags=flags, eax=eax, ebx=ebx, ecx=ecx, edx=edx
        )

    return [
        e(0, eax=0xD),
        e(1, eax=0xB00F21, ebx=0x20800, ecx=0x81202000 | C.CPUID_1_ECX_CX16, edx=0x78BFBFF),
        e(4, eax=0x121, flags=1),
        e(0xA, eax=0x7300402),
        e(0xB, flags=1),
        e(C.KVM_CPUID_FEATURES, eax=0x1007EFB),
    ]


def leaf(entries, fn, idx=0):
    return next(x for x in entries if x.function == fn and x.index == idx)


def test_linux_cpuid_topology_and_apic_ids():
    for vcpu in range(3):
        out = C.linux_cpuid(supported(), vcpu, 3)
        one = leaf(out, 1)
        assert one.ebx >> 24 == vcpu and (one.ebx >> 16) & 0xFF == 3
        assert one.ecx & C.CPUID_1_ECX_HYPERVISOR and one.edx & C.CPUID_1_EDX_HTT
        smt, core, end = leaf(out, 0xB, 0), leaf(out, 0xB, 1), leaf(out, 0xB, 2)
        assert (smt.ebx, smt.ecx >> 8 & 0xFF) == (1, C.LEVEL_SMT)
        assert (core.eax, core.ebx, core.ecx >> 8 & 0xFF) == (2, 3, C.LEVEL_CORE)
        assert end.ecx >> 8 & 0xFF == 0
        assert {smt.edx, core.edx, end.edx} == {vcpu}
        assert leaf(out, 4).eax >> 26 == 2


def test_linux_cpuid_pv_features_and_pmu():
    out = C.linux_cpuid(supported(), 0, 1)
    pv = leaf(out, C.KVM_CPUID_FEATURES).eax
    assert not pv & C.PV_HYPERCALL_FEATURES and not pv & C.UNIMPLEMENTED_KVM_FEATURES
    assert pv & 1  # kvmclock stays
    assert leaf(out, 0xA).eax == 0
    assert not leaf(out, 1).edx & C.CPUID_1_EDX_HTT
    kept = C.linux_cpuid(supported(), 0, 1, pv_hypercalls=True)
    assert leaf(kept, C.KVM_CPUID_FEATURES).eax & C.KVM_FEATURE_PV_SEND_IPI


def test_cx16_hidden_only_on_a_software_host():
    assert leaf(C.linux_cpuid(supported(), 0, 1), 1).ecx & C.CPUID_1_ECX_CX16
    assert (
        not leaf(C.linux_cpuid(supported(), 0, 1, software_host=True), 1).ecx & C.CPUID_1_ECX_CX16
    )


def test_bad_topology():
    with pytest.raises(ValueError):
        C.linux_cpuid(supported(), 2, 2)
