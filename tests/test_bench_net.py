"""kvmpy bench net with small counts: every job runs on both transports, every frame the guest
sends reaches the host TAP, every vsock byte arrives, and the data path takes no exits."""

from __future__ import annotations

import pytest

from kvmpy.benchmarks import net

pytestmark = pytest.mark.kvm


def test_bench_net_jobs_and_references():
    doc = net.run(("mmio", "pci"), runs=1, count64=3000, count1500=1500, vsock_bytes=4 << 20)
    ref = doc["reference"]
    assert ref["net-tx-64"]["frames"] == 3000 and ref["net-tx-64"]["pps"] > 0
    assert ref["vsock-tx"]["bytes"] == 4 << 20
    for transport, side in doc["kvmpy"].items():
        jobs = side["jobs"]
        for name in ("net-tx-64", "net-tx-1500"):
            j = jobs[name]
            # Each frame the guest queued came back from the device and reached the host.
            assert j["frames"] == j["offered"] == j["host_received"], (transport, name, j)
        for name in ("net-rx-64", "net-rx-1500"):
            j = jobs[name]
            assert j["injected"] == j["offered"] and 0 < j["frames"] <= j["injected"] + 4
        assert jobs["vsock-tx"]["bytes"] == jobs["vsock-tx"]["host_received"] == 4 << 20
        assert jobs["vsock-rx"]["bytes"] == jobs["vsock-rx"]["host_sent"] == 4 << 20
        # Set-up is MMIO exits; the 9,000 frames and 8 MiB of the data path add none of
        # their own (notifies are ioeventfds, interrupts irqfds, the wait is in-kernel hlt).
        assert sum(side["exits"].values()) < 1000, side["exits"]
        net_dev = next(d for d in side["devices"] if d["type"] == "net")
        assert net_dev["notify_exits"] == 0 and net_dev["needs_reset"] is None
    assert set(doc["summary"]) == {"mmio", "pci"}
