"""kvmpy bench virtio, on small jobs: the guest side and the references produce the figures
the report needs, and a request costs no userspace exit."""

from __future__ import annotations

import pytest

from kvmpy.benchmarks import virtio as V

SMALL = [
    ("seq64k-read-qd1", 65536, 1, 0, 0, 64),
    ("rand4k-read-qd32", 4096, 32, 1, 0, 512),
    ("rand4k-write-qd32", 4096, 32, 1, 1, 256),
]


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "img"
    p.write_bytes(bytes(8 << 20))
    return p


@pytest.mark.kvm
@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_guest_jobs(image, transport):
    out = V.run_guest(image, transport, SMALL)
    assert out["transport"] == transport and out["tsc_khz"] > 0
    for name, *_, requests in SMALL:
        j = out["jobs"][name]
        assert j["errors"] == 0 and j["requests"] == requests
        assert j["iops"] > 0 and 0 < j["p50_us"] <= j["p99_us"]
        # The notify is an ioeventfd and completions are polled: no exit per request.
        assert j["exits_per_request"] == 0
    assert out["device"]["notify_exits"] == 0


def test_references(image):
    c = V.run_reference_c(image, SMALL)
    py = V.run_reference_python(image, SMALL)
    for side in (c, py):
        assert set(side) == {"seq64k-read", "rand4k-read", "rand4k-write"}
        assert all(v["iops"] > 0 and v["mean_us"] > 0 for v in side.values())


def test_best_round_is_per_job():
    runs = [{"a": {"iops": 5}, "b": {"iops": 1}}, {"a": {"iops": 3}, "b": {"iops": 9}}]
    assert V._best(runs) == {"a": {"iops": 5}, "b": {"iops": 9}}
