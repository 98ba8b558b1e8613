"""CPUID for a vCPU: what KVM supports (KVM_GET_SUPPORTED_CPUID), with per-vCPU APIC IDs."""

from __future__ import annotations

from ...kvm.structs import kvm_cpuid_entry2


def vcpu_cpuid(supported: list[kvm_cpuid_entry2], vcpu_id: int) -> list[kvm_cpuid_entry2]:
    out = []
    for e in supported:
        e = kvm_cpuid_entry2.from_buffer_copy(e)
        if e.function == 1:
            e.ebx = (e.ebx & 0x00FFFFFF) | (vcpu_id << 24)
        elif e.function in (0xB, 0x1F):
            e.edx = vcpu_id  # x2APIC ID
        out.append(e)
    return out
