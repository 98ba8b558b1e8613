"""The split virtqueue (VIRTIO 1.2, 2.7), sans-IO over kvmpy's bounds-checked GuestMemory.

Everything in a virtqueue comes from the guest and is checked before it is used: ring
addresses (in RAM, aligned), the available index (it may move at most Queue Size ahead of what
the device has taken, 2.7.13.3), every head and `next` index (inside the table), every buffer
(inside RAM, through `GuestMemory.view`), indirect tables (negotiated, a multiple of 16 bytes,
no NEXT, no nesting), the order of buffers (device-writable after device-readable, 2.7.4.2) and
the chain length (no longer than Queue Size, 2.7.5.3.1, which also ends descriptor loops). A
violation raises `QueueError`; the device turns it into DEVICE_NEEDS_RESET (see device.py).

A popped `Chain` holds zero-copy memoryviews of the guest's buffers: device-readable ones to
read and device-writable ones to write, so a device cannot write into a buffer the guest
marked read-only. A chain holds at most Queue Size views, so a pop allocates a bounded amount
whatever the guest wrote.

Ordering: x86 keeps stores in order and loads in order, so used-ring entries written before
the used index are seen first by the guest, as 2.7.8.2 requires. A store followed by a load
of another location can be reordered, though; the two places where the protocol needs that
order (publishing avail_event then re-reading the available index; publishing the used index
then reading used_event) go through `full_fence()`.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from ...errors import GuestMemoryError
from ...memory import GuestMemory
from .constants import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    MAX_QUEUE_SIZE,
)

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")

_fence_lock = threading.Lock()


def full_fence() -> None:
    """A full memory barrier: CPython takes a lock with an atomic read-modify-write (a locked
    instruction on x86, which orders every earlier store before every later load)."""
    with _fence_lock:
        pass


class QueueError(Exception):
    """The guest broke the virtqueue protocol; the message says how (for logs and stats)."""


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """vring_need_event (2.7.10): did [old_idx, new_idx) pass event_idx? All 16-bit."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


@dataclass(eq=False)
class Chain:
    """One descriptor chain the device took from the available ring."""

    head: int
    readable: list[memoryview]
    writable: list[memoryview]
    #: (gpa, length) of each device-writable buffer: what a migration's dirty tracking must
    #: learn about, since device writes go through views, not GuestMemory.write.
    writable_at: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(len(v) for v in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(v) for v in self.writable)

    def read(self, limit: int, skip: int = 0) -> bytes:
        """Up to `limit` bytes of the device-readable buffers, from byte `skip` on."""
        return b"".join(bytes(v) for v in _slices(self.readable, skip, limit))

    def readable_iov(self, skip: int, length: int) -> list[memoryview]:
        """Views of readable bytes [skip, skip+length) (fewer if the chain is shorter)."""
        return list(_slices(self.readable, skip, length))

    def writable_iov(self, skip: int, length: int) -> list[memoryview]:
        return list(_slices(self.writable, skip, length))

    def write(self, data: bytes | memoryview, skip: int = 0) -> int:
        """Copy `data` into the device-writable buffers from byte `skip`; returns the bytes
        that fit."""
        done = 0
        for v in _slices(self.writable, skip, len(data)):
            n = len(v)
            v[:] = data[done : done + n]
            done += n
        return done


def _slices(views: list[memoryview], skip: int, length: int) -> Iterator[memoryview]:
    if length <= 0:
        return
    for v in views:
        n = len(v)
        if skip >= n:
            skip -= n
            continue
        take = min(n - skip, length)
        yield v[skip : skip + take]
        length -= take
        skip = 0
        if length == 0:
            return


class Virtqueue:
    """One split virtqueue: the transport fills in its configuration, the device pops chains
    and pushes used elements."""

    def __init__(self, index: int, max_size: int):
        if not (0 < max_size <= MAX_QUEUE_SIZE and max_size & (max_size - 1) == 0):
            raise ValueError(f"queue size {max_size} is not a power of two in 1..32768")
        self.index = index
        self.max_size = max_size
        self.memory: GuestMemory | None = None
        self.reset()

    def reset(self) -> None:
        # Transport-visible configuration (2.7 / 4.1.4.3 / 4.2.2)
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.msix_vector = 0xFFFF
        # Negotiated features, fixed when the queue is enabled
        self.event_idx = False
        self.indirect = False
        # Device state
        self.last_avail = 0
        self.used_idx = 0
        self.signalled_used = 0
        self.signalled_valid = False
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None
        self._used16: memoryview | None = None
        #: Chains popped and pushed since the queue was enabled.
        self.popped = 0
        self.pushed = 0

    # --- configuration ---------------------------------------------------------------------

    def set_size(self, size: int) -> bool:
        """The driver's Queue Size; refused (False) unless a power of two <= max_size (2.7:
        split queues need a power of two, and the device offers at most max_size)."""
        if self.ready or not (0 < size <= self.max_size and size & (size - 1) == 0):
            return False
        self.size = size
        return True

    def enable(self, memory: GuestMemory, event_idx: bool, indirect: bool) -> None:
        """Queue Ready was set: check and map the three rings (QueueError if they are bad)."""
        n = self.size
        if self.desc_addr % 16 or self.avail_addr % 2 or self.used_addr % 4:
            raise QueueError(
                f"queue {self.index}: misaligned rings (desc {self.desc_addr:#x}, "
                f"avail {self.avail_addr:#x}, used {self.used_addr:#x})"
            )
        extra = 2 if event_idx else 0
        try:
            desc = memory.view(self.desc_addr, 16 * n)
            avail = memory.view(self.avail_addr, 4 + 2 * n + extra).cast("H")
            used = memory.view(self.used_addr, 4 + 8 * n + extra)
        except GuestMemoryError as e:
            raise QueueError(f"queue {self.index}: a ring is outside guest RAM ({e})") from None
        self.memory = memory
        self._desc, self._avail, self._used = desc, avail, used
        self._used16 = used.cast("H")
        self.event_idx, self.indirect = event_idx, indirect
        # A freshly reset queue starts at index 0 on both rings (the driver zeroed them).
        self.last_avail = 0
        self.used_idx = 0
        self.signalled_used = 0
        self.signalled_valid = False
        self.ready = True

    def disable(self) -> None:
        self.ready = False
        self._desc = self._avail = self._used = self._used16 = None

    # --- the available ring ----------------------------------------------------------------

    def avail_idx(self) -> int:
        assert self._avail is not None
        return self._avail[1]

    def pending(self) -> int:
        """Chains the driver has made available and the device has not taken (QueueError if
        the index moved further than a full ring)."""
        if self._avail is None:
            return 0
        n = (self._avail[1] - self.last_avail) & 0xFFFF
        if n > self.size:
            raise QueueError(
                f"queue {self.index}: available index jumped {n} entries ahead of the "
                f"device (queue size {self.size})"
            )
        return n

    def pop(self) -> Chain | None:
        """The next available chain, or None."""
        if not self.ready or not self.pending():
            return None
        assert self._avail is not None
        head = self._avail[2 + self.last_avail % self.size]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        self.popped += 1
        return self._walk(head)

    def pop_readable(self) -> tuple[int, memoryview | Chain] | None:
        """pop() for a transmit queue: a chain of one device-readable descriptor (what a
        driver posts for a frame or packet) comes back as (head, view of the buffer) without
        building a Chain; any other chain as (head, Chain), checked by the same walk. None
        if the queue is empty. (virtio-net's transmit path: ~1.5 µs less per frame than
        pop() on this host, a fifth of the device's whole cost per 64-byte frame.)"""
        if not self.ready or not self.pending():
            return None
        assert self._avail is not None and self._desc is not None and self.memory is not None
        head = self._avail[2 + self.last_avail % self.size]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        self.popped += 1
        if head < self.size:
            addr, length, flags, _ = _DESC.unpack_from(self._desc, head * 16)
            if not flags and length:
                try:
                    return head, self.memory.view(addr, length)
                except GuestMemoryError:
                    raise QueueError(
                        f"queue {self.index}: buffer {addr:#x}+{length:#x} is outside guest RAM"
                    ) from None
        return head, self._walk(head)

    def push_heads(self, heads: list[int]) -> None:
        """Return chains the device only read (0 bytes written), publishing the used index
        once for all of them (2.7.8: the index may move by several entries at a time)."""
        if not self.ready or not heads:
            return
        assert self._used is not None and self._used16 is not None
        used, size, idx = self._used, self.size, self.used_idx
        pack = _USED_ELEM.pack_into
        on_write = self.memory.on_write if self.memory is not None else None
        for head in heads:
            slot = idx % size
            pack(used, 4 + 8 * slot, head, 0)
            idx = (idx + 1) & 0xFFFF
            if on_write is not None:
                on_write(self.used_addr + 4 + 8 * slot, 8)
        self.used_idx = idx
        self._used16[1] = idx  # after the elements (x86 keeps stores in order)
        self.pushed += len(heads)
        if on_write is not None:
            on_write(self.used_addr, 4)

    def unpop(self, n: int = 1) -> None:
        """Give back the last `n` popped chains (not used): they are taken again by the next
        pops, as the guest left them (virtio-net keeps a receive buffer too small for one
        frame for the next)."""
        n = min(n, self.popped)
        self.last_avail = (self.last_avail - n) & 0xFFFF
        self.popped -= n

    def _walk(self, head: int) -> Chain:
        size = self.size
        if head >= size:
            raise QueueError(f"queue {self.index}: head index {head} >= queue size {size}")
        memory = self.memory
        assert memory is not None and self._desc is not None
        view = memory.view
        table = self._desc
        table_len = size
        idx = head
        count = 0
        in_indirect = False
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        writable_at: list[tuple[int, int]] = []
        unpack = _DESC.unpack_from
        while True:
            addr, length, flags, nxt = unpack(table, idx * 16)
            if flags & DESC_F_INDIRECT:
                if not self.indirect:
                    raise QueueError(f"queue {self.index}: indirect descriptor not negotiated")
                if in_indirect:
                    raise QueueError(f"queue {self.index}: nested indirect descriptor")
                if flags & DESC_F_NEXT:
                    raise QueueError(f"queue {self.index}: indirect descriptor with NEXT")
                if length == 0 or length % 16 or length // 16 > size:
                    raise QueueError(
                        f"queue {self.index}: indirect table of {length} bytes (must be a "
                        f"nonzero multiple of 16, at most {size} entries)"
                    )
                try:
                    table = view(addr, length)
                except GuestMemoryError:
                    raise QueueError(
                        f"queue {self.index}: indirect table at {addr:#x}+{length:#x} is "
                        "outside guest RAM"
                    ) from None
                table_len = length // 16
                in_indirect = True
                idx = 0
                continue
            count += 1
            if count > size:
                raise QueueError(
                    f"queue {self.index}: descriptor chain longer than the queue size {size} "
                    "(a loop?)"
                )
            if flags & DESC_F_WRITE:
                if length:
                    try:
                        writable.append(view(addr, length))
                        writable_at.append((addr, length))
                    except GuestMemoryError:
                        raise QueueError(
                            f"queue {self.index}: buffer {addr:#x}+{length:#x} is outside guest RAM"
                        ) from None
            else:
                if writable:
                    raise QueueError(
                        f"queue {self.index}: device-readable buffer after a device-writable one"
                    )
                if length:
                    try:
                        readable.append(view(addr, length))
                    except GuestMemoryError:
                        raise QueueError(
                            f"queue {self.index}: buffer {addr:#x}+{length:#x} is outside guest RAM"
                        ) from None
            if not flags & DESC_F_NEXT:
                return Chain(head, readable, writable, writable_at)
            if nxt >= table_len:
                raise QueueError(
                    f"queue {self.index}: next index {nxt} outside a table of {table_len}"
                )
            idx = nxt

    def enable_notifications(self) -> bool:
        """After draining: ask the driver to notify at the next buffer (EVENT_IDX: publish
        avail_event), then look again. True if buffers arrived in between (process them:
        the driver may not notify for those)."""
        if not self.ready:
            return False
        if self.event_idx:
            assert self._used16 is not None
            self._used16[2 + 4 * self.size] = self.last_avail
            full_fence()
            on_write = self.memory.on_write if self.memory is not None else None
            if on_write is not None:
                on_write(self.used_addr + 4 + 8 * self.size, 2)
        return self.pending() > 0

    # --- the used ring ---------------------------------------------------------------------

    def push(self, chain: Chain, written: int) -> None:
        """Return `chain` to the driver with `written` bytes written into it."""
        if not self.ready:
            return
        assert self._used is not None and self._used16 is not None
        slot = self.used_idx % self.size
        _USED_ELEM.pack_into(self._used, 4 + 8 * slot, chain.head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        # The element is stored before the index (x86 keeps stores in order).
        self._used16[1] = self.used_idx
        self.pushed += 1
        on_write = self.memory.on_write if self.memory is not None else None
        if on_write is not None:  # a live migration is tracking the VMM's writes
            if written:
                for gpa, length in chain.writable_at:
                    on_write(gpa, length)
            on_write(self.used_addr, 4)
            on_write(self.used_addr + 4 + 8 * slot, 8)

    def needs_interrupt(self) -> bool:
        """Should the driver be interrupted for what was pushed since the last interrupt?
        (2.7.7.2 / 2.7.10: used_event with EVENT_IDX, else the NO_INTERRUPT flag.)"""
        if not self.ready:
            return False
        assert self._avail is not None
        new = self.used_idx
        if self.event_idx:
            full_fence()  # our used index store before the load of used_event
            old, valid = self.signalled_used, self.signalled_valid
            self.signalled_used, self.signalled_valid = new, True
            if not valid:
                return True
            return need_event(self._avail[2 + self.size], new, old)
        return not self._avail[0] & AVAIL_F_NO_INTERRUPT

    def state(self) -> dict:
        return {
            "size": self.size,
            "ready": self.ready,
            "desc": self.desc_addr,
            "avail": self.avail_addr,
            "used": self.used_addr,
            "msix_vector": self.msix_vector,
            "last_avail": self.last_avail,
            "used_idx": self.used_idx,
            "signalled_used": self.signalled_used,
            "signalled_valid": self.signalled_valid,
            "event_idx": self.event_idx,
            "indirect": self.indirect,
        }

    def restore_state(self, state: dict, memory: GuestMemory) -> None:
        self.reset()
        self.size = int(state["size"])
        self.desc_addr, self.avail_addr = int(state["desc"]), int(state["avail"])
        self.used_addr = int(state["used"])
        self.msix_vector = int(state["msix_vector"])
        if state["ready"]:
            self.enable(memory, bool(state["event_idx"]), bool(state["indirect"]))
            self.last_avail = int(state["last_avail"]) & 0xFFFF
            self.used_idx = int(state["used_idx"]) & 0xFFFF
            self.signalled_used = int(state["signalled_used"]) & 0xFFFF
            self.signalled_valid = bool(state["signalled_valid"])
