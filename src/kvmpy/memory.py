"""Guest RAM: memfd-backed regions mapped into the VMM and registered as KVM memslots.

memfd (rather than anonymous memory) is the backing so that a region can be handed to another
process (inter-VM shared memory), written to a snapshot file page by page, or served lazily by
userfaultfd, all without copying. Every access from the VMM is bounds-checked: a guest-supplied
address that is not RAM raises `GuestMemoryError`, which hypercalls turn into -EFAULT.

The exception is *mergeable* RAM (`MachineConfig(mergeable=True)`, `kvmpy run --mergeable`):
the kernel's same-page merging (KSM) only merges private anonymous pages and silently ignores
MADV_MERGEABLE on a shared memfd mapping (tried here: 0 pages merged), so such a region is a
private anonymous mapping with no file behind it (`MemoryRegion.fd == -1`). It cannot be
shared with another process; everything else (snapshots, lazy restore, migration) works on it.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import logging
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import ConfigError, GuestMemoryError
from .kvm import _sys

if TYPE_CHECKING:
    from .hv.base import VmBackend

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
# Guest-physical addresses are limited by the CPU's MAXPHYADDR; 46 bits is safe on every x86-64
# host KVM runs on, and keeps a typo like --mem 1P from reaching mmap.
MAX_GPA = 1 << 46

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def parse_size(text: str | int) -> int:
    """'64M', '1G', '4096', '2MiB' -> bytes."""
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"size must not be negative: {text}")
        return text
    s = text.strip().upper()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    mult = 1
    try:
        value = int(s, 0)  # a bare number first: in '0x1B' the B is a hex digit, not bytes
    except ValueError:
        s = s.removesuffix("B").removesuffix("I")
        if s and s[-1] in units:
            mult = units[s[-1]]
            s = s[:-1]
        try:
            value = int(s, 0)
        except ValueError:
            raise ConfigError(
                f"not a size: {text!r} (use a whole number of bytes, decimal or 0x/0o/0b, "
                "with an optional suffix K, M, G or T for KiB, MiB, GiB or TiB, which may be "
                "followed by i, B or iB, in any case; a bare B means bytes: 4096, 64M, 2GiB, 1t)"
            ) from None
    if value < 0:
        raise ConfigError(f"size must not be negative: {text!r}")
    return value * mult


def format_size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _check_backing(fd: int, offset: int, size: int, name: str) -> None:
    """A file mapped past its end maps fine, but touching those pages raises SIGBUS and kills
    the VMM; refuse a caller's file that is shorter than the region up front."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise ConfigError(f"memory region {name!r}: fd {fd} is not usable: {e.strerror}") from None
    if stat.S_ISREG(st.st_mode) and st.st_size < offset + size:
        raise ConfigError(
            f"memory region {name!r} needs {offset + size:#x} bytes of its file (offset "
            f"{offset:#x} + size {size:#x}) but the file has only {st.st_size:#x}"
        )


@dataclass(eq=False)
class MemoryRegion:
    """One contiguous range of guest-physical memory backed by (part of) a memfd."""

    gpa: int
    size: int
    #: The backing memfd, or -1 for a private anonymous region (mergeable RAM).
    fd: int
    hva: int
    name: str
    fd_offset: int = 0
    readonly: bool = False
    owns_fd: bool = True
    slot: int | None = None
    flags: int = 0
    view: memoryview = field(init=False, repr=False)

    #: MADV_MERGEABLE: offered to KSM.
    mergeable: bool = False

    def __post_init__(self) -> None:
        self.view = _sys.view(self.hva, self.size)

    @property
    def anonymous(self) -> bool:
        """Private anonymous memory, no file behind it (only such memory can be merged)."""
        return self.fd < 0

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.end


class GuestMemory:
    """All guest RAM of one VM. Regions never overlap; lookups are by bisection."""

    def __init__(self) -> None:
        self.regions: list[MemoryRegion] = []
        self._starts: list[int] = []
        self._vm: VmBackend | None = None
        #: Called as on_write(gpa, length) after each write through `write`, `fill` and
        #: `write_u*` (not through a `view`). KVM's dirty log sees only the guest's own writes,
        #: so a live migration learns of the VMM's writes (hypercall results) here.
        self.on_write: Callable[[int, int], None] | None = None

    # --- layout --------------------------------------------------------------------------------

    def add_region(
        self,
        gpa: int,
        size: int,
        *,
        name: str = "ram",
        fd: int | None = None,
        fd_offset: int = 0,
        readonly: bool = False,
        anonymous: bool = False,
    ) -> MemoryRegion:
        """Map `size` bytes at `gpa`: a new memfd, `fd` (e.g. received from another VMM), or,
        with `anonymous`, private anonymous memory (what KSM can merge; see the module doc)."""
        if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
            raise ConfigError(
                f"memory region {name!r} must be a positive multiple of 4 KiB at a 4 KiB-aligned "
                f"address (got {size:#x} bytes at {gpa:#x})"
            )
        if gpa < 0:
            raise ConfigError(
                f"memory region {name!r} cannot start at a negative address ({gpa:#x})"
            )
        if gpa + size > MAX_GPA:
            raise ConfigError(f"memory region {name!r} ends above the 2^46 guest-physical limit")
        for r in self.regions:
            if gpa < r.end and r.gpa < gpa + size:
                raise ConfigError(
                    f"memory region {name!r} [{gpa:#x}, {gpa + size:#x}) overlaps {r.name!r} "
                    f"[{r.gpa:#x}, {r.end:#x})"
                )
        if anonymous and fd is not None:
            raise ConfigError(f"memory region {name!r} cannot be both anonymous and a file's")
        owns = fd is None and not anonymous
        if anonymous:
            fd, fd_offset = -1, 0
        elif fd is None:
            fd = os.memfd_create(f"kvmpy-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                os.ftruncate(fd, size)
                # Sealed against shrinking: whoever else gets this fd (another VMM process
                # sharing the region) cannot truncate it under our mapping and SIGBUS us.
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            except OSError:
                os.close(fd)
                raise
        else:
            _check_backing(fd, fd_offset, size, name)
        prot = _sys.PROT_READ | _sys.PROT_WRITE
        if anonymous:
            flags = _sys.MAP_PRIVATE | _sys.MAP_ANONYMOUS | _sys.MAP_NORESERVE
        else:
            flags = _sys.MAP_SHARED | _sys.MAP_NORESERVE
        try:
            hva = _sys.mmap(size, prot, flags, fd, fd_offset)
        except OSError as e:
            if owns:
                os.close(fd)
            raise ConfigError(f"cannot map {size} bytes of guest memory: {e.strerror}") from None
        region = MemoryRegion(
            gpa=gpa, size=size, fd=fd, hva=hva, name=name, fd_offset=fd_offset,
            readonly=readonly, owns_fd=owns,
        )  # fmt: skip
        i = bisect.bisect(self._starts, gpa)
        self.regions.insert(i, region)
        self._starts.insert(i, gpa)
        if self._vm is not None:
            self._register(region)
        return region

    def set_mergeable(self, region: MemoryRegion) -> None:
        """Offer `region` to KSM (MADV_MERGEABLE). Only an anonymous region can be merged; a
        kernel without KSM is refused in one sentence."""
        if not region.anonymous:
            raise ConfigError(
                f"memory region {region.name!r} is a shared file mapping, which KSM cannot merge"
            )
        try:
            _sys.madvise(region.hva, region.size, _sys.MADV_MERGEABLE)
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise ConfigError(
                    "mergeable guest memory needs a kernel with same-page merging (CONFIG_KSM); "
                    "this one refuses MADV_MERGEABLE"
                ) from None
            raise ConfigError(f"cannot make guest memory mergeable: {e.strerror}") from None
        region.mergeable = True

    @property
    def mergeable(self) -> bool:
        return any(r.mergeable for r in self.regions)

    def attach(self, vm: VmBackend) -> None:
        """Map every region (and every later one) into the backend VM `vm` (KVM: memslots)."""
        self._vm = vm
        for region in self.regions:
            if region.slot is None:
                vm.map_memory(region)

    def _register(self, region: MemoryRegion) -> None:
        assert self._vm is not None
        self._vm.map_memory(region)

    def set_dirty_logging(self, region: MemoryRegion, enabled: bool) -> None:
        assert self._vm is not None
        self._vm.set_dirty_logging(region, enabled)

    def close(self) -> None:
        for region in self.regions:
            region.view.release()
            _sys.munmap(region.hva, region.size)
            if region.owns_fd:
                os.close(region.fd)
        self.regions.clear()
        self._starts.clear()

    def __iter__(self) -> Iterator[MemoryRegion]:
        return iter(self.regions)

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    # --- lookups -------------------------------------------------------------------------------

    def region_at(self, gpa: int, length: int = 1) -> MemoryRegion:
        """The region holding all of [gpa, gpa+length), or GuestMemoryError."""
        i = bisect.bisect(self._starts, gpa) - 1
        if i >= 0 and length >= 0:
            r = self.regions[i]
            if r.contains(gpa, length):
                return r
        raise GuestMemoryError(f"guest-physical range [{gpa:#x}, +{length:#x}) is not RAM")

    def is_ram(self, gpa: int, length: int = 1) -> bool:
        try:
            self.region_at(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def gpa_to_hva(self, gpa: int) -> int:
        r = self.region_at(gpa)
        return r.hva + (gpa - r.gpa)

    def hva_to_gpa(self, hva: int) -> int:
        for r in self.regions:
            if r.hva <= hva < r.hva + r.size:
                return r.gpa + (hva - r.hva)
        raise GuestMemoryError(f"host address {hva:#x} is not guest RAM")

    # --- giving memory back ---------------------------------------------------------------------

    def discard(self, gpa: int, length: int) -> bool:
        """Give whole pages of this machine's own RAM back to the host (a balloon, free page
        reporting): MADV_DONTNEED on anonymous memory, a punched hole in a memfd. The guest
        reads zeros there afterwards. Does nothing and returns False for a range that is not
        page-aligned, not inside one region, or in a region that is not this machine's own
        (a file or memory shared with another process, read-only memory): a guest-supplied
        range can never make the VMM release memory outside its RAM."""
        if length <= 0 or gpa % PAGE_SIZE or length % PAGE_SIZE:
            return False
        try:
            r = self.region_at(gpa, length)
        except GuestMemoryError:
            return False
        if r.readonly or not (r.anonymous or r.owns_fd):
            return False
        off = gpa - r.gpa
        try:
            if r.anonymous:
                _sys.madvise(r.hva + off, length, _sys.MADV_DONTNEED)
            else:
                _sys.punch_hole(r.fd, r.fd_offset + off, length)
        except OSError as e:
            log.debug("discarding %#x+%#x failed: %s", gpa, length, e)
            return False
        if self.on_write is not None:  # a live migration must resend them (as zero pages)
            self.on_write(gpa, length)
        return True

    # --- access --------------------------------------------------------------------------------

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy view of [gpa, gpa+length); the range must lie in one region."""
        r = self.region_at(gpa, length)
        off = gpa - r.gpa
        return r.view[off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data
        if self.on_write is not None:
            self.on_write(gpa, len(data))

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        v = self.view(gpa, length)
        if byte == 0:
            v[:] = bytes(length)
        else:
            v[:] = bytes([byte]) * length
        if self.on_write is not None:
            self.on_write(gpa, length)

    def read_u8(self, gpa: int) -> int:
        return self.view(gpa, 1)[0]

    def read_u16(self, gpa: int) -> int:
        return _U16.unpack_from(self.view(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return _U32.unpack_from(self.view(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return _U64.unpack_from(self.view(gpa, 8))[0]

    def write_u16(self, gpa: int, value: int) -> None:
        _U16.pack_into(self.view(gpa, 2), 0, value)
        if self.on_write is not None:
            self.on_write(gpa, 2)

    def write_u32(self, gpa: int, value: int) -> None:
        _U32.pack_into(self.view(gpa, 4), 0, value)
        if self.on_write is not None:
            self.on_write(gpa, 4)

    def write_u64(self, gpa: int, value: int) -> None:
        _U64.pack_into(self.view(gpa, 8), 0, value)
        if self.on_write is not None:
            self.on_write(gpa, 8)
