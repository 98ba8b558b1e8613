"""kvmpy run's virtio options (--disk, --rng, --console virtio, --transport), through a
subprocess as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def kvmpy(*args, stdin=subprocess.DEVNULL, timeout=120):
    return subprocess.run([sys.executable, "-m", "kvmpy", *args], capture_output=True,
                          stdin=stdin, timeout=timeout)  # fmt: skip


def last_json(stdout: bytes) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.kvm
@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_run_disk_json(tmp_path, transport):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    p = kvmpy("run", "virtio-blk", "--disk", f"{img},id=cli-disk", "--transport", transport,
              "--json")  # fmt: skip
    assert p.returncode == 0, p.stderr.decode() + p.stdout.decode()
    assert b"id: cli-disk" in p.stdout
    doc = last_json(p.stdout)
    (dev,) = doc["virtio"]
    assert dev["type"] == "block" and dev["transport"] == transport
    assert dev["bytes_written"] == 65536 and dev["notify_exits"] == 0


@pytest.mark.kvm
def test_run_read_only_disk_and_rng(tmp_path):
    img = tmp_path / "ro.img"
    img.write_bytes(b"\x77" * (1 << 20))
    p = kvmpy("run", "virtio-blk", "--disk", f"{img},ro", "--rng", "--stats")
    assert p.returncode == 0, p.stderr.decode()
    assert b"write refused (read-only): ok" in p.stdout
    assert img.read_bytes() == b"\x77" * (1 << 20)
    assert b"virtio devices" in p.stderr and b"entropy" in p.stderr
    p = kvmpy("run", "virtio-rng", "--rng", "--transport", "pci")
    assert p.returncode == 0 and b"ok" in p.stdout


@pytest.mark.kvm
def test_run_virtio_console_from_stdin():
    proc = subprocess.run([sys.executable, "-m", "kvmpy", "run", "virtio-console", "--console",
                           "virtio", "--timeout", "30"], input=b"over the pipe\n",
                          capture_output=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"echo: OVER THE PIPE\n" in proc.stdout


def test_bad_disk_options(tmp_path):
    p = kvmpy("run", "hello", "--disk", str(tmp_path / "missing.img"))
    assert p.returncode == 1 and p.stderr.startswith(b"kvmpy: error: --disk")
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    p = kvmpy("run", "hello", "--disk", f"{img},fast")
    assert p.returncode == 1 and b"unknown option 'fast'" in p.stderr
    p = kvmpy("run", "hello", "--transport", "usb")
    assert p.returncode == 2


@pytest.mark.kvm
def test_irq_cpu_routes_msix_to_the_chosen_vcpu(tmp_path):
    """--disk ...,irq-cpu=1 on an SMP guest: every MSI-X interrupt of the disk lands on vCPU 1,
    whatever destination the guest programmed (it asks for CPU 0)."""
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    p = kvmpy("run", "virtio-smp", "--transport", "pci", "--disk", f"{img},irq-cpu=1",
              "--timeout", "60")  # fmt: skip
    assert p.returncode == 0, p.stderr.decode()
    assert b"interrupts on CPU 0: 0, on CPU 1: 16" in p.stdout
    p = kvmpy("run", "virtio-smp", "--transport", "pci", "--disk", str(img), "--timeout", "60")
    assert p.returncode == 0 and b"interrupts on CPU 0: 16, on CPU 1: 0" in p.stdout
