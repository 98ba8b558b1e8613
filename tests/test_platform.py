"""The platform layer: resources, interrupt routing ownership, the event loop, VmConfig, the
device registry and rebuilding a machine from a snapshot's config."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from kvmpy.devices import Device
from kvmpy.devices.registry import device_kind
from kvmpy.errors import ConfigError
from kvmpy.hv.base import MsiRoute, PinRoute
from kvmpy.machine import Machine, MachineConfig
from kvmpy.result import StopReason
from kvmpy.vmm.config import DeviceConfig, ImageBoot, VmConfig
from kvmpy.vmm.event_loop import EventLoop
from kvmpy.vmm.resources import Resources

# --- resources -----------------------------------------------------------------------------------


def test_resources_refuse_collisions_with_both_owners_named():
    r = Resources([(0, 64 << 20)])
    r.claim_ports("serial0", 0x3F8, 8)
    with pytest.raises(ConfigError, match=r"ports 0x3f8-0x3ff of serial1 .* taken by serial0"):
        r.claim_ports("serial1", 0x3F8, 8)
    with pytest.raises(ConfigError, match="port 0x3fa of x is already taken by serial0"):
        r.claim_ports("x", 0x3FA, 1)
    with pytest.raises(ConfigError, match="guest RAM"):
        r.claim_mmio("dev", 0x100000, 0x1000)
    with pytest.raises(ConfigError, match="outside"):
        r.claim_ports("big", 0xFFF0, 0x20)
    a = r.allocate_mmio("virtio0", 0x1000)
    b = r.allocate_mmio("virtio1", 0x1000)
    assert a >= 3 << 30 and b >= a + 0x1000
    g = r.allocate_gsi("msi0")
    assert g >= 24 and r.allocate_gsi("msi1") == g + 1
    with pytest.raises(ConfigError, match="GSI 4 of uart1 is already taken by uart0"):
        r.claim_gsi("uart0", 4), r.claim_gsi("uart1", 4)
    r.release("serial0")
    r.claim_ports("serial1", 0x3F8, 8)
    assert [c[2] for c in r.to_dict()["port"] if c[0] == 0x3F8] == ["serial1"]


@pytest.mark.kvm
def test_machine_refuses_a_duplicate_device_range(kvm):
    with Machine(MachineConfig(memory="16M"), kvm=kvm) as m:
        with pytest.raises(ConfigError, match=r"port 0xe9 of other is already taken by debugcon"):
            dev = Device()
            dev.name = "other"
            m.add_pio_device(0xE9, 1, dev)
        with pytest.raises(ConfigError, match="overlaps guest RAM"):
            m.add_mmio_device(0x1000, 0x1000, Device())


# --- interrupts ----------------------------------------------------------------------------------

TWO_MSI_USERS = r"""
#include <kvmpy.h>
volatile uint64_t count40, count51;
__asm__(".globl on40\non40:\n push %rax\n push %rcx\n push %rdx\n incq count40(%rip)\n"
	"movl $0x80B, %ecx\n xorl %eax, %eax\n xorl %edx, %edx\n wrmsr\n pop %rdx\n pop %rcx\n"
	"pop %rax\n iretq\n"
	".globl on51\non51:\n push %rax\n push %rcx\n push %rdx\n incq count51(%rip)\n"
	"movl $0x80B, %ecx\n xorl %eax, %eax\n xorl %edx, %edx\n wrmsr\n pop %rdx\n pop %rcx\n"
	"pop %rax\n iretq\n");
int main(void)
{
	hc_print_str("ready\n");
	while (!count40 || !count51)
		__asm__ volatile("pause");
	kv_printf("%lu %lu\n", (unsigned long)count40, (unsigned long)count51);
	return 0;
}
"""


@pytest.mark.kvm
def test_ipc_doorbell_and_another_msi_user_share_the_routing_table(kvm, build_guest):
    """The ipc doorbell wiring and a device's MSI both get routes from the interrupt owner:
    neither replaces the other's, and both interrupts arrive."""
    from kvmpy.ipc import doorbell

    image = build_guest(TWO_MSI_USERS)
    incoming = os.eventfd(0, os.EFD_CLOEXEC)
    outgoing = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with Machine(MachineConfig(mode="long-user", memory="16M", irqchip=True), kvm=kvm) as m:
            img = m.load_file(image)
            m.set_interrupt_handler(0x40, img.symbols["on40"])
            m.set_interrupt_handler(0x51, img.symbols["on51"])
            doorbell.wire(m, [incoming], {1: [outgoing]})
            dev = m.interrupts.msi("test-device", vector=0x51)
            routes = m.interrupts.routes()
            msis = {r.gsi: r for r in routes if isinstance(r, MsiRoute)}
            assert len(msis) == 2 and {r.data for r in msis.values()} == {0x40, 0x51}
            assert sum(isinstance(r, PinRoute) for r in routes) >= 24
            with pytest.raises(ConfigError, match="vector 0x51 of other is already taken"):
                m.interrupts.msi("other", vector=0x51)

            def fire():
                while b"ready" not in m.output:
                    time.sleep(0.001)
                os.eventfd_write(incoming, 1)  # what the peer VM's ioeventfd would do
                os.eventfd_write(dev.eventfd(), 1)

            threading.Thread(target=fire, daemon=True).start()
            result = m.run(timeout=30)
    finally:
        os.close(incoming)
        os.close(outgoing)
    assert result.stop_reason is StopReason.EXIT, result.message
    assert result.output.split()[-2:] == [b"1", b"1"]


# --- event loop ----------------------------------------------------------------------------------


def test_event_loop_serves_descriptors_timers_and_survives_a_failing_callback():
    errors = []
    loop = EventLoop("test", on_error=errors.append)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    bad = os.eventfd(0, os.EFD_NONBLOCK)
    got = []
    done = threading.Event()

    def on_efd():
        got.append(os.eventfd_read(efd))
        if sum(got) >= 3:
            done.set()

    def on_bad():
        os.eventfd_read(bad)
        raise RuntimeError("device bug")

    with loop:
        loop.add_reader(efd, on_efd)
        loop.add_reader(bad, on_bad)
        os.eventfd_write(bad, 1)
        os.eventfd_write(efd, 1)
        loop.call_soon(lambda: os.eventfd_write(efd, 1))
        loop.call_later(0.05, lambda: os.eventfd_write(efd, 1))
        assert done.wait(5)
        assert len(errors) == 1 and "device bug" in str(errors[0])
        os.eventfd_write(bad, 1)  # removed after it failed: no second error
        time.sleep(0.05)
        assert len(errors) == 1
    os.close(efd)
    os.close(bad)


# --- VmConfig and the device registry ------------------------------------------------------------


class Counter(Device):
    name = "test-counter"

    def __init__(self, start: int):
        self.value = start

    def read(self, offset, size):
        self.value += 1
        return self.value.to_bytes(4, "little")[:size]

    def state(self):
        return {"value": self.value}

    def restore_state(self, state):
        self.value = int(state["value"])


@device_kind("test-counter")
def make_counter(machine, id, *, port: int, start: int = 0):
    if not 0 <= port <= 0xFFFC:
        raise ConfigError(f"{id}: port {port:#x} is out of range")
    dev = Counter(start)
    dev.name = id
    machine.add_pio_device(port, 4, dev)
    return dev


def test_vmconfig_json_round_trip_and_errors(tmp_path):
    cfg = VmConfig(MachineConfig(mode="long-user", memory="32M", vcpus=2),
                   ImageBoot("/img.elf"), (DeviceConfig("test-counter", "c0", {"port": 0x700}),))  # fmt: skip
    again = VmConfig.from_json(cfg.to_json())
    assert again.to_dict() == cfg.to_dict()
    assert again.machine.vcpus == 2 and again.machine.irqchip  # SMP implies the irqchip
    f = tmp_path / "vm.json"
    d = cfg.to_dict()
    d["boot"]["path"] = "guest.elf"  # relative to the config file's directory
    f.write_text(json.dumps(d))
    assert VmConfig.load(f).boot.path == str(tmp_path / "guest.elf")
    for bad, message in [
        ({"machine": {"vcpus": "2"}}, "machine.vcpus has the wrong type"),
        ({"machine": {"memory": "5Q"}}, "not a size"),
        ({"machine": {"cpus": 2}}, "no field 'cpus'"),
        ({"boot": {"kind": "floppy"}}, "boot.kind must be"),
        ({"devices": [{"kind": "x", "id": "a"}, {"kind": "x", "id": "a"}]}, "two devices"),
        ({"devices": [{"kind": "x", "id": "bad id!"}]}, "device id"),
        ({"extra": 1}, "no field 'extra'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            VmConfig.from_dict(bad)
    f.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        VmConfig.load(f)


@pytest.mark.kvm
def test_device_registry_checks_kinds_and_arguments(kvm):
    with Machine(MachineConfig(memory="16M"), kvm=kvm) as m:
        with pytest.raises(ConfigError, match="unknown device kind 'nope'"):
            m.add_device("nope")
        with pytest.raises(ConfigError, match="unexpected keyword argument 'colour'"):
            m.add_device("test-counter", port=0x700, colour="red")
        with pytest.raises(ConfigError, match="missing a required argument: 'port'"):
            m.add_device("test-counter")
        with pytest.raises(ConfigError, match="out of range"):
            m.add_device("test-counter", port=-1)
        m.add_device("test-counter", "c0", port=0x700)
        with pytest.raises(ConfigError, match="has a device 'c0' already"):
            m.add_device("test-counter", "c0", port=0x704)
        assert [d.id for d in m.vm_config().devices] == ["c0"]


COUNTER_GUEST = r"""
#include <kvmpy.h>
int main(void)
{
	for (int i = 0; i < 3; i++)
		kv_printf("%u\n", inl(0x700));
	hc_print_str("snap\n");
	for (int i = 0; i < 3; i++)
		kv_printf("%u\n", inl(0x700));
	return 0;
}
"""


@pytest.mark.kvm
def test_restore_rebuilds_devices_from_the_snapshot_config(build_guest, tmp_path):
    """config -> machine -> snapshot -> config: the restored machine has the device, built by
    kind with its arguments, and its state, without any setup code."""
    from kvmpy.persist import snapshot

    image = build_guest(COUNTER_GUEST)
    cfg = VmConfig(MachineConfig(mode="long-user", memory="16M", vcpus=2),
                   ImageBoot(str(image)),
                   (DeviceConfig("test-counter", "ctr", {"port": 0x700, "start": 100}),))  # fmt: skip
    from kvmpy.hypercalls import HC_PRINT_STR, hc_print_str
    from kvmpy.vmm import builder

    m = builder.build(cfg)
    try:

        def on_print(ctx, *args):
            r = hc_print_str(ctx, *args)
            if m.output.endswith(b"snap\n"):
                m.pause_from_guest()
            return r

        m.hypercalls.register(HC_PRINT_STR, on_print, "print_str", replace=True)

        def controller():
            m.wait_paused(30)
            snapshot.take(m, tmp_path / "snap")
            m.request_stop(StopReason.INTERRUPTED, "taken")
            m.resume()

        threading.Thread(target=controller, daemon=True).start()
        before = m.run(timeout=30).output
    finally:
        m.close()
    assert before == b"101\n102\n103\nsnap\n"
    r = snapshot.restore(tmp_path / "snap")
    try:
        assert r.machine.vm_config().to_dict() == cfg.validated().to_dict()
        assert r.machine.devices["ctr"].value == 103
        after = r.machine.run(timeout=30)
    finally:
        r.close()
    assert after.output == b"104\n105\n106\n"
