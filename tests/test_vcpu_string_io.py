"""`rep ins` reaches a device in batches (Device.read_string) instead of one call per item."""

from __future__ import annotations

import pytest

from kvmpy.devices import Device
from kvmpy.loader import load_raw
from kvmpy.machine import Machine, MachineConfig
from kvmpy.result import StopReason

PORT = 0x6F0
N = 3000


class Counter(Device):
    name = "counter"

    def __init__(self, batched: bool):
        self.calls = 0
        self.next = 0
        if batched:
            self.read_string = self._read_string

    def read(self, offset, size):
        self.calls += 1
        out = bytes((self.next + i) & 0xFF for i in range(size))
        self.next += size
        return out

    def _read_string(self, offset, size, data):
        self.calls += 1
        n = len(data)
        data[:] = bytes((self.next + i) & 0xFF for i in range(n))
        self.next += n


@pytest.mark.kvm
@pytest.mark.parametrize("batched", [True, False])
def test_rep_insb_fills_the_buffer_in_order(kvm, assemble, batched):
    code = assemble(
        f"""
        mov $0x100000, %rdi
        mov ${N}, %rcx
        mov ${PORT}, %dx
        rep insb
        hlt
        """
    )
    device = Counter(batched)
    with Machine(MachineConfig(mode="long", memory="4M"), kvm=kvm) as m:
        m.load(load_raw(code))
        m.add_pio_device(PORT, 1, device)
        result = m.run(timeout=30)
        data = m.memory.read(0x100000, N)
    assert result.stop_reason is StopReason.HLT
    assert data == bytes(i & 0xFF for i in range(N))
    if batched:
        # KVM hands `rep ins` over in batches (up to 1 KiB), each one call.
        assert device.calls == result.exits["io"] < N
    else:
        assert device.calls == N
