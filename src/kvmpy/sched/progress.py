"""A guest's progress counter: the `kvmpy_progress` page (guest/include/kvmpy/sched.h).

The guest increments a u64 at the start of a page it names `kvmpy_progress`; the VMM finds the
page through the image's ELF symbols and reads the counter between slices. Nothing crosses
the hypercall ABI, so even a guest that never exits can be measured.

The symbol's value is a guest-virtual address, taken as guest-physical: SDK images link at
their physical addresses and kvmpy maps guest RAM one to one. The guest is untrusted: the
counter must be 8-byte aligned (one aligned load, never split across pages) and in RAM, and
every read goes through GuestMemory's bounds checks, so a guest that points the symbol at
nonsense only gets nonsense figures for itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import GuestMemoryError
from .errors import SchedError

if TYPE_CHECKING:
    from ..machine import Machine
    from ..memory import GuestMemory

SYMBOL = "kvmpy_progress"
MASK64 = (1 << 64) - 1


class ProgressCounter:
    """The guest-published work counter of one VM."""

    def __init__(self, memory: GuestMemory, gpa: int, owner: str = "the guest"):
        if gpa < 0 or gpa % 8:
            raise SchedError(
                f"{owner}: its progress counter at {gpa:#x} is not 8-byte aligned "
                f"(define it with KVMPY_DEFINE_PROGRESS from kvmpy/sched.h)"
            )
        if not memory.is_ram(gpa, 8):
            raise SchedError(f"{owner}: its progress counter at {gpa:#x} is not in guest RAM")
        self.memory = memory
        self.gpa = gpa

    def read(self) -> int:
        """The counter's current value (0 if the RAM under it has gone away)."""
        try:
            return self.memory.read_u64(self.gpa)
        except GuestMemoryError:
            return 0

    @staticmethod
    def delta(start: int, end: int) -> int:
        """Work done between two reads (the counter is a u64 and may wrap)."""
        return (end - start) & MASK64


def find_counter(
    machine: Machine, gpa: int | None = None, owner: str = ""
) -> ProgressCounter | None:
    """The counter at `gpa`, or at the image's `kvmpy_progress` symbol; None if it has none."""
    owner = owner or (machine.image.name if machine.image else "the guest")
    if gpa is None:
        image = machine.image
        if image is None or SYMBOL not in image.symbols:
            return None
        gpa = image.symbols[SYMBOL]
    return ProgressCounter(machine.memory, gpa, owner)
