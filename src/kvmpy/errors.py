"""Exceptions a user of kvmpy can act on. Each message is one sentence that says what to do."""

from __future__ import annotations


class KvmpyError(Exception):
    """Base class: anything kvmpy reports as a clear error instead of a traceback."""


class UsageError(KvmpyError):
    """A command line that cannot work: a flag's value, or flags that do not go together. The
    CLI exits with status 2 for it, as argparse does for the errors it finds itself."""


class KvmUnavailable(KvmpyError):
    """/dev/kvm is missing, not permitted, or too old."""


class KvmError(KvmpyError, OSError):
    """An ioctl on a KVM file descriptor failed."""

    def __init__(self, op: str, err: OSError):
        self.op = op
        self.errno = err.errno
        self.strerror = err.strerror
        super().__init__(err.errno, f"{op} failed: {err.strerror}")

    def __str__(self) -> str:
        return f"{self.op} failed: {self.strerror} (errno {self.errno})"


class BadImage(KvmpyError):
    """A guest image that cannot be loaded (malformed, truncated, overlapping, too large)."""


class ConfigError(KvmpyError):
    """A machine configuration that cannot work (bad mode, size, address)."""


class GuestMemoryError(KvmpyError):
    """An access outside guest RAM. Guest-originated accesses never raise this to the user:
    hypercalls turn it into -EFAULT."""


class HostLimitation(KvmpyError):
    """This host's KVM cannot do what was asked (e.g. 32-bit paging on KVM-PVM)."""


class BuildError(KvmpyError):
    """Compiling a guest with the SDK failed."""


class SnapshotError(KvmpyError):
    """A snapshot that cannot be written, or read back: missing, truncated, corrupted, of
    another format version, or made on a machine this host cannot recreate."""
