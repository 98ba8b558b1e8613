"""CPUID for a vCPU: what KVM supports (KVM_GET_SUPPORTED_CPUID), with per-vCPU APIC IDs."""

from __future__ import annotations

from ...kvm.constants import KVM_CPUID_FLAG_SIGNIFCANT_INDEX
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


# --- a normalised CPUID for Linux guests -----------------------------------------------------------

CPUID_1_ECX_CX16 = 1 << 13
CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_1_EDX_HTT = 1 << 28
KVM_CPUID_SIGNATURE = 0x4000_0000
KVM_CPUID_FEATURES = 0x4000_0001
# KVM paravirtual features (Documentation/virt/kvm/x86/cpuid.rst) that need a hypercall the
# host answers: on KVM-PVM the guest hung in the `vmcall` of PV_SEND_IPI, so kvmpy offers them
# only when asked (they are KVM's own, in-kernel, on VT-x/AMD-V hosts).
KVM_FEATURE_PV_UNHALT = 1 << 7
KVM_FEATURE_PV_SEND_IPI = 1 << 11
KVM_FEATURE_PV_SCHED_YIELD = 1 << 13
# Hypercalls that exit to the VMM (KVM_CAP_EXIT_HYPERCALL) and features for confidential or
# migrating guests: kvmpy implements none of them.
KVM_FEATURE_HC_MAP_GPA_RANGE = 1 << 16
KVM_FEATURE_MIGRATION_CONTROL = 1 << 17
PV_HYPERCALL_FEATURES = KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD
UNIMPLEMENTED_KVM_FEATURES = KVM_FEATURE_HC_MAP_GPA_RANGE | KVM_FEATURE_MIGRATION_CONTROL
# Topology level types in leaf 0xB/0x1F ECX[15:8].
LEVEL_SMT = 1
LEVEL_CORE = 2


def linux_cpuid(
    supported: list[kvm_cpuid_entry2],
    vcpu_id: int,
    num_vcpus: int,
    *,
    software_host: bool = False,
    pv_hypercalls: bool = False,
) -> list[kvm_cpuid_entry2]:
    """CPUID for vCPU `vcpu_id` of a Linux guest with `num_vcpus` vCPUs: one package of
    `num_vcpus` cores with one thread each, APIC ID = vCPU index; the hypervisor bit; KVM's
    paravirtual leaves without the features kvmpy cannot back (see above); no PMU (leaf 0xA:
    kvmpy does not virtualise perf counters); and, on a software host, CX16 hidden
    (`cmpxchg16b` is not emulated there, and this is the one bit KVM-PVM lets a VMM clear)."""
    if not 1 <= num_vcpus <= 255 or not 0 <= vcpu_id < num_vcpus:
        raise ValueError(f"vCPU {vcpu_id} of {num_vcpus} is not a valid topology")
    core_bits = max(0, (num_vcpus - 1).bit_length())
    out = []
    for e in supported:
        e = kvm_cpuid_entry2.from_buffer_copy(e)
        fn = e.function
        if fn == 1:
            e.ebx = (e.ebx & 0x0000FFFF) | (vcpu_id << 24) | (min(num_vcpus, 255) << 16)
            e.ecx |= CPUID_1_ECX_HYPERVISOR
            if software_host:
                e.ecx &= ~CPUID_1_ECX_CX16
            if num_vcpus > 1:
                e.edx |= CPUID_1_EDX_HTT
            else:
                e.edx &= ~CPUID_1_EDX_HTT
        elif fn == 4:
            # Cache leaves: "cores per package - 1" in EAX[31:26]; caches shared by one thread.
            if e.eax & 0x1F:
                e.eax = (e.eax & 0x3FFF) | ((num_vcpus - 1) << 26)
        elif fn in (0xB, 0x1F):
            continue  # rebuilt below
        elif fn == 0xA:
            e.eax = e.ebx = e.ecx = e.edx = 0
        elif fn == KVM_CPUID_FEATURES:
            e.eax &= ~UNIMPLEMENTED_KVM_FEATURES
            if not pv_hypercalls:
                e.eax &= ~PV_HYPERCALL_FEATURES
        out.append(e)
    # Extended topology: an SMT level of one thread, a core level of `num_vcpus` cores.
    levels = [(0, 1, LEVEL_SMT), (core_bits, num_vcpus, LEVEL_CORE), (0, 0, 0)]
    for index, (shift, count, kind) in enumerate(levels):
        out.append(
            kvm_cpuid_entry2(
                function=0xB, index=index, flags=KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax=shift, ebx=count, ecx=(kind << 8) | index, edx=vcpu_id,
            )
        )  # fmt: skip
    return out
