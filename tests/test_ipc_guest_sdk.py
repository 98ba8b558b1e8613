"""The guest half of kvmpy/ipc.h, run inside one VM: the pattern check counts exactly the
corrupted words, the ring API wraps correctly and refuses impossible indices."""

from __future__ import annotations

import struct

import pytest

from kvmpy.ipc.layout import pattern_bytes, pattern_checksum
from kvmpy.machine import Machine, MachineConfig
from kvmpy.result import StopReason

pytestmark = pytest.mark.kvm

PATTERN_GUEST = r"""
#include <kvmpy.h>
#include <kvmpy/ipc.h>
volatile uint64_t params[4];          /* size, seed, span, spare */
volatile uint64_t results[4];         /* mismatches, a, b, bytes */
unsigned char buf[1 << 16] __attribute__((aligned(64)));
int main(void)
{
	uint64_t size = params[0], span = params[2];
	struct kvmpy_pattern p;
	kvmpy_pattern_init(&p, params[1]);
	for (uint64_t off = 0; off < size; off += span) {
		uint64_t n = size - off < span ? size - off : span;
		kvmpy_pattern_check(&p, buf + off, n);
	}
	results[0] = p.mismatches;
	kvmpy_pattern_sum(&p, (uint64_t *)&results[1], (uint64_t *)&results[2]);
	results[3] = p.offset;
	return 0;
}
"""


def _fletcher(data: bytes) -> tuple[int, int]:
    a = b = 0
    for i in range(0, len(data), 8):
        a = (a + int.from_bytes(data[i : i + 8].ljust(8, b"\0"), "little")) % 2**64
        b = (b + a) % 2**64
    return a, b


@pytest.mark.parametrize(
    ("size", "span", "corrupt"),
    [
        (4096, 4096, []),
        (4099, 1000, []),
        (4096, 4096, [0, 7, 8, 31, 32, 4095]),
        (5003, 13, [5, 100, 101, 102, 103, 4999]),
        (64, 64, list(range(64))),
    ],
)
def test_pattern_check_counts_what_differs(kvm, build_guest, size, span, corrupt):
    image = build_guest(PATTERN_GUEST, "long-user")
    data = bytearray(pattern_bytes(size, 7))
    for i in corrupt:
        data[i] ^= 0x5A
    with Machine(MachineConfig(mode="long-user", memory="8M"), kvm=kvm) as m:
        m.load_file(image)
        sym = m.image.symbols
        m.memory.write(sym["buf"], bytes(data))
        m.memory.write(sym["params"], struct.pack("<4Q", size, 7, span, 0))
        r = m.run(timeout=30)
        mism, a, b, seen = struct.unpack("<4Q", m.memory.read(sym["results"], 32))
    assert r.stop_reason is StopReason.EXIT, r.message
    assert seen == size
    assert (a, b) == _fletcher(bytes(data))
    if not corrupt:
        assert mism == 0 and (a, b) == pattern_checksum(size, 7)
    else:
        # A corrupted byte spoils its 8-byte word (or itself, at an unaligned span edge), so
        # there is at least one mismatch per corrupted word and at most one per byte.
        words = {i // 8 for i in corrupt}
        assert len(words) <= mism <= len(corrupt)


RING_GUEST = r"""
#include <kvmpy.h>
#include <kvmpy/ipc.h>
volatile int64_t results[8];
static struct kvmpy_ring ring __attribute__((aligned(64)));
static unsigned char data[256];
static struct kvmpy_ipc_counters counters;
int main(void)
{
	struct kvmpy_ring_end e = {&ring, data, sizeof data, sizeof data - 1, 0, 0, 0, &counters};
	unsigned char out[300], in[300];
	for (int i = 0; i < 300; i++)
		out[i] = (unsigned char)(i * 7 + 1);
	ring.head = ring.tail = 200;  /* start near the end: the copies wrap */
	void *p;
	results[0] = kvmpy_ring_reserve(&e, &p);            /* 56: room up to the end */
	results[1] = kvmpy_shm_send(&e, out, 256);          /* 0: exactly full */
	results[2] = kvmpy_ring_reserve(&e, &p);            /* 0: full */
	results[3] = kvmpy_shm_recv(&e, in, 256);
	results[4] = __builtin_memcmp(in, out, 256);        /* 0: same bytes */
	ring.head = ring.tail + 257;                        /* a peer lying about the head */
	const void *q;
	results[5] = kvmpy_ring_peek(&e, &q);               /* -EPROTO */
	ring.head = ring.tail - 1;
	results[6] = kvmpy_ring_peek(&e, &q);               /* -EPROTO */
	results[7] = kvmpy_ring_reserve(&e, &p);            /* -EPROTO too */
	return 0;
}
"""


def test_ring_api_wraps_and_refuses_impossible_indices(kvm, build_guest):
    image = build_guest(RING_GUEST, "long-user")
    with Machine(MachineConfig(mode="long-user", memory="8M"), kvm=kvm) as m:
        m.load_file(image)
        r = m.run(timeout=30)
        res = struct.unpack("<8q", m.memory.read(m.image.symbols["results"], 64))
    assert r.stop_reason is StopReason.EXIT, r.message
    assert res[:5] == (56, 0, 0, 0, 0)
    assert res[5:] == (-71, -71, -71)
