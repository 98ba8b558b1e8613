"""The guest TSC offset (KVM_VCPU_TSC_OFFSET): VMs given offset 0 share the host's TSC.

KVM on VT-x/AMD-V starts each VM's TSC near zero and honours a new offset; KVM-PVM keeps every
guest on the host's TSC and ignores offsets (it reports 0). Either way, after
`set_tsc_offset(0)` two VMs read one clock, which is what kvmpy ipc relies on."""

from __future__ import annotations

import pytest

from kvmpy.machine import Machine, MachineConfig

MSR_IA32_TSC = 0x10


def _tsc(fd) -> int:
    return fd.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC]


@pytest.mark.kvm
def test_tsc_offset_zero_gives_two_vms_one_timebase(kvm):
    with (
        Machine(MachineConfig(mode="long", memory="2M"), kvm=kvm) as a,
        Machine(MachineConfig(mode="long", memory="2M"), kvm=kvm) as b,
    ):
        fa, fb = a.vcpus[0].fd, b.vcpus[0].fd
        assert fa.has_device_attr(0, 0)
        for f in (fa, fb):
            f.set_tsc_offset(0)
            assert f.get_tsc_offset() == 0
        # Interleaved reads from the two VMs are in order only if they read one clock.
        for _ in range(3):
            t1, t2, t3 = _tsc(fa), _tsc(fb), _tsc(fa)
            assert t1 <= t2 <= t3


@pytest.mark.kvm
def test_has_device_attr_is_false_for_an_unknown_attribute(kvm):
    with Machine(MachineConfig(mode="long", memory="2M"), kvm=kvm) as m:
        assert not m.vcpus[0].fd.has_device_attr(0x7FFF, 0x7FFF)
