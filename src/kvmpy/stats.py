"""Exit statistics: counts and time per exit reason and per port.

The run loop updates plain lists and small per-port records in place (no allocation per exit);
this module turns them into a table or JSON afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .kvm.constants import ExitReason

MAX_REASON = 64
#: Not a KVM exit reason: a guest exception that reached kvmpy's stub. KVM reports it as the
#: stub's `out` (an io exit); it is counted here instead, under "exception".
EXCEPTION = MAX_REASON - 1


def reason_name(reason: int) -> str:
    return "exception" if reason == EXCEPTION else ExitReason.name_of(reason)


#: The hypercall fast path times one exit in this many (a power of two).
SAMPLE_EVERY = 64
#: ...after timing the first this many exits of a run exactly (short runs stay exact).
EXACT_FIRST = 256


@dataclass(eq=False, slots=True)
class PortStats:
    """Per-port counters. `time_ns` covers the `timed` accesses (all of them, except on the
    sampled hypercall fast path); `est_time_ns` scales it to every access."""

    port: int
    name: str = ""
    reads: int = 0
    writes: int = 0
    time_ns: int = 0
    timed: int = 0

    @property
    def est_time_ns(self) -> float:
        n = self.reads + self.writes
        return self.time_ns / self.timed * n if self.timed else 0.0


@dataclass
class ExitStats:
    """Exit counters of one vCPU.

    Reading the clock twice per exit costs ~0.7 µs on our hosts (measured right after KVM_RUN
    returns, with cold caches), more than all the rest of a hypercall's handling. So the
    hypercall fast path times one exit in `SAMPLE_EVERY` (after the first `EXACT_FIRST`) and
    every other exit is timed;
    `vmm_ns[r] / timed[r]` is the mean VMM time of reason r and `est_vmm_ns(r)` scales it to all
    of them. With `exact=True` on the vCPU every exit is timed.
    """

    counts: list[int] = field(default_factory=lambda: [0] * MAX_REASON)
    #: VMM time of the timed exits per reason: from KVM_RUN returning to the next KVM_RUN call.
    vmm_ns: list[int] = field(default_factory=lambda: [0] * MAX_REASON)
    timed: list[int] = field(default_factory=lambda: [0] * MAX_REASON)
    #: Wall time spent in the run loop (inside and outside KVM_RUN).
    loop_ns: int = 0
    ports: dict[int, PortStats] = field(default_factory=dict)
    #: Events the VMM handled on the guest's behalf beyond plain exits, by name: the
    #: software-host profile's fallbacks (an emulation failure papered over, an MSR write
    #: taken), counted once each (docs/linux.md).
    fallbacks: dict[str, int] = field(default_factory=dict)

    def count_fallback(self, name: str) -> None:
        self.fallbacks[name] = self.fallbacks.get(name, 0) + 1

    @classmethod
    def merged(cls, parts: list[ExitStats]) -> ExitStats:
        """The sum of several vCPUs' statistics (times add up as vCPU time, not wall time)."""
        if len(parts) == 1:
            return parts[0]
        total = cls()
        for p in parts:
            for r in range(MAX_REASON):
                total.counts[r] += p.counts[r]
                total.vmm_ns[r] += p.vmm_ns[r]
                total.timed[r] += p.timed[r]
            total.loop_ns += p.loop_ns
            for name, c in p.fallbacks.items():
                total.fallbacks[name] = total.fallbacks.get(name, 0) + c
            for ps in p.ports.values():
                t = total.port(ps.port, ps.name)
                t.name = t.name or ps.name
                t.reads += ps.reads
                t.writes += ps.writes
                t.time_ns += ps.time_ns
                t.timed += ps.timed
        return total

    def est_vmm_ns(self, reason: int) -> float:
        t = self.timed[reason]
        return self.vmm_ns[reason] / t * self.counts[reason] if t else 0.0

    @property
    def est_total_vmm_ns(self) -> float:
        return sum(self.est_vmm_ns(r) for r in range(MAX_REASON))

    @property
    def run_ns(self) -> float:
        """Estimated time inside KVM_RUN: the loop's wall time minus the VMM's share."""
        return max(0.0, self.loop_ns - self.est_total_vmm_ns)

    # Port-I/O exits per direction are derived from the per-port counters rather than kept in
    # the run loop: one counter fewer on the hot path.
    @property
    def io_in(self) -> int:
        return sum(p.reads for p in self.ports.values() if p.port >= 0)

    @property
    def io_out(self) -> int:
        return sum(p.writes for p in self.ports.values() if p.port >= 0)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def port(self, port: int, name: str = "") -> PortStats:
        ps = self.ports.get(port)
        if ps is None:
            ps = self.ports[port] = PortStats(port, name)
        return ps

    def by_reason(self) -> dict[str, int]:
        return {reason_name(r): c for r, c in enumerate(self.counts) if c}

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "by_reason": {
                reason_name(r): {
                    "count": c,
                    "vmm_time_us": round(self.est_vmm_ns(r) / 1e3, 3),
                    "timed": self.timed[r],
                }
                for r, c in enumerate(self.counts)
                if c
            },
            "by_port": {
                f"{p.port:#x}": {
                    "name": p.name,
                    "in": p.reads,
                    "out": p.writes,
                    "vmm_time_us": round(p.est_time_ns / 1e3, 3),
                }
                for p in sorted(self.ports.values(), key=lambda p: p.port)
                if p.reads or p.writes
            },
            "io_in": self.io_in,
            "io_out": self.io_out,
            "time_in_kvm_run_us": round(self.run_ns / 1e3, 3),
            **({"fallbacks": dict(sorted(self.fallbacks.items()))} if self.fallbacks else {}),
        }

    def rich_tables(self):
        """Rich tables for `--stats`: by reason, by port, and the fallbacks if there were
        any."""
        from rich.table import Table

        reasons = Table(title="VM exits by reason")
        reasons.add_column("reason")
        reasons.add_column("count", justify="right")
        reasons.add_column("VMM time", justify="right")
        reasons.add_column("per exit", justify="right")
        for r, c in enumerate(self.counts):
            if c:
                t = self.est_vmm_ns(r)
                reasons.add_row(reason_name(r), str(c), _us(t), _us(t / c))
        reasons.add_row("total", str(self.total), _us(self.est_total_vmm_ns), "", style="bold")
        ports = Table(title="Port I/O exits by port")
        ports.add_column("port", justify="right")
        ports.add_column("device")
        ports.add_column("in", justify="right")
        ports.add_column("out", justify="right")
        ports.add_column("VMM time", justify="right")
        for p in sorted(self.ports.values(), key=lambda p: p.port):
            if p.reads or p.writes:
                ports.add_row(
                    f"{p.port:#x}" if p.port >= 0 else "mmio", p.name, str(p.reads),
                    str(p.writes), _us(p.est_time_ns),
                )  # fmt: skip
        if not self.fallbacks:
            return reasons, ports
        fallbacks = Table(title="VMM fallbacks (software-host profile)")
        fallbacks.add_column("event")
        fallbacks.add_column("count", justify="right")
        for name, c in sorted(self.fallbacks.items()):
            fallbacks.add_row(name, str(c))
        return reasons, ports, fallbacks


def _us(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e3:.2f} µs"
