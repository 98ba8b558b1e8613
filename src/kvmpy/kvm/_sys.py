"""The few libc calls the KVM layer needs beyond `fcntl.ioctl` and `os`.

`fcntl.ioctl` copies an immutable argument through a 1024-byte buffer and cannot pass an unsigned
long above 2**31, so mutable ctypes buffers go to it directly and large integers go through libc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import fcntl
import os

from ..errors import KvmError

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
]  # fmt: skip
libc.munmap.restype = ctypes.c_int
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.restype = ctypes.c_int
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.fallocate.restype = ctypes.c_int
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
libc.ioctl.restype = ctypes.c_int
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]

PROT_NONE, PROT_READ, PROT_WRITE = 0x0, 0x1, 0x2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_NORESERVE = 0x01, 0x02, 0x10, 0x20, 0x4000
MAP_FAILED = ctypes.c_void_p(-1).value
MADV_DONTNEED, MADV_REMOVE, MADV_MERGEABLE, MADV_UNMERGEABLE, MADV_HUGEPAGE = 4, 9, 12, 13, 14
MADV_POPULATE_WRITE = 23


def ioctl(fd: int, request: int, arg=0, name: str = "ioctl") -> int:
    """ioctl with a ctypes buffer (modified in place) or a small integer; returns the result."""
    try:
        if isinstance(arg, int):
            if arg == 0:
                return fcntl.ioctl(fd, request)  # skips fcntl's failing buffer parses
            if 0 < arg < 2**31:
                return fcntl.ioctl(fd, request, arg)
            return ioctl_ulong(fd, request, arg, name)
        return fcntl.ioctl(fd, request, arg, True)
    except OSError as e:
        raise KvmError(name, e) from None


def ioctl_ulong(fd: int, request: int, arg: int, name: str = "ioctl") -> int:
    ret = libc.ioctl(fd, request, arg & 0xFFFFFFFFFFFFFFFF)
    if ret < 0:
        err = ctypes.get_errno()
        raise KvmError(name, OSError(err, os.strerror(err)))
    return ret


def mmap(length: int, prot: int, flags: int, fd: int = -1, offset: int = 0, addr: int = 0) -> int:
    ptr = libc.mmap(addr or None, length, prot, flags, fd, offset)
    if ptr is None or ptr == MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {length} bytes failed: {os.strerror(err)}")
    return ptr


def munmap(addr: int, length: int) -> None:
    if libc.munmap(addr, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def madvise(addr: int, length: int, advice: int) -> None:
    if libc.madvise(addr, length, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise({advice}) failed: {os.strerror(err)}")


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free [offset, offset+length) of a file (shmem: its pages go back to the host)."""
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE) failed: {os.strerror(err)}")


def view(addr: int, length: int) -> memoryview:
    """A writable byte view over raw memory. The caller keeps the mapping alive longer."""
    return memoryview((ctypes.c_char * length).from_address(addr)).cast("B")


EINTR = _errno.EINTR
EAGAIN = _errno.EAGAIN
