"""Controlling a vCPU from outside its run loop: yielding on I/O, withdrawing a pause."""

from __future__ import annotations

import pytest

from kvmpy.loader import load_raw
from kvmpy.machine import Machine, MachineConfig
from kvmpy.result import StopReason

# Two num_exits hypercalls around a debug-console byte, then exit with the second result.
THREE_IO_EXITS = (
    "mov $3, %eax\n mov $0x500, %dx\n out %eax, %dx\n mov %rax, %rbx\n"
    "mov $0x41, %al\n out %al, $0xe9\n"
    "mov $3, %eax\n mov $0x500, %dx\n out %eax, %dx\n"
    "mov %rax, %rdi\n xor %eax, %eax\n out %eax, %dx\n hlt"
)


@pytest.mark.kvm
def test_yield_on_io_returns_after_every_port_io_exit_hypercalls_included(assemble, kvm):
    with Machine(MachineConfig(mode="long", memory="16M"), kvm=kvm) as m:
        m.load(load_raw(assemble(THREE_IO_EXITS)))
        m.vcpus[0].yield_on_io = True
        returns = []
        while True:
            stop = m.vcpus[0].run()
            returns.append(stop)
            if stop is not None:
                break
        assert returns[:3] == [None, None, None]
        assert returns[3].reason is StopReason.EXIT
        # The hypercall results were delivered across the yields: 0 exits before the first,
        # 2 before the second.
        assert returns[3].exit_code == 2
        assert m.vcpus[0].regs_dict()["rbx"] == 0
        assert m.output == b"A"


@pytest.mark.kvm
def test_without_yield_on_io_the_same_guest_runs_to_its_stop(assemble, kvm):
    with Machine(MachineConfig(mode="long", memory="16M"), kvm=kvm) as m:
        m.load(load_raw(assemble(THREE_IO_EXITS)))
        stop = m.vcpus[0].run()
        assert stop.reason is StopReason.EXIT and stop.exit_code == 2


@pytest.mark.kvm
def test_cancel_pause_withdraws_a_pending_pause(assemble, kvm):
    with Machine(MachineConfig(mode="long", memory="16M"), kvm=kvm) as m:
        m.load(load_raw(assemble(THREE_IO_EXITS)))
        vcpu = m.vcpus[0]
        assert vcpu.cancel_pause() is False
        vcpu.request_pause()
        assert vcpu.cancel_pause() is True
        assert vcpu.fd.run_struct.immediate_exit == 0
        stop = vcpu.run()  # not paused at once: the guest runs to its exit
        assert stop is not None and stop.reason is StopReason.EXIT


@pytest.mark.kvm
def test_cancel_pause_leaves_a_requested_stop_alone(assemble, kvm):
    with Machine(MachineConfig(mode="long", memory="16M"), kvm=kvm) as m:
        m.load(load_raw(assemble(THREE_IO_EXITS)))
        vcpu = m.vcpus[0]
        vcpu.request_pause()
        vcpu.request_stop(StopReason.INTERRUPTED, "host says stop")
        vcpu.cancel_pause()
        stop = vcpu.run()
        assert stop.reason is StopReason.INTERRUPTED and stop.message == "host says stop"
