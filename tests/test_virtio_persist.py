"""Virtio devices across snapshot/restore: devices come back from the snapshot's VmConfig
(device registry kinds), their queues mid-run, with requests in flight."""

from __future__ import annotations

import json
import os
import time

import pytest

from kvmpy.benchmarks.virtio import _HEAD, _JOB, VBENCH_MAGIC
from kvmpy.machine import Machine, MachineConfig
from kvmpy.persist import snapshot
from kvmpy.sdk.examples import find_example

from .test_persist import run_and_take

pytestmark = pytest.mark.kvm

REQUESTS = 40000


def params(m, image):
    img = m.image
    base = img.symbols["kvmpy_vbench"]
    blob = _HEAD.pack(VBENCH_MAGIC, 1, 0, 7, 0, 0) + _JOB.pack(
        4096, 32, 1, 0, REQUESTS, 0, 0, 0, 0, 0, 0
    )
    m.memory.write(base, blob)
    return base


def results(m, base):
    head = _HEAD.unpack(m.memory.read(base, _HEAD.size))
    job = _JOB.unpack(m.memory.read(base + _HEAD.size, _JOB.size))
    return head[5], job[-3], job[-2]  # status, errors, done


def _served_in(tree) -> int:
    """The used index of the (one) virtqueue found in a snapshot's device state."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("queues"), list):
                found.extend(q["used_idx"] for q in node["queues"] if q.get("ready"))
            for v in node.values():
                walk(v)

    walk(tree)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_snapshot_restore_with_requests_in_flight(tmp_path, transport):
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(8 << 20))
    elf = find_example("virtio-bench").build()
    with Machine(MachineConfig(mode="long-user", memory="64M")) as m:
        m.add_device("virtio-blk", "vda", path=str(disk), transport=transport)
        m.load_file(elf)
        base = params(m, elf)
        dev = m.virtio.devices[0]

        def pause():
            while dev.requests < 2000:
                time.sleep(0.001)
            m.pause()

        result = run_and_take(m, pause, lambda: snapshot.take(m, tmp_path / "s"))
        assert result.message == "snapshot taken"
        # What the snapshot holds as served (its used ring); read from the snapshot, because
        # the source goes on serving what was left in its ring once the snapshot is written.
        state = json.loads((tmp_path / "s" / "state.json").read_text())
        served_before = _served_in(state["vmm"]["devices"])
        status, _, _ = results(m, base)
        assert status == 0 and 0 < served_before < REQUESTS  # mid-run
    r = snapshot.restore(tmp_path / "s")
    with r.machine as m2:
        assert [d.kind for d in m2.virtio.devices] == ["block"]
        res = m2.run(timeout=120)
        assert res.exit_code == 0, res.message
        status, errors, done = results(m2, base)
        assert (status, errors, done) == (1, 0, REQUESTS)
        served_after = m2.virtio.devices[0].requests
        # Every request was served once: before the snapshot or after the restore.
        assert served_before + served_after == REQUESTS
