"""What the VMM learns from a Linux guest's console: boot milestones and kernel panics.

Sans-IO: `ConsoleMonitor.feed(data, now)` takes console output as it comes (any split, from
any console: the UART and hvc0 both end up here) and returns what happened. The VMM has no
other view into a guest kernel, and these lines are stable across kernel versions:

* `first_line`: the first complete console line (earlyprintk's first message);
* `run_init`: "Run /init as init process" (also "Run /sbin/init...");
* `init_marker`: kvmpy's default /init's "kvmpy-init: ready" (boot/initramfs.py);
* a panic: "Kernel panic - not syncing: ..." starts one; Linux then prints a trace and either
  reboots at once (panic=-1, kvmpy's default: the i8042 reset comes next), says "Rebooting in
  N seconds", or ends with "---[ end Kernel panic - not syncing ... ]---" and spins. Each of
  those ends it.

Lines are bounded (a guest that never prints a newline cannot grow the buffer), and only the
last `TAIL_LINES` are kept for the stop message.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .initramfs import INIT_MARKER

TAIL_LINES = 12
MAX_LINE = 1024

PANIC_START = b"Kernel panic - not syncing"
#: Lines after which a panicking kernel does nothing more worth waiting for.
PANIC_ENDS = (b"---[ end Kernel panic", b"Rebooting in ")

MILESTONES = (
    ("run_init", (b"Run /init as init process", b"Run /sbin/init as init process")),
    ("init_marker", (INIT_MARKER.encode(),)),
)


@dataclass(frozen=True)
class PanicEnded:
    """The guest kernel panicked and is done printing: stop it as `guest_panic`."""

    message: str


class ConsoleMonitor:
    def __init__(self) -> None:
        #: Milestone name -> the `now` value given with the data that completed it.
        self.milestones: dict[str, float] = {}
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._line = bytearray()
        #: The panic line, once the guest printed one.
        self.panic: str | None = None
        self.lines = 0

    def feed(self, data: bytes, now: float) -> PanicEnded | None:
        ended = None
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                room = MAX_LINE - len(self._line)
                if room > 0:
                    self._line += data[start : start + room]
                return ended
            self._line += data[start:nl][: max(0, MAX_LINE - len(self._line))]
            start = nl + 1
            line = bytes(self._line).rstrip(b"\r")
            self._line.clear()
            ended = self._on_line(line, now) or ended

    def _on_line(self, line: bytes, now: float) -> PanicEnded | None:
        self.lines += 1
        text = line.decode("utf-8", "replace")
        self.tail.append(text)
        if "first_line" not in self.milestones:
            self.milestones["first_line"] = now
        for name, patterns in MILESTONES:
            if name not in self.milestones and any(p in line for p in patterns):
                self.milestones[name] = now
        if self.panic is None:
            if PANIC_START in line:
                self.panic = text[text.find("Kernel panic") :]
            return None
        if any(p in line for p in PANIC_ENDS):
            return self.ended()
        return None

    def ended(self) -> PanicEnded:
        """The stop for a panic (also when the guest reset the machine after one)."""
        assert self.panic is not None
        tail = "\n".join(f"  | {t}" for t in self.tail)
        return PanicEnded(f"{self.panic}\nlast console lines:\n{tail}")
