"""`kvmpy bench api` in small: two VMs through the whole cycle, every check of the benchmark
(output complete and in order, nothing while paused, snapshots go on from the right tick)."""

from __future__ import annotations

import pytest

from kvmpy.benchmarks.api import run


@pytest.mark.kvm
def test_bench_api_smoke():
    doc = run(vms=2, concurrency=2, ticks=2)
    assert doc["checked"]["vms"] == 2
    lat = doc["latency"]
    assert lat["action"]["n"] == 2 * 3  # start, stop, stop of the restored VM
    assert lat["create_snapshot"]["n"] == 2 and lat["load_snapshot"]["n"] == 2
    assert doc["stats_direct_control"]["p50_ms"] > 0 and doc["daemon_overhead_ratio"] > 0
