"""Why a VM stopped, and what a run returns."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from .stats import ExitStats


class StopReason(enum.StrEnum):
    EXIT = "exit"  # the exit hypercall
    HLT = "hlt"  # hlt with nothing that could wake the vCPU
    SHUTDOWN = "shutdown"  # triple fault (or a guest-requested shutdown)
    RESET = "reset"  # guest-requested reset
    EXCEPTION = "exception"  # an exception reached kvmpy's default handler
    INTERNAL_ERROR = "internal_error"  # KVM could not emulate / deliver
    FAIL_ENTRY = "fail_entry"  # the CPU refused the vCPU state
    UNHANDLED_EXIT = "unhandled_exit"  # an exit kvmpy has no handler for
    HOST_LIMITATION = "host_limitation"  # this host's KVM cannot run the requested mode
    INTERRUPTED = "interrupted"  # stopped from the host (Ctrl-C, request_stop)
    TIMEOUT = "timeout"  # the run's time limit passed
    VMM_ERROR = "vmm_error"  # KVM_RUN failed, or a Python handler or device did
    DEADLOCK = "deadlock"  # every vCPU blocked by the guest (parked or waiting): none can run
    MIGRATED = "migrated"  # the VM went on in another process (kvmpy.persist)
    OUTPUT_ERROR = "output_error"  # the guest's output could not be written (EPIPE, ENOSPC)
    # A Linux guest's own ends (docs/linux.md): ACPI S5, the i8042 reset line, a kernel panic.
    POWEROFF = "poweroff"
    REBOOT = "reboot"
    GUEST_PANIC = "guest_panic"

    @property
    def ok(self) -> bool:
        """The guest ended the way it meant to: exit status 0 (or its exit code)."""
        return self in (StopReason.EXIT, StopReason.HLT, StopReason.MIGRATED, StopReason.POWEROFF,
                        StopReason.REBOOT)  # fmt: skip


# Process exit status of `kvmpy run` for stops that carry no guest exit code.
EXIT_STATUS = {
    StopReason.TIMEOUT: 124,
    StopReason.INTERRUPTED: 130,
    StopReason.OUTPUT_ERROR: 74,  # EX_IOERR in <sysexits.h>
}
EXIT_STATUS_CRASH = 125


EXCEPTION_NAMES = {
    0: "#DE divide error", 1: "#DB debug", 2: "NMI", 3: "#BP breakpoint", 4: "#OF overflow",
    5: "#BR bound range", 6: "#UD invalid opcode", 7: "#NM device not available",
    8: "#DF double fault", 10: "#TS invalid TSS", 11: "#NP segment not present",
    12: "#SS stack fault", 13: "#GP general protection", 14: "#PF page fault",
    16: "#MF x87 error", 17: "#AC alignment check", 18: "#MC machine check",
    19: "#XM SIMD error", 20: "#VE virtualization", 21: "#CP control protection",
}  # fmt: skip


def exception_name(vector: int) -> str:
    if vector in EXCEPTION_NAMES:
        return EXCEPTION_NAMES[vector]
    return f"vector {vector}" + (" (reserved exception)" if vector < 32 else " (interrupt)")


@dataclass(frozen=True)
class Fault:
    """Where the guest went wrong: the faulting instruction and, for exceptions, the vector."""

    rip: int
    instruction: str | None  # disassembly, e.g. "mov qword ptr [rax], 1"
    instruction_bytes: bytes
    vector: int | None = None
    error_code: int | None = None
    cr2: int | None = None
    #: Code selector of the faulting context (from the exception frame), if known.
    cs: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "rip": self.rip,
            "instruction": self.instruction,
            "instruction_bytes": self.instruction_bytes.hex(),
        }
        if self.vector is not None:
            d.update(vector=self.vector, exception=exception_name(self.vector))
        if self.error_code is not None:
            d["error_code"] = self.error_code
        if self.cr2 is not None:
            d["cr2"] = self.cr2
        if self.cs is not None:
            d["cs"] = self.cs
        return d


@dataclass(frozen=True)
class Stop:
    reason: StopReason
    exit_code: int = 0
    message: str = ""
    fault: Fault | None = None
    #: Registers at the fault (from the exception frame) when they differ from the vCPU's.
    regs: Any = None
    #: Index of the vCPU that stopped the VM.
    cpu: int = 0
    #: The signal that stopped the VM (SIGINT, SIGTERM), for `interrupted`.
    signum: int | None = None


#: Stops where the guest ended by itself, so it has an exit code (hlt counts as code 0).
GUEST_ENDED = (StopReason.EXIT, StopReason.HLT)


@dataclass
class RunResult:
    stop_reason: StopReason
    #: The guest's exit code, or None if the guest did not end by itself.
    exit_code: int | None
    message: str
    regs: dict[str, int]
    sregs: dict[str, int]
    stats: ExitStats
    fault: Fault | None = None
    #: The signal that stopped the VM, if one did (interrupted).
    signal: int | None = None
    duration_s: float = 0.0
    output: bytes = b""
    #: The vCPU whose stop ended the run.
    cpu: int = 0
    #: Per-vCPU statistics of an SMP machine (`stats` is their sum); empty for one vCPU.
    vcpu_stats: list[ExitStats] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The guest's exit code exists only if the guest ended by itself; after a timeout, a
        # fault or a signal there is none (None, null in JSON), not a 0 that reads as success.
        if self.stop_reason not in GUEST_ENDED:
            self.exit_code = None  # type: ignore[assignment]

    @property
    def exits(self) -> dict[str, int]:
        return self.stats.by_reason()

    @property
    def process_exit_status(self) -> int:
        if self.stop_reason is StopReason.EXIT:
            return self.exit_code & 0xFF
        if self.stop_reason in (StopReason.HLT, StopReason.MIGRATED, StopReason.POWEROFF,
                                StopReason.REBOOT):  # fmt: skip
            return 0
        if self.stop_reason is StopReason.INTERRUPTED and self.signal:
            return 128 + self.signal  # as a shell reports a signal: 130, 143
        return EXIT_STATUS.get(self.stop_reason, EXIT_STATUS_CRASH)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stop_reason": self.stop_reason.value,
            "exit_code": self.exit_code,
            "message": self.message,
            "exits": self.exits,
            "regs": self.regs,
            "sregs": self.sregs,
            "fault": self.fault.to_dict() if self.fault else None,
            "signal": _signal_name(self.signal),
            "stats": self.stats.to_dict(),
            "cpu": self.cpu,
            **({"vcpus": [s.to_dict() for s in self.vcpu_stats]} if self.vcpu_stats else {}),
            "duration_s": round(self.duration_s, 6),
            **self.extra,
        }


def _signal_name(signum: int | None) -> str | None:
    if not signum:
        return None
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
