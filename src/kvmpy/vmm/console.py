"""Host input for a guest's serial console, served on the machine's event loop.

    con = ConsoleInput(machine, uart, fd=0, interactive=os.isatty(0))
    con.start()          # bytes from fd 0 are typed into the UART as the guest takes them
    ...; con.close()

The source is a file descriptor: a terminal (the caller puts it in raw mode, `raw_terminal`),
a pipe or socket (watched on the event loop), or a regular file (read in chunks, as a file
cannot be polled). End of input only means no more input: the guest keeps running.

Input is held back until the guest listens (`accepting_input`: Linux's 8250 driver enables
the receive interrupt when a process opens the port; its start-up clears the FIFO, so bytes
typed before that would be lost; it must stay enabled RETRY_S, see `_listening`) and then
handed over as fast as the guest reads it. What the
guest has not taken waits here, bounded (`PENDING_LIMIT`): beyond it the source is not read
until the guest catches up, so a fast writer cannot make the VMM allocate without bound.

On a terminal, Ctrl-A is an escape as in QEMU: Ctrl-A x quits (the VM stops as
`interrupted`), Ctrl-A Ctrl-A types one Ctrl-A, Ctrl-A h prints the keys.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import sys
import termios
import threading
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

ESCAPE = 0x01  # Ctrl-A
PENDING_LIMIT = 64 * 1024
READ_CHUNK = 4096
#: While input waits for the guest, look again this often (the guest's "input wanted" call is
#: the fast path; this only covers a wake-up lost to a race between threads).
RETRY_S = 0.2
ESCAPE_HELP = "\r\nkvmpy: Ctrl-A x quit, Ctrl-A Ctrl-A send Ctrl-A, Ctrl-A h this help\r\n"


class InputTarget(Protocol):
    """What takes console input: a UART (devices/legacy/serial.py)."""

    on_input_wanted: Callable[[], None] | None

    @property
    def accepting_input(self) -> bool: ...

    def push_input(self, data: bytes) -> int: ...


class ConsoleInput:
    def __init__(
        self,
        machine,
        target: InputTarget,
        fd: int,
        *,
        interactive: bool = False,
        on_quit: Callable[[], None] | None = None,
        echo: Callable[[bytes], None] | None = None,
    ):
        self.machine = machine
        self.loop = machine.event_loop
        self.target = target
        self.fd = fd
        self.interactive = interactive
        self.on_quit = on_quit
        #: Where the escape's help text goes (the terminal); default stderr.
        self.echo = echo
        self._pending = bytearray()
        self._lock = threading.Lock()
        self._escape = False
        self._watching = False
        self._retry_armed = False
        self._since: float | None = None
        self._confirmed = False
        self.eof = False
        self.closed = False
        self.typed = 0
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            mode = 0
        self._regular = stat.S_ISREG(mode) or stat.S_ISBLK(mode)

    # --- life cycle (any thread) --------------------------------------------------------------

    def start(self) -> None:
        self.target.on_input_wanted = self._wanted
        self.loop.call_soon(self._fill)

    def close(self) -> None:
        self.closed = True
        if self.target.on_input_wanted == self._wanted:
            self.target.on_input_wanted = None
        if self._watching:
            self.loop.remove_reader(self.fd)
            self._watching = False

    def feed(self, data: bytes) -> None:
        """Type `data` as if it came from the source (from any thread)."""
        with self._lock:
            self._pending += data
        self.loop.call_soon(self._flush)

    @property
    def pending(self) -> int:
        return len(self._pending)

    # --- the loop thread ------------------------------------------------------------------------

    def _wanted(self) -> None:
        # A vCPU thread: the guest emptied its queue or opened the port.
        if self._pending or (not self._watching and not self.eof):
            self.loop.call_soon(self._flush)

    def _fill(self) -> None:
        """Read from the source while there is room; watch it when it would block."""
        if self.closed:
            return
        if self._regular:
            while not self.eof and len(self._pending) < PENDING_LIMIT:
                self._read_once()
        elif not self.eof and len(self._pending) < PENDING_LIMIT and not self._watching:
            try:
                self.loop.add_reader(self.fd, self._on_readable)
                self._watching = True
            except (OSError, ValueError) as e:
                log.warning("console input: cannot watch fd %d: %s", self.fd, e)
                self.eof = True
        self._flush()

    def _on_readable(self) -> None:
        self._read_once()
        if (self.eof or len(self._pending) >= PENDING_LIMIT) and self._watching:
            self.loop.remove_reader(self.fd)
            self._watching = False
        self._flush()

    def _read_once(self) -> None:
        room = PENDING_LIMIT - len(self._pending)
        try:
            data = os.read(self.fd, min(READ_CHUNK, room))
        except BlockingIOError:
            return
        except OSError as e:
            log.warning("console input: %s; no more input", e.strerror or e)
            data = b""
        if not data:
            self.eof = True
            return
        if self.interactive:
            data = self._escapes(data)
        with self._lock:
            self._pending += data

    def _escapes(self, data: bytes) -> bytes:
        out = bytearray()
        for b in data:
            if self._escape:
                self._escape = False
                if b in (ord("x"), ord("X")):
                    self._quit()
                    break
                if b == ESCAPE:
                    out.append(ESCAPE)
                elif b in (ord("h"), ord("H"), ord("?")):
                    self._say(ESCAPE_HELP)
                continue
            if b == ESCAPE:
                self._escape = True
                continue
            out.append(b)
        return bytes(out)

    def _say(self, text: str) -> None:
        if self.echo is not None:
            self.echo(text.encode())
        else:
            sys.stderr.write(text)
            sys.stderr.flush()

    def _quit(self) -> None:
        self.eof = True
        if self.on_quit is not None:
            self.on_quit()
        else:
            from ..result import StopReason

            self.machine.request_stop(StopReason.INTERRUPTED, "quit with Ctrl-A x")

    def _flush(self) -> None:
        if self.closed:
            return
        if self._pending and self._listening():
            with self._lock:
                taken = self.target.push_input(bytes(self._pending))
                del self._pending[:taken]
                self.typed += taken
        if self._pending:
            if not self._retry_armed:
                self._retry_armed = True
                self.loop.call_later(RETRY_S, self._retry)
        elif not self.eof and not self._watching:
            self._fill()

    def _listening(self) -> bool:
        """`accepting_input`, settled: it must hold for RETRY_S before the first byte goes in.
        Linux's 8250 driver sets IER to 0x0F for a moment when it registers the port (its
        autoconfig probe), long before a process opens it, and the start-up at that open
        clears the FIFO: a script piped in at boot was handed over in that moment and lost
        (measured). Once the guest has listened that long it stays trusted (its console
        writes clear IER briefly around every kernel message)."""
        if self._confirmed:
            return True
        if not self.target.accepting_input:
            self._since = None
            return False
        now = time.monotonic()
        if self._since is None:
            self._since = now
        self._confirmed = now - self._since >= RETRY_S * 0.9  # a timer may fire a bit early
        return self._confirmed

    def _retry(self) -> None:
        self._retry_armed = False
        self._flush()


# --- the terminal ------------------------------------------------------------------------------


@contextlib.contextmanager
def raw_terminal(fd: int):
    """Put the terminal on `fd` in raw mode for the block (every key goes to the guest,
    Ctrl-C included), and restore it however the block ends. Output processing stays on, as
    in QEMU, so kvmpy's own messages still start at the left margin. Not a terminal: nothing
    happens."""
    try:
        old = termios.tcgetattr(fd)
    except (termios.error, OSError):
        yield False
        return
    new = list(old)
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = new
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
               | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)  # fmt: skip
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    cc = list(cc)
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, [iflag, oflag, cflag, lflag, ispeed, ospeed, cc])
    try:
        yield True
    finally:
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(fd, termios.TCSADRAIN, old)
