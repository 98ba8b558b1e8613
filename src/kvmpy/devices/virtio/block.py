"""virtio-blk (VIRTIO 1.2, 5.2) over a raw image file.

A request is a chain: a 16-byte header (type, reserved, sector) in device-readable memory,
then data (device-readable for writes, device-writable for reads), then one device-writable
status byte. Data moves between the file and guest RAM with preadv/pwritev on zero-copy views
of the guest's buffers: no copy in Python, no allocation per byte.

Every request is checked before the host file is touched: the chain's shape, the sector range
(inside the disk), the size (at most `MAX_REQUEST` bytes, advertised through seg_max and
size_max), and the disk's mode (a read-only disk answers writes, discards and write-zeroes with
IOERR, as QEMU does). A host I/O error (EIO, ENOSPC, a short read) is the guest's
VIRTIO_BLK_S_IOERR, never an exception in the VMM. A chain without room for the status byte is
a protocol error (DEVICE_NEEDS_RESET): there is no way to answer it.

Discard and write-zeroes are offered for regular files, done with fallocate (punch a hole,
zero a range); a filesystem that lacks them answers discard with UNSUPP and write-zeroes by
writing zeros in bounded chunks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
import struct

from ...errors import ConfigError
from .constants import ID_BLOCK
from .device import VirtioDevice
from .queue import Chain, QueueError, Virtqueue

SECTOR = 512
QUEUE_SIZE = 256
#: Largest data transfer of one request; with seg_max segments of at most size_max bytes.
MAX_REQUEST = 1 << 20
SEG_MAX = 128
SIZE_MAX = MAX_REQUEST
MAX_DISCARD_SECTORS = (1 << 30) // SECTOR
MAX_DISCARD_SEG = 32
ID_BYTES = 20

# 5.2.3 feature bits
F_SIZE_MAX = 1 << 1
F_SEG_MAX = 1 << 2
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9
F_DISCARD = 1 << 13
F_WRITE_ZEROES = 1 << 14

# 5.2.6 request types and status
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

_HEADER = struct.Struct("<IIQ")
_SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags (bit 0: unmap)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class VirtioBlock(VirtioDevice):
    device_id = ID_BLOCK

    def __init__(self, path: str, name: str = "vda", readonly: bool = False, serial: str = ""):
        super().__init__(name, [QUEUE_SIZE])
        self.path = str(path)
        self.readonly = readonly
        try:
            self.fd = os.open(self.path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"cannot open disk image {self.path}: {e.strerror}") from None
        st = os.fstat(self.fd)
        if stat.S_ISREG(st.st_mode):
            size = st.st_size
            self.regular = True
        elif stat.S_ISBLK(st.st_mode):
            size = os.lseek(self.fd, 0, os.SEEK_END)
            self.regular = False
        else:
            os.close(self.fd)
            raise ConfigError(f"disk image {self.path} is not a regular file or block device")
        self.capacity = size // SECTOR
        if serial.encode()[:ID_BYTES] != serial.encode() or not serial.isprintable():
            os.close(self.fd)
            raise ConfigError(f"disk id {serial!r} must be at most {ID_BYTES} printable bytes")
        self.serial = serial or name
        features = F_SEG_MAX | F_SIZE_MAX | F_BLK_SIZE | F_FLUSH
        if readonly:
            features |= F_RO
        elif self.regular:
            features |= F_DISCARD | F_WRITE_ZEROES
        self.device_features |= features
        self.reads = self.writes = self.flushes = self.discards = 0
        self.bytes_read = self.bytes_written = 0
        self.io_errors = 0

    def config_bytes(self) -> bytes:
        # struct virtio_blk_config (5.2.4), up to write_zeroes_may_unmap
        return struct.pack(
            "<QIIHBBIBBHIBBHIIIIIB3x",
            self.capacity,
            SIZE_MAX,
            SEG_MAX,
            0, 0, 0,  # geometry
            SECTOR,  # blk_size
            0, 0, 0, 0,  # topology
            0, 0, 1,  # writeback, unused, num_queues
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEG,
            1,  # discard_sector_alignment
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEG,
            1,  # write_zeroes_may_unmap
        )  # fmt: skip

    def handle(self, q: Virtqueue) -> None:
        pushed = False
        while True:
            chain = self.next_chain(q)
            if chain is None:
                break
            written = self._request(chain)
            self.requests += 1
            q.push(chain, written)
            pushed = True
        if pushed:
            self.signal_used(q)

    def _request(self, chain: Chain) -> int:
        """Serve one request; returns the bytes written into the chain (data + status)."""
        wlen = chain.writable_len
        if wlen < 1:
            raise QueueError(f"{self.name}: request without a status byte")
        if chain.readable_len < _HEADER.size:
            raise QueueError(f"{self.name}: request header shorter than 16 bytes")
        rtype, _, sector = _HEADER.unpack(chain.read(_HEADER.size))
        status_iov = chain.writable_iov(wlen - 1, 1)
        data_in = wlen - 1  # device-writable data bytes before the status
        data_out = chain.readable_len - _HEADER.size
        done = 0
        try:
            if rtype == T_IN:
                status, done = self._read(chain, sector, data_in)
            elif rtype == T_OUT:
                status = self._write(chain, sector, data_out)
            elif rtype == T_FLUSH:
                status = self._flush()
            elif rtype == T_GET_ID:
                ident = self.serial.encode()[:ID_BYTES].ljust(ID_BYTES, b"\0")
                done = chain.write(ident[: min(ID_BYTES, data_in)])
                status = S_OK
            elif rtype in (T_DISCARD, T_WRITE_ZEROES):
                status = self._discard(chain, data_out, rtype == T_WRITE_ZEROES)
            else:
                status = S_UNSUPP
        except OSError:  # any host error (EIO, ENOSPC, ...) is the guest's IOERR
            self.io_errors += 1
            status = S_IOERR
            done = 0
        status_iov[0][0] = status
        return done + 1

    def _range_ok(self, sector: int, nbytes: int) -> bool:
        return nbytes % SECTOR == 0 and sector + nbytes // SECTOR <= self.capacity

    def _read(self, chain: Chain, sector: int, n: int) -> tuple[int, int]:
        if n > MAX_REQUEST or not self._range_ok(sector, n):
            return S_IOERR, 0
        iov = chain.writable_iov(0, n)
        got = os.preadv(self.fd, iov, sector * SECTOR) if iov else 0
        if got != n:
            self.io_errors += 1
            return S_IOERR, 0
        self.reads += 1
        self.bytes_read += n
        return S_OK, n

    def _write(self, chain: Chain, sector: int, n: int) -> int:
        if self.readonly or n > MAX_REQUEST or not self._range_ok(sector, n):
            return S_IOERR
        iov = chain.readable_iov(_HEADER.size, n)
        put = os.pwritev(self.fd, iov, sector * SECTOR) if iov else 0
        if put != n:
            self.io_errors += 1
            return S_IOERR
        self.writes += 1
        self.bytes_written += n
        return S_OK

    def _flush(self) -> int:
        if not self.readonly:
            os.fdatasync(self.fd)
        self.flushes += 1
        return S_OK

    def _discard(self, chain: Chain, n: int, zeroes: bool) -> int:
        if self.readonly:
            return S_IOERR
        feature = F_WRITE_ZEROES if zeroes else F_DISCARD
        if not self.has(feature):
            return S_UNSUPP
        if n == 0 or n % _SEGMENT.size or n // _SEGMENT.size > MAX_DISCARD_SEG:
            return S_IOERR
        raw = chain.read(n, _HEADER.size)
        segments = [_SEGMENT.unpack_from(raw, i) for i in range(0, n, _SEGMENT.size)]
        for sector, count, flags in segments:
            if count > MAX_DISCARD_SECTORS or flags & ~1 or (not zeroes and flags):
                return S_UNSUPP if flags & ~1 else S_IOERR
            if not self._range_ok(sector, count * SECTOR):
                return S_IOERR
        for sector, count, flags in segments:
            off, length = sector * SECTOR, count * SECTOR
            if zeroes:
                self._zero(off, length, bool(flags & 1))
            else:
                try:
                    fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length)
                except OSError as e:
                    if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                        return S_UNSUPP
                    raise
        self.discards += 1
        return S_OK

    def _zero(self, off: int, length: int, unmap: bool) -> None:
        modes = [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
        if unmap:
            modes.insert(0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                fallocate(self.fd, mode, off, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
        zeros = bytes(min(length, 1 << 20))
        while length:
            k = min(length, len(zeros))
            if os.pwrite(self.fd, zeros[:k], off) != k:
                raise OSError(errno.EIO, "short write")
            off += k
            length -= k

    def close(self) -> None:
        super().close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def stats(self) -> dict:
        return {
            **super().stats(),
            "path": self.path,
            "readonly": self.readonly,
            "reads": self.reads,
            "writes": self.writes,
            "flushes": self.flushes,
            "discards": self.discards,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "io_errors": self.io_errors,
        }
