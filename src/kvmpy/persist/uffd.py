"""userfaultfd(2) through ctypes: Python has no binding, and lazy restore needs only a few calls.

A range registered in MISSING mode makes every first access to one of its pages, by a thread
of this process or by KVM on its behalf (the instruction emulator, get_user_pages for shadow
paging), wait until whoever holds the userfaultfd supplies the page (UFFDIO_COPY) or a zero page
(UFFDIO_ZEROPAGE). memfd (shmem) mappings, which kvmpy's guest RAM is, support both since
Linux 4.11 (UFFD_FEATURE_MISSING_SHMEM); `Userfaultfd.open` checks the feature.

Faults in kernel mode (KVM's) can only be handled by a userfaultfd opened without
UFFD_USER_MODE_ONLY, which needs root, CAP_SYS_PTRACE, vm.unprivileged_userfaultfd=1, or
access to /dev/userfaultfd; the error says which.
"""

from __future__ import annotations

import ctypes as C
import errno
import os

from .errors import LazyRestoreUnavailable

# The C library from the process's own namespace, not kvmpy.kvm's handle: the page-fault
# handler process imports this module and must start fast (kvmpy.kvm takes ~80 ms to import).
libc = C.CDLL(None, use_errno=True)
libc.syscall.restype = C.c_long
libc.ioctl.restype = C.c_int
libc.ioctl.argtypes = [C.c_int, C.c_ulong, C.c_ulong]

SYS_userfaultfd = 323  # x86-64
O_CLOEXEC = 0o2000000
O_NONBLOCK = 0o4000

UFFD_API = 0xAA
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0
UFFD_EVENT_PAGEFAULT = 0x12
#: sizeof(struct uffd_msg)
MSG_SIZE = 32
# _IOC(dir, 0xAA, nr, size) from <linux/userfaultfd.h>
_IOR, _IOW = 2, 1


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (0xAA << 8) | nr


class uffdio_api(C.Structure):
    _fields_ = [("api", C.c_uint64), ("features", C.c_uint64), ("ioctls", C.c_uint64)]


class uffdio_range(C.Structure):
    _fields_ = [("start", C.c_uint64), ("len", C.c_uint64)]


class uffdio_register(C.Structure):
    _fields_ = [("range", uffdio_range), ("mode", C.c_uint64), ("ioctls", C.c_uint64)]


class uffdio_copy(C.Structure):
    _fields_ = [
        ("dst", C.c_uint64),
        ("src", C.c_uint64),
        ("len", C.c_uint64),
        ("mode", C.c_uint64),
        ("copy", C.c_int64),
    ]


class uffdio_zeropage(C.Structure):
    _fields_ = [("range", uffdio_range), ("mode", C.c_uint64), ("zeropage", C.c_int64)]


UFFDIO_API = _ioc(_IOR | _IOW, 0x3F, C.sizeof(uffdio_api))
UFFDIO_REGISTER = _ioc(_IOR | _IOW, 0x00, C.sizeof(uffdio_register))
UFFDIO_UNREGISTER = _ioc(_IOR, 0x01, C.sizeof(uffdio_range))
UFFDIO_WAKE = _ioc(_IOR, 0x02, C.sizeof(uffdio_range))
UFFDIO_COPY = _ioc(_IOR | _IOW, 0x03, C.sizeof(uffdio_copy))
UFFDIO_ZEROPAGE = _ioc(_IOR | _IOW, 0x04, C.sizeof(uffdio_zeropage))
USERFAULTFD_IOC_NEW = (0xAA << 8) | 0x00  # _IO(0xAA, 0x00) on /dev/userfaultfd


def _ioctl(fd: int, request: int, arg: C.Structure) -> int:
    """ioctl that reports errno (ctypes releases the GIL around it)."""
    ret = libc.ioctl(fd, request, C.addressof(arg))
    if ret < 0:
        err = C.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _not_permitted() -> LazyRestoreUnavailable:
    return LazyRestoreUnavailable(
        "lazy restore needs userfaultfd for kernel-mode faults (KVM touches guest memory "
        "too), which this user may not open: run as root, give the process CAP_SYS_PTRACE, "
        "set the sysctl vm.unprivileged_userfaultfd=1, or grant read-write access to "
        "/dev/userfaultfd; or restore without --lazy"
    )


class Userfaultfd:
    """One userfaultfd. Methods are named after its ioctls."""

    def __init__(self, fd: int):
        self.fd = fd

    @classmethod
    def open(cls) -> Userfaultfd:
        fd = libc.syscall(C.c_long(SYS_userfaultfd), C.c_int(O_CLOEXEC | O_NONBLOCK))
        if fd < 0:
            err = C.get_errno()
            if err in (errno.EPERM, errno.EACCES):
                fd = cls._open_dev()
            elif err == errno.ENOSYS:
                raise LazyRestoreUnavailable(
                    "this kernel has no userfaultfd (CONFIG_USERFAULTFD); restore without --lazy"
                )
            else:
                raise LazyRestoreUnavailable(f"userfaultfd failed: {os.strerror(err)}")
        uffd = cls(fd)
        try:
            api = uffdio_api(api=UFFD_API, features=0)
            _ioctl(fd, UFFDIO_API, api)
            if not api.features & UFFD_FEATURE_MISSING_SHMEM:
                raise LazyRestoreUnavailable(
                    "this kernel's userfaultfd cannot serve shared memory (Linux >= 4.11 "
                    "needed); restore without --lazy"
                )
        except OSError as e:
            uffd.close()
            raise LazyRestoreUnavailable(f"userfaultfd handshake failed: {e.strerror}") from None
        except BaseException:
            uffd.close()
            raise
        return uffd

    @staticmethod
    def _open_dev() -> int:
        try:
            dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            raise _not_permitted() from None
        try:
            fd = libc.ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK)
        finally:
            os.close(dev)
        if fd < 0:
            raise _not_permitted()
        return fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def register(self, start: int, length: int) -> int:
        """Register [start, start+length) for missing-page faults; returns the ioctl mask."""
        reg = uffdio_register(range=uffdio_range(start, length), mode=UFFDIO_REGISTER_MODE_MISSING)
        try:
            _ioctl(self.fd, UFFDIO_REGISTER, reg)
        except OSError as e:
            raise LazyRestoreUnavailable(
                f"cannot register guest memory with userfaultfd: {e.strerror}"
            ) from None
        return reg.ioctls

    def unregister(self, start: int, length: int) -> None:
        _ioctl(self.fd, UFFDIO_UNREGISTER, uffdio_range(start, length))

    def copy(self, dst: int, src: int, length: int, wake: bool = True) -> int:
        """Supply [dst, dst+length) from `src`. Returns the bytes copied: fewer than `length`
        when a page in the range exists already (EEXIST), the first one not copied."""
        arg = uffdio_copy(dst, src, length, 0 if wake else UFFDIO_COPY_MODE_DONTWAKE, 0)
        try:
            _ioctl(self.fd, UFFDIO_COPY, arg)
        except OSError as e:
            if e.errno == errno.EEXIST:
                return max(arg.copy, 0)
            if e.errno == errno.EAGAIN and arg.copy > 0:
                return arg.copy
            raise
        return length

    def zeropage(self, dst: int, length: int, wake: bool = True) -> bool:
        """Supply zero pages; False if a page there exists already."""
        arg = uffdio_zeropage(
            uffdio_range(dst, length), 0 if wake else UFFDIO_ZEROPAGE_MODE_DONTWAKE
        )
        try:
            _ioctl(self.fd, UFFDIO_ZEROPAGE, arg)
        except OSError as e:
            if e.errno == errno.EEXIST:
                return False
            raise
        return True

    def wake(self, start: int, length: int) -> None:
        _ioctl(self.fd, UFFDIO_WAKE, uffdio_range(start, length))
