"""Virtio devices on KVM: the bundled SDK examples at CPL3 on both transports, notify through
ioeventfd (no userspace exit per request), MSI-X interrupts through irqfd, a read-only disk,
and two busy devices served in parallel by their I/O threads."""

from __future__ import annotations

import os
import threading

import pytest

from kvmpy.machine import Machine, MachineConfig
from kvmpy.sdk.examples import find_example
from kvmpy.vmm.virtio import DeviceSpec, attach, install_guest_handlers

pytestmark = pytest.mark.kvm


def run_example(name, specs, transport, irqchip=False, feed=None):
    path = find_example(name).build()
    with Machine(MachineConfig(mode="long-user", memory="32M", irqchip=irqchip)) as m:
        vs = attach(m, specs, transport)
        try:
            m.load_file(path)
            install_guest_handlers(m, vs)
            if feed is not None:
                threading.Timer(0.3, lambda: vs.devices[0].feed(feed)).start()
            r = m.run(timeout=60)
            return r, vs.stats()
        finally:
            vs.close()


@pytest.fixture
def disk(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(1 << 20))
    return p


@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_block_example(transport, disk):
    before = disk.read_bytes()
    r, stats = run_example("virtio-blk", [DeviceSpec("block", str(disk), id="test-disk")],
                           transport)  # fmt: skip
    out = r.output.decode()
    assert r.exit_code == 0, out + r.message
    assert "all checks passed" in out and "id: test-disk" in out
    assert disk.read_bytes()[:65536] != before[:65536]  # the guest's write reached the file
    assert disk.read_bytes()[65536:] == before[65536:]
    (s,) = stats
    assert s["writes"] == 1 and s["reads"] == 1 and s["flushes"] == 1
    # Every notify went through an ioeventfd: no notify reached the VMM as an exit.
    assert s["notify_exits"] == 0 and s["notifies"] >= 4
    assert s["needs_reset"] is None and s["internal_errors"] == 0


def test_block_example_read_only(disk):
    before = disk.read_bytes()
    r, stats = run_example("virtio-blk", [DeviceSpec("block", str(disk), readonly=True)], "mmio")
    assert r.exit_code == 0, r.output.decode()
    assert "write refused (read-only): ok" in r.output.decode()
    assert disk.read_bytes() == before


@pytest.mark.parametrize("transport, kind", [("pci", "MSI-X interrupts"), ("mmio", "interrupts")])
def test_block_example_interrupts(disk, transport, kind):
    """Completions as interrupts into the CPL3 guest: MSI-X (guest-programmed) on PCI, the
    IOAPIC pin kvmpy routes on virtio-mmio; delivered through irqfd, handled by the ring-0 stub
    of kvmpy/virtio.h."""
    r, stats = run_example("virtio-blk", [DeviceSpec("block", str(disk))], transport, irqchip=True)
    out = r.output.decode()
    assert r.exit_code == 0, out + r.message
    assert f"{kind}\n" in out and "all checks passed" in out
    assert stats[0]["interrupts"] >= 1 and stats[0]["notify_exits"] == 0


@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_rng_example(transport):
    r, stats = run_example("virtio-rng", [DeviceSpec("rng")], transport)
    assert r.exit_code == 0, r.output.decode()
    assert stats[0]["bytes"] == 4096


@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_console_example(transport):
    r, stats = run_example("virtio-console", [DeviceSpec("console")], transport,
                           feed=b"kvmpy virtio\n")  # fmt: skip
    out = r.output.decode()
    assert r.exit_code == 0, out
    assert "hello from virtio-console" in out and "echo: KVMPY VIRTIO\n" in out
    assert stats[0]["bytes_in"] == 13


def test_one_transport_per_machine_and_clean_close(tmp_path):
    from kvmpy.errors import ConfigError
    from kvmpy.vmm.virtio import add_device

    with Machine(MachineConfig(mode="long-user", memory="32M")) as m:
        vs = attach(m, [DeviceSpec("rng")], "pci")
        assert m.virtio is vs
        add_device(m, DeviceSpec("console"), "pci")
        with pytest.raises(ConfigError, match="use pci"):
            add_device(m, DeviceSpec("rng"), "mmio")
        assert [d.kind for d in vs.devices] == ["entropy", "console"]
        assert all(loop._thread is not None and loop._thread.is_alive() for loop in vs.loops)
        threads = [loop._thread for loop in vs.loops]
        vs.close()
        assert m.virtio is None and not any(t.is_alive() for t in threads)
