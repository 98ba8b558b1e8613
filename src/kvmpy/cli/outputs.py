"""What kvmpy does when its own output cannot be written: stdout closed at start (`>&-`), a
full disk or device (`> /dev/full`), a reader that went away (`| head -c 1`).

Each is one `kvmpy: error:` line and exit status EXIT_OUTPUT_ERROR (74, EX_IOERR in
<sysexits.h>), never a traceback; a running VM is stopped first (Machine.console_write turns
the failed write into a stop with StopReason.OUTPUT_ERROR).
"""

from __future__ import annotations

import errno
import os
import sys

from ..errors import KvmpyError
from ..result import EXIT_STATUS, StopReason

EXIT_OUTPUT_ERROR = EXIT_STATUS[StopReason.OUTPUT_ERROR]


class OutputError(KvmpyError):
    """kvmpy's standard output cannot be written."""


def guard_standard_fds() -> list[int]:
    """Open /dev/null on any of fds 0-2 that is closed; returns those that were.

    A closed standard fd would be the next fd a file or /dev/kvm opens, and guest output
    meant for stdout would then land in it (in guest memory, for a memfd)."""
    closed = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.append(fd)
    for fd in closed:
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
    return closed


def describe(e: OSError) -> str:
    if e.errno == errno.EPIPE:
        return "the reader of kvmpy's output went away (broken pipe)"
    return e.strerror or str(e)


def discard_stdout() -> None:
    """Point fd 1 at /dev/null so that the interpreter's last flush at exit cannot fail again
    (Python would print 'Exception ignored ... BrokenPipeError')."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
    except OSError:
        pass


def stdout_failed() -> bool:
    """Whether stdout cannot take what is buffered for it (after an OSError of unknown origin)."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
        return False
    except OSError:
        return True


def write_stdout(text: str) -> None:
    """Write and flush `text` on stdout, or OutputError."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as e:
        raise OutputError(f"cannot write to standard output: {describe(e)}") from None


class GuestConsole:
    """The guest's output on kvmpy's stdout: written through, flushed at line ends (so that
    interactive output appears), and its last byte remembered, so that a JSON report after it
    can start on a line of its own."""

    def __init__(self, stream=None, *, interactive: bool = False):
        stream = stream if stream is not None else sys.stdout.buffer
        self._write = stream.write
        self._flush = stream.flush
        self.ends_line = True  # nothing written yet
        #: Flush every write: a shell's prompt has no line end, and whoever reads it (a
        #: person, or a script waiting for "# ") must see it at once.
        self.interactive = interactive

    def __call__(self, data: bytes) -> None:
        if not data:
            return
        self.ends_line = data[-1] == 0x0A
        self._write(data)
        if self.interactive or b"\n" in data:
            self._flush()

    def flush(self) -> None:
        """Flush what is buffered; OutputError if it cannot be written."""
        try:
            self._flush()
        except OSError as e:
            raise OutputError(f"cannot write the guest's output: {describe(e)}") from None
