"""virtio-balloon (VIRTIO 1.2, 5.5): the host asks the guest for memory back; the guest gives
pages it does not use (inflate), takes them back (deflate), reports its memory statistics, and
reports free pages on its own (free page reporting).

Queues, numbered as Linux numbers them (consecutively among those the negotiated features
bring, which is what VIRTIO 1.3 says too): inflateq, deflateq, then statsq with STATS_VQ, then
reporting_vq with PAGE_REPORTING.

    inflate    buffers of le32 page frame numbers (4 KiB frames): the guest no longer uses
               them; the device discards them (MADV_DONTNEED, or a punched hole in the memfd),
               so the host has that memory back and the guest finds zero pages there later
    deflate    the same, given back to the guest: nothing to do (a discarded page comes back
               on its own, as a zero page, when it is touched)
    stats      one buffer the device holds; handing it back asks for new statistics, which
               the guest writes into it ({le16 tag, le64 value}, packed) and returns
    reporting  device-writable buffers *are* free guest memory: the device discards them

The guest is untrusted: every frame number and range goes through `discard`, the machine's
`GuestMemory.discard`, which releases only whole pages of this machine's own RAM (a frame
outside RAM, in the MMIO hole, in memory shared with another VM, is refused and counted, never
an error of the device: the worst a guest can do is waste its own memory). How much of one
buffer is read is bounded, so a guest cannot make the device allocate without bound.

Config space (struct virtio_balloon_config): num_pages, the host's target, written by the
device; actual, the balloon's size in pages, written by the driver.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable

from .constants import ID_BALLOON
from .device import VirtioDevice
from .queue import Chain, Virtqueue

# 5.5.3 Feature bits
F_MUST_TELL_HOST = 1 << 0
F_STATS_VQ = 1 << 1
F_DEFLATE_ON_OOM = 1 << 2
F_FREE_PAGE_HINT = 1 << 3
F_PAGE_POISON = 1 << 4
F_PAGE_REPORTING = 1 << 5

# 5.5.6.3 Memory statistics tags
STAT_NAMES = {
    0: "swap_in",
    1: "swap_out",
    2: "major_faults",
    3: "minor_faults",
    4: "free_memory",
    5: "total_memory",
    6: "available_memory",
    7: "disk_caches",
    8: "hugetlb_allocations",
    9: "hugetlb_failures",
}
_STAT = struct.Struct("<HQ")  # packed: 10 bytes

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
QUEUE_SIZE = 128
#: Frame numbers taken from one inflate/deflate buffer (Linux sends at most 256).
MAX_PFNS_PER_BUFFER = 4096
#: Statistics entries read from one buffer (Linux sends 10 or so).
MAX_STATS = 64

Discard = Callable[[int, int], bool]


class VirtioBalloon(VirtioDevice):
    device_id = ID_BALLOON
    features = F_STATS_VQ | F_DEFLATE_ON_OOM | F_PAGE_REPORTING

    def __init__(self, name: str = "balloon0", discard: Discard | None = None,
                 ram_pages: int = 0, pfn_limit: int = 1 << 20,
                 stats_interval: float = 0.0):  # fmt: skip
        # Queue slots: the roles of slots 2 and 3 depend on the features negotiated.
        super().__init__(name, [QUEUE_SIZE] * 4)
        self.discard = discard or (lambda gpa, length: False)
        #: The most the host may ask for: all of the guest's RAM (0: no limit given).
        self.ram_pages = ram_pages
        self.stats_interval = stats_interval
        self.num_pages = 0  # target, pages
        self.actual = 0  # the driver's count, pages
        #: Frames the device discarded and the guest has not taken back: a bitmap up to the
        #: end of RAM (`pfn_limit`; frames beyond it are never RAM), one bit per 4 KiB.
        self.ballooned = PageBitmap(pfn_limit)
        self._stats_chain: Chain | None = None
        self._stats_head: int | None = None  # for a snapshot: the chain held
        self.last_stats: dict[str, int] = {}
        self.stats_updated = 0.0  # time.monotonic() of the last statistics
        self._stats_cond = threading.Condition()
        # Counters
        self.inflated_pages = 0
        self.deflated_pages = 0
        self.reported_bytes = 0
        self.discarded_bytes = 0
        self.refused_pfns = 0
        self.refused_ranges = 0
        self.stats_updates = 0

    # --- queues and their roles ----------------------------------------------------------

    def role(self, index: int) -> str | None:
        """What queue `index` is for, given the negotiated features."""
        roles = ["inflate", "deflate"]
        if self.has(F_STATS_VQ):
            roles.append("stats")
        if self.has(F_PAGE_REPORTING):
            roles.append("reporting")
        return roles[index] if 0 <= index < len(roles) else None

    def handle(self, q: Virtqueue) -> None:
        role = self.role(q.index)
        if role in ("inflate", "deflate"):
            self._pfns(q, role == "inflate")
        elif role == "stats":
            self._stats(q)
        elif role == "reporting":
            self._reporting(q)
        else:
            # A queue this configuration does not have: take nothing from it.
            return

    def _pfns(self, q: Virtqueue, inflate: bool) -> None:
        pushed = False
        while (chain := self.next_chain(q)) is not None:
            data = chain.read(MAX_PFNS_PER_BUFFER * 4)
            pfns = [p for (p,) in struct.iter_unpack("<I", data[: len(data) & ~3])]
            if inflate:
                self._inflate(pfns)
            else:
                for p in pfns:
                    if self.ballooned.clear(p):
                        self.deflated_pages += 1
            self.requests += 1
            q.push(chain, 0)
            pushed = True
        if pushed:
            self.signal_used(q)

    def _inflate(self, pfns: list[int]) -> None:
        # Runs of consecutive frames are discarded with one call each.
        pfns = sorted(set(pfns))
        i = 0
        while i < len(pfns):
            j = i + 1
            while j < len(pfns) and pfns[j] == pfns[j - 1] + 1:
                j += 1
            first, count = pfns[i], j - i
            if self.discard(first << PAGE_SHIFT, count << PAGE_SHIFT):
                self.discarded_bytes += count << PAGE_SHIFT
                for p in range(first, first + count):
                    self.inflated_pages += self.ballooned.set(p)
            else:
                # Outside RAM or not the machine's own: page by page, what can be discarded is.
                for p in range(first, first + count):
                    if self.discard(p << PAGE_SHIFT, PAGE_SIZE):
                        self.discarded_bytes += PAGE_SIZE
                        self.inflated_pages += self.ballooned.set(p)
                    else:
                        self.refused_pfns += 1
            i = j

    def _stats(self, q: Virtqueue) -> None:
        while (chain := self.next_chain(q)) is not None:
            if self._stats_chain is not None:
                # A second buffer while we hold one: give the older back unused.
                q.push(self._stats_chain, 0)
                self.signal_used(q)
            data = chain.read(MAX_STATS * _STAT.size)
            stats = {}
            for off in range(0, len(data) - _STAT.size + 1, _STAT.size):
                tag, value = _STAT.unpack_from(data, off)
                stats[STAT_NAMES.get(tag, f"tag_{tag}")] = value
            with self._stats_cond:
                if stats:
                    self.last_stats = stats
                    self.stats_updates += 1
                    self.stats_updated = time.monotonic()
                self._stats_chain, self._stats_head = chain, chain.head
                self._stats_cond.notify_all()
            self.requests += 1
        if self.stats_interval > 0 and self.loop is not None and self._stats_chain is not None:
            self.loop.call_later(self.stats_interval, self.request_stats)

    def request_stats(self) -> bool:
        """Ask the driver for fresh statistics (hand the held buffer back); False if the
        driver has not given us one to hand back."""
        with self.lock:
            chain = self._stats_chain
            if chain is None or not self.running:
                return False
            role = [i for i in range(len(self.queues)) if self.role(i) == "stats"]
            if not role:
                return False
            q = self.queues[role[0]]
            self._stats_chain, self._stats_head = None, None
            q.push(chain, 0)
            self.signal_used(q)
            return True

    def fresh_stats(self, timeout: float = 1.0) -> dict[str, int]:
        """Request statistics and wait (up to `timeout`) for the driver's answer; the last
        ones known if it does not answer in time."""
        before = self.stats_updates
        asked = self.request_stats() if self.loop is None else self._ask_in_loop()
        if asked:
            with self._stats_cond:
                self._stats_cond.wait_for(lambda: self.stats_updates != before, timeout)
        return dict(self.last_stats)

    def _ask_in_loop(self) -> bool:
        done = threading.Event()
        result = [False]

        def ask() -> None:
            result[0] = self.request_stats()
            done.set()

        self.loop.call_soon(ask)
        done.wait(1.0)
        return result[0]

    def _reporting(self, q: Virtqueue) -> None:
        pushed = False
        while (chain := self.next_chain(q)) is not None:
            for gpa, length in chain.writable_at:
                # Whole pages only: a report's edges that are not page-aligned stay.
                start = (gpa + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
                end = (gpa + length) & ~(PAGE_SIZE - 1)
                if end <= start:
                    continue
                if self.discard(start, end - start):
                    self.reported_bytes += end - start
                    self.discarded_bytes += end - start
                else:
                    self.refused_ranges += 1
            self.requests += 1
            q.push(chain, 0)
            pushed = True
        if pushed:
            self.signal_used(q)

    # --- the host's side -----------------------------------------------------------------

    def set_target(self, pages: int) -> int:
        """Ask the guest to hold `pages` pages in its balloon (clamped to its RAM)."""
        pages = max(0, int(pages))
        if self.ram_pages:
            pages = min(pages, self.ram_pages)
        with self.lock:
            self.num_pages = pages
            self.config_changed()
        return pages

    # --- config space --------------------------------------------------------------------

    def config_bytes(self) -> bytes:
        # num_pages, actual, free_page_hint_cmd_id, poison_val (the last two unused here)
        return struct.pack("<IIII", self.num_pages, self.actual, 0, 0)

    def write_config(self, offset: int, data: bytes) -> None:
        # Only `actual` (offset 4) is the driver's; a write elsewhere, or of another width,
        # is ignored.
        if offset == 4 and len(data) == 4:
            self.actual = struct.unpack("<I", data)[0]

    # --- lifecycle -----------------------------------------------------------------------

    def on_reset(self) -> None:
        # The guest's memory is the guest's again after a reset (5.5.6.1: a driver starting
        # up assumes an empty balloon).
        self.actual = 0
        self.ballooned.clear_all()
        self._stats_chain, self._stats_head = None, None

    def stats(self) -> dict:
        d = super().stats()
        d.update(
            target_pages=self.num_pages,
            actual_pages=self.actual,
            ballooned_pages=self.ballooned.count,
            inflated_pages=self.inflated_pages,
            deflated_pages=self.deflated_pages,
            reported_bytes=self.reported_bytes,
            discarded_bytes=self.discarded_bytes,
            refused_pfns=self.refused_pfns,
            refused_ranges=self.refused_ranges,
            guest_stats=dict(self.last_stats),
        )
        return d

    def device_state(self) -> dict:
        return {
            "num_pages": self.num_pages,
            "actual": self.actual,
            "ballooned": self.ballooned.runs(),
            "stats_head": self._stats_head,
            "last_stats": dict(self.last_stats),
        }

    def restore_device_state(self, state: dict) -> None:
        self.num_pages = int(state.get("num_pages", 0))
        self.actual = int(state.get("actual", 0))
        self.ballooned.clear_all()
        for first, count in state.get("ballooned", []):
            for p in range(int(first), min(int(first) + int(count), self.ballooned.limit)):
                self.ballooned.set(p)
        self.last_stats = {str(k): int(v) for k, v in dict(state.get("last_stats", {})).items()}
        head = state.get("stats_head")
        if head is not None:
            # The statistics buffer the device held: walk its chain again from the ring.
            stats_q = [q for i, q in enumerate(self.queues) if self.role(i) == "stats"]
            if stats_q and stats_q[0].ready:
                try:
                    self._stats_chain = stats_q[0]._walk(int(head))
                    self._stats_head = int(head)
                except Exception as e:  # a snapshot that does not fit: no statistics
                    self.fail(f"statistics buffer of the snapshot: {e}")


class PageBitmap:
    """A set of page frame numbers below `limit`: a bit each (a 1 TiB guest: 32 MiB)."""

    def __init__(self, limit: int):
        self.limit = max(0, limit)
        self.bits = bytearray((self.limit + 7) // 8)
        self.count = 0

    def set(self, pfn: int) -> bool:
        """Add `pfn`; True if it was not there (False also for one beyond the limit)."""
        if not 0 <= pfn < self.limit:
            return False
        byte, bit = divmod(pfn, 8)
        if self.bits[byte] >> bit & 1:
            return False
        self.bits[byte] |= 1 << bit
        self.count += 1
        return True

    def clear(self, pfn: int) -> bool:
        if not 0 <= pfn < self.limit:
            return False
        byte, bit = divmod(pfn, 8)
        if not self.bits[byte] >> bit & 1:
            return False
        self.bits[byte] &= ~(1 << bit) & 0xFF
        self.count -= 1
        return True

    def __contains__(self, pfn: int) -> bool:
        return 0 <= pfn < self.limit and bool(self.bits[pfn // 8] >> (pfn % 8) & 1)

    def clear_all(self) -> None:
        self.bits[:] = bytes(len(self.bits))
        self.count = 0

    def runs(self) -> list[list[int]]:
        """[first, count] of each run of set frames (what a snapshot records)."""
        out: list[list[int]] = []
        if not self.count:
            return out
        for byte, v in enumerate(self.bits):
            if not v:
                continue
            for bit in range(8):
                if v >> bit & 1:
                    p = byte * 8 + bit
                    if out and out[-1][0] + out[-1][1] == p:
                        out[-1][1] += 1
                    else:
                        out.append([p, 1])
        return out
