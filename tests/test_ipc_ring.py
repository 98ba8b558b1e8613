"""The host's view of a shared ring (kvmpy.ipc.ring) and of KVM's coalesced ring
(kvmpy.ipc.pio): hostile indices never make the host read or write outside them."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpy.ipc.layout import RING_HEAD, RING_TAIL
from kvmpy.ipc.pio import RING_ENTRIES, RING_ENTRY, CoalescedRing
from kvmpy.ipc.ring import Ring, RingCorrupt

SIZE = 64
CTL = 0
DATA = 256
GUARD = 0xEE


def region() -> bytearray:
    # Control block, data area, then guard bytes that must never change.
    return bytearray(DATA + SIZE + 64)


def set_indices(buf: bytearray, head: int, tail: int) -> None:
    struct.pack_into("<Q", buf, CTL + RING_HEAD, head % 2**64)
    struct.pack_into("<Q", buf, CTL + RING_TAIL, tail % 2**64)


def test_write_then_read_wraps_around():
    buf = region()
    ring = Ring(memoryview(buf), CTL, DATA, SIZE)
    set_indices(buf, 50, 50)
    assert ring.write(bytes(range(40))) == 40
    assert ring.head == 90
    assert ring.read(100) == bytes(range(40))
    assert ring.used() == 0
    assert ring.write(bytes(100)) == SIZE  # only what fits
    ring.release()


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=200))
def test_hostile_indices_stay_inside_the_ring(head, tail, payload):
    buf = region()
    buf[DATA + SIZE :] = bytes([GUARD]) * 64
    buf[DATA : DATA + SIZE] = bytes(range(SIZE))
    set_indices(buf, head, tail)
    ring = Ring(memoryview(buf), CTL, DATA, SIZE)
    used = (head - tail) % 2**64  # free-running indices wrap, as in C
    honest = used <= SIZE
    try:
        if honest:
            data = ring.read(1000)
            assert len(data) == used
            assert ring.write(payload) == min(len(payload), SIZE)
        else:
            with pytest.raises(RingCorrupt, match="impossible indices"):
                ring.read(1000)
            with pytest.raises(RingCorrupt):
                ring.write(payload)
    finally:
        ring.release()
    assert buf[DATA + SIZE :] == bytes([GUARD]) * 64
    assert buf[CTL + 16 : CTL + 64] == bytes(48)  # nothing else of the control block moved


@pytest.mark.parametrize("start", [2**64 - 10, 2**64 - 1])
def test_indices_wrap_at_two_to_the_64(start):
    buf = region()
    set_indices(buf, start, start)
    ring = Ring(memoryview(buf), CTL, DATA, SIZE)
    assert ring.write(b"0123456789abcdef") == 16
    assert ring.head == (start + 16) % 2**64
    assert ring.used() == 16
    assert ring.read(100) == b"0123456789abcdef"
    assert ring.tail == ring.head
    ring.release()


def test_ring_must_lie_in_the_region():
    buf = region()
    with pytest.raises(ValueError):
        Ring(memoryview(buf), CTL, DATA, 1024)
    with pytest.raises(ValueError):
        Ring(memoryview(buf), CTL, DATA, 48)


# --- KVM's coalesced ring ---------------------------------------------------------------------


def coalesced_page(entries: list[tuple[int, bytes]], first: int = 0) -> bytearray:
    page = bytearray(4096)
    i = first
    for port, data in entries:
        off = 8 + (i % RING_ENTRIES) * RING_ENTRY
        struct.pack_into("<QII", page, off, port, len(data), 1)
        page[off + 16 : off + 16 + len(data)] = data
        i += 1
    struct.pack_into("<II", page, 0, first, i % RING_ENTRIES)
    return page


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("first", [0, 100, RING_ENTRIES - 3])
def test_drain_returns_the_bytes_in_order(width, first):
    chunks = [bytes((i * 7 + j) & 0xFF for j in range(width)) for i in range(60)]
    page = coalesced_page([(0x600, c) for c in chunks], first)
    ring = CoalescedRing(memoryview(page), 0x600)
    assert ring.drain() == b"".join(chunks)
    assert ring.drain() == b""
    assert struct.unpack_from("<II", page)[0] == (first + 60) % RING_ENTRIES
    assert ring.entries == 60
    ring.release()


def test_drain_mixed_widths_and_stray_ports():
    entries = [(0x600, b"ab"), (0x600, b"cdef"), (0x601, b"X"), (0x600, b"g")]
    page = coalesced_page(entries)
    ring = CoalescedRing(memoryview(page), 0x600)
    assert ring.drain() == b"abcdefg"
    assert ring.stray == 1
    ring.release()


def test_drain_refuses_impossible_indices():
    page = bytearray(4096)
    struct.pack_into("<II", page, 0, 0, 5000)
    ring = CoalescedRing(memoryview(page), 0x600)
    with pytest.raises(Exception, match="impossible"):
        ring.drain()
    ring.release()
