"""The pio channel: a data port whose bytes one VMM relays to the other over a unix socket.

Sending. KVM's instruction emulator hands `rep outs` to userspace one item per exit (and plain
`out` is one exit anyway), ~70-80 us each from CPL3 on KVM-PVM. kvmpy registers the data port
as a *coalesced* PIO zone, so KVM appends each `out` to a ring in the vCPU's mmap (page
KVM_COALESCED_MMIO_PAGE_OFFSET) and goes back to the guest without a userspace exit; only
when the ring is full (170 entries) does a write exit, and the VMM then drains the ring, in
order, before that write. With `rep outsl` the emulator keeps iterating inside the kernel, so
4 bytes cost ~0.9 us instead of one exit. The guest writes the flush port at the end of a
message so the last partial ring reaches the peer at once.

Receiving. `rep ins` *is* batched by KVM (up to 1 KiB per exit, its read-ahead buffer), and
the device answers a whole batch with one socket read (`read_string`). An `in` waits in the
VMM until the peer's bytes are there: that is the flow control, together with the socket's
own buffer, which stops a sender whose receiver does not read. Nothing is lost or repeated
because every byte KVM asks for is answered exactly once, from a byte stream.
"""

from __future__ import annotations

import socket
import time

from ..devices import Device
from .control import IpcError, PeerGone, wait_readable, wait_writable
from .layout import PORT_DATA

# struct kvm_coalesced_mmio_ring: u32 first, last; then entries of
# {u64 phys_addr; u32 len; u32 pio; u8 data[8]}.
RING_ENTRY = 24
RING_ENTRIES = (4096 - 8) // RING_ENTRY


class Relay:
    """The byte stream to the peer VMM (a connected SOCK_STREAM unix socket)."""

    def __init__(self, sock: socket.socket, timeout: float, abort: int | None):
        self.sock = sock
        sock.setblocking(False)
        self.timeout = timeout
        self.abort = abort
        self.sent = 0
        self.received = 0
        #: Host time spent in send calls, and blocked waiting for the peer's bytes.
        self.send_ns = 0
        self.wait_ns = 0
        self.recv_ns = 0

    def send(self, data: bytes | bytearray | memoryview) -> None:
        t0 = time.perf_counter_ns()
        view = memoryview(data)
        try:
            while view:
                try:
                    n = self.sock.send(view)
                except BlockingIOError:
                    wait_writable(self.sock.fileno(), self.timeout, self.abort, "the peer to read")
                    continue
                view = view[n:]
                self.sent += n
        except (BrokenPipeError, ConnectionResetError):
            raise PeerGone("the peer VMM closed the pio relay") from None
        finally:
            self.send_ns += time.perf_counter_ns() - t0

    def recv_into(self, view: memoryview) -> None:
        """Fill `view` completely with the peer's next bytes."""
        t0 = time.perf_counter_ns()
        waited = 0
        try:
            while view:
                try:
                    n = self.sock.recv_into(view)
                except BlockingIOError:
                    w0 = time.perf_counter_ns()
                    wait_readable(self.sock.fileno(), self.timeout, self.abort, "the peer's bytes")
                    waited += time.perf_counter_ns() - w0
                    continue
                except ConnectionResetError:
                    n = 0
                if n == 0:
                    raise PeerGone(f"the peer VMM closed the pio relay after {self.received} bytes")
                view = view[n:]
                self.received += n
        finally:
            self.wait_ns += waited
            self.recv_ns += time.perf_counter_ns() - t0 - waited


class CoalescedRing:
    """KVM's coalesced MMIO/PIO ring in a vCPU's mmap, drained from the host side.

    `first` is ours, `last` the kernel's; the kernel fills entries before it moves `last`
    (smp_wmb), and never writes an entry between `first` and `last`."""

    def __init__(self, page: memoryview, port: int):
        self.page = page
        self.idx = page[:8].cast("I")
        self.port = port
        self.drains = 0
        self.entries = 0
        self.stray = 0  # entries for other ports of the zone

    def release(self) -> None:
        self.idx.release()
        self.page.release()

    def drain(self) -> bytes:
        idx = self.idx
        first, last = idx[0], idx[1]
        if first == last:
            return b""
        if first >= RING_ENTRIES or last >= RING_ENTRIES:
            raise IpcError(f"KVM's coalesced ring has impossible indices {first}, {last}")
        page = self.page
        if first < last:
            seg = bytes(page[8 + first * RING_ENTRY : 8 + last * RING_ENTRY])
        else:
            seg = bytes(page[8 + first * RING_ENTRY : 8 + RING_ENTRIES * RING_ENTRY]) + bytes(
                page[8 : 8 + last * RING_ENTRY]
            )
        idx[0] = last
        n = len(seg) // RING_ENTRY
        self.drains += 1
        self.entries += n
        lo = self.port & 0xFF
        # Common case: every entry is the same width on the data port itself. Pull the data
        # bytes out with strided slices (C speed) instead of a Python loop per entry; a
        # loop would cost about as much as the exit the ring saved.
        if seg[0::RING_ENTRY].count(lo) == n:
            width = seg[8]
            if width in (1, 2, 4) and seg[8::RING_ENTRY].count(width) == n:
                out = bytearray(width * n)
                for j in range(width):
                    out[j::width] = seg[16 + j :: RING_ENTRY]
                return bytes(out)
        out = bytearray()
        for i in range(n):
            e = seg[i * RING_ENTRY : (i + 1) * RING_ENTRY]
            addr = int.from_bytes(e[0:8], "little")
            length = min(int.from_bytes(e[8:12], "little"), 8)
            if addr == self.port:
                out += e[16 : 16 + length]
            else:
                self.stray += 1
        return bytes(out)


class PioDataPort(Device):
    """Ports PORT_DATA..+3: `out` to the first sends, `in` from it receives."""

    name = "ipc-pio-data"

    def __init__(self, relay: Relay, ring: CoalescedRing | None):
        self.relay = relay
        self.ring = ring
        self.exits_out = 0
        self.exits_in = 0
        self.bytes_out = 0
        self.bytes_in = 0
        self.stray = 0

    def flush(self, tail: bytes = b"") -> None:
        data = self.ring.drain() if self.ring is not None else b""
        if tail:
            data += tail
        if data:
            self.bytes_out += len(data)
            self.relay.send(data)

    def write(self, offset: int, data: bytes):
        self.exits_out += 1
        if offset:
            self.stray += 1
            self.flush()
            return None
        self.flush(data)
        return None

    def write_string(self, offset: int, size: int, data: memoryview):
        self.exits_out += 1
        if offset:
            self.stray += 1
            self.flush()
            return None
        self.flush(bytes(data))
        return None

    def read(self, offset: int, size: int) -> bytes:
        self.exits_in += 1
        if offset:
            self.stray += 1
            return b"\xff" * size
        buf = bytearray(size)
        self.relay.recv_into(memoryview(buf))
        self.bytes_in += size
        return bytes(buf)

    def read_string(self, offset: int, size: int, data: memoryview):
        self.exits_in += 1
        if offset:
            self.stray += 1
            data[:] = b"\xff" * len(data)
            return None
        self.relay.recv_into(data)
        self.bytes_in += len(data)
        return None


class PioFlushPort(Device):
    """PORT_FLUSH: hand everything the guest sent so far to the peer."""

    name = "ipc-pio-flush"

    def __init__(self, data: PioDataPort):
        self.data = data
        self.flushes = 0

    def write(self, offset: int, data: bytes):
        self.flushes += 1
        self.data.flush()
        return None


__all__ = ["PORT_DATA", "CoalescedRing", "PioDataPort", "PioFlushPort", "Relay"]
