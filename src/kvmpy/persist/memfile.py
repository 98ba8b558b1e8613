"""Guest RAM in a snapshot: a sparse file and its index.

The memory file has the guest's RAM regions one after another (region i starts where region
i-1 ends: its *logical* offset), so file offset = logical offset. Only pages that hold data
are written; everything else is a hole, so a 1 GiB guest that touched 64 MiB makes a 1 GiB file
that occupies 64 MiB on disk. Untouched pages are found with SEEK_DATA/SEEK_HOLE on the
region's memfd (the kernel knows which shmem pages exist), and zero pages among the touched
ones with numpy, at memory speed.

The index lists the written pages as *extents*: (first logical page, page count, CRC-32 of
their bytes). An extent never crosses a chunk boundary (CHUNK_PAGES-aligned), so an extent can
be checked on its own, when it is read: an eager restore checks each as it loads it; a lazy
restore checks a chunk when the guest first touches it (the chunk is also the prefetch unit).
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..memory import PAGE_SIZE, GuestMemory, MemoryRegion
from . import handler
from .errors import SnapshotError

#: Pages per chunk: the unit of checking and of lazy prefetch (256 KiB).
CHUNK_PAGES = 64
CHUNK_BYTES = CHUNK_PAGES * PAGE_SIZE

#: One index record: first logical page (u64), page count (u32), CRC-32 of the pages (u32).
EXTENT = struct.Struct("<QII")

# Scanned at once for zero pages: big enough for numpy to run at memory speed, small enough
# that the page flags stay a small array.
SCAN_BYTES = 16 << 20

SEEK_DATA, SEEK_HOLE = 3, 4

#: Threads that copy and checksum extents. pread/pwrite and zlib.crc32 release the GIL, so two
#: overlap the copy of one extent with the checksum of another: measured on 64 MiB, an eager
#: load took 37-45 ms with two threads against 50-54 ms in one (a bare read took 36-38 ms).
IO_THREADS = 2


@dataclass(frozen=True)
class Extent:
    page: int  # first logical page
    pages: int
    crc: int

    @property
    def offset(self) -> int:
        return self.page * PAGE_SIZE

    @property
    def size(self) -> int:
        return self.pages * PAGE_SIZE


def logical_layout(memory: GuestMemory) -> list[tuple[MemoryRegion, int]]:
    """Each RAM region with its logical offset (its place in the memory file)."""
    out, offset = [], 0
    for r in memory.regions:
        out.append((r, offset))
        offset += r.size
    return out


def data_ranges(region: MemoryRegion) -> Iterator[tuple[int, int]]:
    """(offset, length) within `region` of the pages its backing file holds; holes are pages
    never touched. Falls back to the whole region where SEEK_DATA is unsupported."""
    if region.anonymous:
        yield from _mapped_ranges(region)
        return
    start, end = region.fd_offset, region.fd_offset + region.size
    pos = start
    while pos < end:
        try:
            data = os.lseek(region.fd, pos, SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                return
            if e.errno == errno.EINVAL:  # the file system cannot tell
                yield pos - start, end - pos
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(region.fd, data, SEEK_HOLE), end)
        yield data - start, hole - data
        pos = hole


#: /proc/self/pagemap: one u64 per virtual page; bit 63 present, bit 62 swapped out.
_PAGEMAP_IN_USE = (1 << 63) | (1 << 62)
#: Pagemap entries read at once (8 bytes each: 4096 entries cover 16 MiB of guest RAM).
_PAGEMAP_BATCH = 4096


def _mapped_ranges(region: MemoryRegion) -> Iterator[tuple[int, int]]:
    """For anonymous memory (no file to ask SEEK_DATA): the pages mapped or swapped out, from
    /proc/self/pagemap. A page never touched has neither bit; one the guest only read maps the
    shared zero page and is dropped later by the zero-page scan."""
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        yield 0, region.size  # no pagemap (not Linux, or restricted): scan everything
        return
    try:
        pages = region.size // PAGE_SIZE
        first = region.hva // PAGE_SIZE
        run_start: int | None = None
        run_end = 0
        for batch in range(0, pages, _PAGEMAP_BATCH):
            n = min(_PAGEMAP_BATCH, pages - batch)
            raw = os.pread(fd, n * 8, (first + batch) * 8)
            used = (np.frombuffer(raw, dtype=np.uint64) & np.uint64(_PAGEMAP_IN_USE)) != 0
            edges = np.flatnonzero(
                np.diff(np.concatenate(([False], used, [False])).astype(np.int8))
            )
            for a, b in zip(edges[::2], edges[1::2], strict=True):
                a, b = batch + int(a), batch + int(b)
                if run_start is not None and run_end == a:
                    run_end = b
                    continue
                if run_start is not None:
                    yield run_start * PAGE_SIZE, (run_end - run_start) * PAGE_SIZE
                run_start, run_end = a, b
        if run_start is not None:
            yield run_start * PAGE_SIZE, (run_end - run_start) * PAGE_SIZE
    finally:
        os.close(fd)


def nonzero_runs(view: memoryview) -> Iterator[tuple[int, int]]:
    """(first page, page count) of the runs of non-zero pages in a page-aligned buffer."""
    pages = np.frombuffer(view, dtype=np.uint64).reshape(-1, PAGE_SIZE // 8).any(axis=1)
    if not pages.any():
        return
    # Run boundaries: where the flag changes (pad with False on both sides).
    edges = np.flatnonzero(np.diff(np.concatenate(([False], pages, [False])).astype(np.int8)))
    for start, stop in zip(edges[::2], edges[1::2], strict=True):
        yield int(start), int(stop - start)


def split_by_chunk(page: int, count: int) -> Iterator[tuple[int, int]]:
    """Split the run [page, page+count) at chunk boundaries."""
    while count:
        n = min(count, CHUNK_PAGES - page % CHUNK_PAGES)
        yield page, n
        page += n
        count -= n


def written_runs(memory: GuestMemory) -> Iterator[tuple[int, memoryview]]:
    """(first logical page, view) of every run of non-zero pages of guest RAM, each within one
    chunk. The views alias guest memory: use them while the vCPU is paused."""
    for region, base in logical_layout(memory):
        for off, length in data_ranges(region):
            for pos in range(off, off + length, SCAN_BYTES):
                n = min(SCAN_BYTES, off + length - pos)
                window = region.view[pos : pos + n]
                first = (base + pos) // PAGE_SIZE
                for p, count in nonzero_runs(window):
                    for page, k in split_by_chunk(first + p, count):
                        rel = (page - first) * PAGE_SIZE
                        yield page, window[rel : rel + k * PAGE_SIZE]


def write_memory(memory: GuestMemory, fd: int) -> tuple[list[Extent], int]:
    """Write guest RAM's non-zero pages into the sparse file `fd`; returns the extents and the
    pages written. The file is sized to all of RAM, holes included."""

    def store(page: int, view: memoryview) -> Extent:
        _pwrite_all(fd, view, page * PAGE_SIZE)
        return Extent(page, len(view) // PAGE_SIZE, zlib.crc32(view))

    with ThreadPoolExecutor(IO_THREADS) as pool:
        extents = list(pool.map(lambda run: store(*run), written_runs(memory)))
    os.ftruncate(fd, memory.size)
    return extents, sum(e.pages for e in extents)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def pack_index(extents: list[Extent]) -> bytes:
    return b"".join(EXTENT.pack(e.page, e.pages, e.crc) for e in extents)


def unpack_index(data: bytes, total_pages: int) -> list[Extent]:
    """Parse and check an index: records in order, inside RAM, within one chunk each."""
    if len(data) % EXTENT.size:
        raise SnapshotError("the memory index is truncated")
    extents = []
    end = 0
    for page, pages, crc in EXTENT.iter_unpack(data):
        if (
            pages == 0
            or page < end
            or page + pages > total_pages
            or page // CHUNK_PAGES != (page + pages - 1) // CHUNK_PAGES
        ):
            raise SnapshotError("the memory index is malformed")
        extents.append(Extent(page, pages, crc))
        end = page + pages
    return extents


def locate(memory: GuestMemory, page: int, pages: int) -> memoryview:
    """The guest memory view of logical pages [page, page+pages) (within one region)."""
    offset = page * PAGE_SIZE
    for region, base in logical_layout(memory):
        if base <= offset < base + region.size:
            rel = offset - base
            if rel + pages * PAGE_SIZE > region.size:
                break
            return region.view[rel : rel + pages * PAGE_SIZE]
    raise SnapshotError(f"memory extent at logical page {page} is outside guest RAM")


def read_memory(memory: GuestMemory, fd: int, extents: list[Extent]) -> int:
    """Eager restore: read every extent into guest RAM, checking each CRC. Returns pages read."""

    def load(e: Extent) -> int:
        view = locate(memory, e.page, e.pages)
        got = os.preadv(fd, [view], e.offset)
        if got != e.size:
            raise SnapshotError(handler.truncated(e.page + got // PAGE_SIZE))
        if zlib.crc32(view) != e.crc:
            raise SnapshotError(handler.corrupted(e.page, e.page + e.pages - 1))
        return e.pages

    # A hole the index does not list must read as zero: a damaged one would otherwise go
    # unnoticed (the restored guest would get zeros, not what the file holds).
    scratch = memoryview(bytearray(CHUNK_BYTES))
    bad = handler.unlisted_data(fd, [(e.page, e.pages) for e in extents], memory.size, scratch)
    if bad is not None:
        raise SnapshotError(handler.corrupted(*bad, "hold data its index does not list"))
    with ThreadPoolExecutor(IO_THREADS) as pool:
        return sum(pool.map(load, extents))
