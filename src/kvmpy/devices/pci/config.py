"""PCI configuration space of one function (type 0 header), with capabilities, BARs and
MSI-X.

Every access is checked: offsets inside the 4 KiB (ECAM) space, sizes of 1, 2 or 4 bytes,
naturally aligned; anything else reads as all ones and writes nothing, as an absent register
does on real hardware. Writes go through a per-byte write mask, so read-only fields (IDs,
class, capability pointers, the capability structures' fixed parts) cannot be changed;
devices hook the few writes that mean something (BARs, the command register, their
capabilities).

BARs are 32-bit memory BARs (the MMIO hole is below 4 GiB): sizing works by writing all ones
and reading back the size mask (PCI 3.0, 6.2.5.1); a moved BAR is reported to the owner
through `on_bar_moved`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

CONFIG_SIZE = 4096
HEADER_SIZE = 0x40

VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION = 0x08
CLASS_PROG = 0x09
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYS_VENDOR = 0x2C
SUBSYS_ID = 0x2E
CAP_PTR = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

CMD_IO = 1 << 0
CMD_MEMORY = 1 << 1
CMD_BUS_MASTER = 1 << 2
CMD_INTX_DISABLE = 1 << 10
STATUS_CAP_LIST = 1 << 4
STATUS_INTERRUPT = 1 << 3

CAP_ID_VENDOR = 0x09
CAP_ID_MSIX = 0x11


def valid_access(offset: int, size: int, limit: int = CONFIG_SIZE) -> bool:
    return size in (1, 2, 4) and offset % size == 0 and offset >= 0 and offset + size <= limit


class ConfigSpace:
    def __init__(self, vendor: int, device: int, class_code: int, revision: int = 1,
                 subsys_vendor: int = 0, subsys_id: int = 0, header_type: int = 0):  # fmt: skip
        self.data = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        struct.pack_into("<HH", self.data, VENDOR_ID, vendor, device)
        self.data[REVISION] = revision
        self.data[CLASS_PROG : CLASS_PROG + 3] = class_code.to_bytes(3, "little")
        self.data[HEADER_TYPE] = header_type
        struct.pack_into("<HH", self.data, SUBSYS_VENDOR, subsys_vendor, subsys_id)
        self._mask(COMMAND, CMD_IO | CMD_MEMORY | CMD_BUS_MASTER | CMD_INTX_DISABLE, 2)
        self.wmask[INTERRUPT_LINE] = 0xFF
        self.bars: list[int] = [0] * 6  # sizes (0: not implemented)
        self._cap_end = HEADER_SIZE
        self._last_cap = None
        #: offset range -> handler(offset) called after a write into it
        self._hooks: list[tuple[int, int, Callable[[int, int], None]]] = []
        self.on_bar_moved: Callable[[int, int], None] | None = None
        self.on_command: Callable[[int], None] | None = None

    def _mask(self, offset: int, mask: int, size: int) -> None:
        self.wmask[offset : offset + size] = mask.to_bytes(size, "little")

    def u8(self, off: int) -> int:
        return self.data[off]

    def u16(self, off: int) -> int:
        return struct.unpack_from("<H", self.data, off)[0]

    def u32(self, off: int) -> int:
        return struct.unpack_from("<I", self.data, off)[0]

    @property
    def command(self) -> int:
        return self.u16(COMMAND)

    def set_interrupt_pin(self, pin: int, line: int) -> None:
        self.data[INTERRUPT_PIN] = pin
        self.data[INTERRUPT_LINE] = line

    # --- BARs ----------------------------------------------------------------------------

    def add_bar(self, index: int, size: int, address: int = 0) -> None:
        """A 32-bit non-prefetchable memory BAR of `size` (a power of two >= 4 KiB)."""
        assert 0 <= index < 6 and size >= 0x1000 and size & (size - 1) == 0
        self.bars[index] = size
        off = BAR0 + 4 * index
        struct.pack_into("<I", self.data, off, address & ~(size - 1) & 0xFFFF_FFF0)
        self._mask(off, ~(size - 1) & 0xFFFF_FFF0, 4)

    def bar_address(self, index: int) -> int:
        return self.u32(BAR0 + 4 * index) & 0xFFFF_FFF0

    # --- capabilities --------------------------------------------------------------------

    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None,
                       on_write: Callable[[int, int], None] | None = None) -> int:  # fmt: skip
        """Append a capability (`body` after the ID and next bytes); returns its offset.
        `writable` is the write mask of the body; `on_write(offset_in_cap, size)` runs after
        a write into it."""
        off = (self._cap_end + 3) & ~3
        length = 2 + len(body)
        assert off + length <= 0x100
        self.data[off] = cap_id
        self.data[off + 1] = 0
        self.data[off + 2 : off + length] = body
        if writable is not None:
            self.wmask[off + 2 : off + length] = writable
        if self._last_cap is None:
            self.data[CAP_PTR] = off
            struct.pack_into("<H", self.data, STATUS, self.u16(STATUS) | STATUS_CAP_LIST)
        else:
            self.data[self._last_cap + 1] = off
        self._last_cap = off
        self._cap_end = off + length
        if on_write is not None:
            self._hooks.append((off, off + length, on_write))
        return off

    # --- access --------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if not valid_access(offset, size):
            return b"\xff" * max(0, min(size, 8))
        return bytes(self.data[offset : offset + size])

    def write(self, offset: int, data: bytes) -> None:
        size = len(data)
        if not valid_access(offset, size):
            return
        old_cmd = self.command
        old_bars = [self.bar_address(i) for i in range(6)]
        for i, b in enumerate(data):
            o = offset + i
            m = self.wmask[o]
            self.data[o] = (self.data[o] & ~m) | (b & m)
        if offset < BAR0 + 24 and offset + size > BAR0:
            for i in range(6):
                if self.bars[i] and self.bar_address(i) != old_bars[i] and self.on_bar_moved:
                    self.on_bar_moved(i, self.bar_address(i))
        touched_cmd = offset <= COMMAND + 1 and offset + size > COMMAND
        if touched_cmd and self.command != old_cmd and self.on_command is not None:
            self.on_command(old_cmd)
        for lo, hi, hook in self._hooks:
            if offset < hi and lo < offset + size:
                hook(offset - lo, size)
