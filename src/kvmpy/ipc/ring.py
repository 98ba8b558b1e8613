"""A ring of the shared region, seen from the host.

The guests own the rings; the VMM only looks (progress, a stalled transfer, the report) and
tests act as a peer through this class. Both indices live in memory a guest can write, so
every value read from them is checked before it is used: an index pair no honest peer can
produce raises `RingCorrupt`, and every byte offset is reduced modulo the ring size, so no
index, however hostile, makes the host touch memory outside the ring's data area.
"""

from __future__ import annotations

import struct

from .control import IpcError
from .layout import MASK64, RING_HEAD, RING_TAIL

_U64 = struct.Struct("<Q")


class RingCorrupt(IpcError):
    """A ring's indices are impossible (a guest wrote garbage into them)."""


class Ring:
    """One ring: its control block and data area are slices of the shared region."""

    def __init__(self, region: memoryview, ctl: int, data: int, size: int, name: str = "ring"):
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring size must be a power of two (got {size})")
        if ctl < 0 or ctl + 256 > len(region) or data < 0 or data + size > len(region):
            raise ValueError("ring outside the region")
        self.ctl = region[ctl : ctl + 256]
        self.data = region[data : data + size]
        self.size = size
        self.mask = size - 1
        self.name = name

    def release(self) -> None:
        self.ctl.release()
        self.data.release()

    @property
    def head(self) -> int:
        return _U64.unpack_from(self.ctl, RING_HEAD)[0]

    @property
    def tail(self) -> int:
        return _U64.unpack_from(self.ctl, RING_TAIL)[0]

    def indices(self) -> tuple[int, int]:
        """(head, tail), checked: 0 <= head - tail <= size, modulo 2^64."""
        # Tail first: the consumer only moves it towards the head, so a head read after it
        # is never behind it in an honest ring.
        tail = self.tail
        head = self.head
        used = (head - tail) & MASK64  # indices wrap at 2^64, as in the guest's C
        if used > self.size:
            raise RingCorrupt(
                f"{self.name}: impossible indices head={head:#x} tail={tail:#x} "
                f"(ring of {self.size} bytes)"
            )
        return head, tail

    def used(self) -> int:
        head, tail = self.indices()
        return (head - tail) & MASK64

    def read(self, limit: int) -> bytes:
        """Consume up to `limit` bytes (as the ring's consumer)."""
        head, tail = self.indices()
        n = min((head - tail) & MASK64, max(0, limit))
        out = self._copy_out(tail, n)
        _U64.pack_into(self.ctl, RING_TAIL, (tail + n) & MASK64)
        return out

    def write(self, data: bytes) -> int:
        """Produce as much of `data` as fits (as the ring's producer); returns the count."""
        head, tail = self.indices()
        n = min(self.size - ((head - tail) & MASK64), len(data))
        off = head & self.mask
        first = min(n, self.size - off)
        self.data[off : off + first] = data[:first]
        self.data[: n - first] = data[first:n]
        _U64.pack_into(self.ctl, RING_HEAD, (head + n) & MASK64)
        return n

    def _copy_out(self, index: int, n: int) -> bytes:
        off = index & self.mask
        first = min(n, self.size - off)
        return bytes(self.data[off : off + first]) + bytes(self.data[: n - first])
