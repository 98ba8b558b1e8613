"""A short run of every fuzz harness (fuzz/harnesses.py) inside the suite, with hypothesis
feeding the bytes; `make fuzz` runs them long, coverage-guided, under atheris. Also the
regression tests of the bugs the harnesses found."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))

from harnesses import HARNESSES  # noqa: E402

pytestmark = pytest.mark.kvm

_ready: dict = {}


def harness(name: str):
    if name not in _ready:
        h = HARNESSES[name]()
        h.setup()
        _ready[name] = h
    return _ready[name]


@pytest.mark.parametrize("name", sorted(HARNESSES))
def test_fuzz_smoke(name):
    h = harness(name)

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(st.binary(max_size=512))
    def one(data):
        h.one_input(data)

    one()


def _receive(stream_messages):
    """Feed a migration stream to the receiver the migration harness sets up."""
    import socket
    import threading

    h = harness("migration")
    M = h.migration
    a, b = socket.socketpair()
    data = b"".join(M.HDR.pack(k, len(p)) + p for k, p in stream_messages)

    def feed():
        with contextlib.suppress(OSError):
            b.sendall(data)
            b.shutdown(socket.SHUT_WR)

    threading.Thread(target=feed, daemon=True).start()
    link = M.Link(a, timeout=10)
    incoming = M.Incoming.__new__(M.Incoming)
    incoming.link, incoming.machine, incoming.info = link, None, {}
    try:
        return incoming._receive(link, h.kvm, None, True, None), incoming
    finally:
        a.close()
        b.close()


def test_malformed_go_figures_do_not_fail_a_committed_migration():
    # Found by the migration harness: GO's report figures went through float()/int() and a
    # list or a string there raised TypeError/ValueError (a traceback) after the state was in.
    h = harness("migration")
    M = h.migration
    msgs = list(h.messages)
    go = json.dumps({"source_stop_ms": [1], "one_way_ms": "AAAA", "rounds": None,
                     "source_total_s": {"a": 1}}).encode()  # fmt: skip
    msgs[-1] = (M.GO, go)
    machine, incoming = _receive(msgs)
    assert machine is not None
    assert incoming.info["source_stop_ms"] == 0.0 and incoming.info["one_way_ms"] == 0.0
    assert incoming.info["source_total_s"] is None


def test_an_impossible_io_exit_stops_the_vm_instead_of_looping():
    # Found by the pio harness: a count KVM never reports made _port_io loop ~2^32 times.
    from kvmpy.hv.kvm.vcpu import _IO_COUNT, _IO_DATA_OFFSET, _IO_DIRECTION, _IO_PORT, _IO_SIZE
    from kvmpy.result import StopReason

    h = harness("pio")
    m = h.machines[1][0]
    v = m.vcpus[0]
    v._u8[_IO_DIRECTION], v._u8[_IO_SIZE], v._u16[_IO_PORT] = 0, 1, 0x700
    v._u32[_IO_COUNT], v._u64[_IO_DATA_OFFSET] = 0xFFFFFFFF, 4096
    stop = v._port_io()
    assert stop.reason is StopReason.VMM_ERROR and "impossible I/O exit" in stop.message
