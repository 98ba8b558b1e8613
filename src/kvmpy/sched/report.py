"""What a schedule returns: per-VM figures, the switch costs, the share timeline.

Everything here is plain data (JSON via `to_dict`); `rich_table` and `plot` are the human views.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..plotting import save_figure
from .errors import SchedError


class Samples:
    """Many measurements in bounded memory: every value up to `cap`, then a uniform random
    sample of them (reservoir sampling), so a median over an hour-long run stays cheap and
    unbiased. The mean and count are exact."""

    def __init__(self, cap: int = 100_000, seed: int = 0):
        self.cap = cap
        self.values: list[int] = []
        self.count = 0
        self.total = 0
        self._rng = random.Random(seed)

    def add(self, value: int) -> None:
        self.count += 1
        self.total += value
        if len(self.values) < self.cap:
            self.values.append(value)
        else:
            j = self._rng.randrange(self.count)
            if j < self.cap:
                self.values[j] = value

    @classmethod
    def merged(cls, parts: list[Samples]) -> Samples:
        """One set from several (the loops of a schedule on several CPUs)."""
        if len(parts) == 1:
            return parts[0]
        out = cls(cap=sum(p.cap for p in parts) or 1)
        for p in parts:
            out.values.extend(p.values)
            out.count += p.count
            out.total += p.total
        return out

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    @property
    def median(self) -> float | None:
        if not self.values:
            return None
        v = sorted(self.values)
        n = len(v)
        return float(v[n // 2]) if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


@dataclass
class Timeline:
    """Cumulative host CPU time (s) and progress of every VM, sampled while the schedule runs."""

    t_s: list[float] = field(default_factory=list)
    cpu_s: list[list[float]] = field(default_factory=list)
    progress: list[list[int]] = field(default_factory=list)

    def shares(self, series: list[list[float]] | list[list[int]]) -> list[list[float | None]]:
        """Each VM's cumulative share of the total at every sample (None before any)."""
        out: list[list[float | None]] = [[] for _ in series]
        for k in range(len(self.t_s)):
            total = sum(s[k] for s in series)
            for i, s in enumerate(series):
                out[i].append(s[k] / total if total else None)
        return out


@dataclass(frozen=True)
class VcpuReport:
    """One vCPU's part of its VM's figures (see VMReport for the fields' meaning)."""

    cpu: int
    host_s: float
    kvm_run_s: float
    cpu_s: float
    #: Its share of the host CPU time all VMs got.
    host_share: float | None
    #: Times the CPU was switched to this vCPU from another vCPU, of any VM (threads: its
    #: thread's host context switches).
    switches: int
    slices: int | None
    switch_cost_us_mean: float | None
    #: Exits this vCPU took during the schedule.
    exits: int
    #: running, parked, waiting (blocked in a hypercall), or its VM's stop reason.
    state: str
    #: Single-thread policies, SMP VMs: timer preemptions while the vCPU announced a held
    #: spinlock (kvmpy/spinlock.h), slices stretched for one (holder grace), its yield
    #: hypercalls, and the directed ones the scheduler carried out. None under threads.
    lhp_preemptions: int | None = None
    grace: int | None = None
    yields: int | None = None
    directed_yields: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpu": self.cpu,
            "host_share": _r(self.host_share),
            "switches": self.switches,
            "slices": self.slices,
            "host_s": _r(self.host_s),
            "kvm_run_s": _r(self.kvm_run_s),
            "cpu_s": _r(self.cpu_s),
            "switch_cost_us_mean": _r(self.switch_cost_us_mean, 2),
            "exits": self.exits,
            "state": self.state,
            "lhp_preemptions": self.lhp_preemptions,
            "grace": self.grace,
            "yields": self.yields,
            "directed_yields": self.directed_yields,
        }


@dataclass(frozen=True)
class VMReport:
    name: str
    image: str | None
    weight: float
    target_share: float
    #: Host-clock time inside Vcpu.run() for this VM: KVM_RUN plus the handling of its own exits
    #: (threads policy: the vCPU thread's whole time in run(), waiting for the CPU included).
    host_s: float
    #: The part of host_s inside KVM_RUN (host_s minus the VMM's time on the VM's exits).
    kvm_run_s: float
    #: Host CPU time spent running the VM (the thread's CPU clock around its slices; threads
    #: policy: the vCPU thread's CPU time). Below host_s when the host lent the CPU to others.
    cpu_s: float
    #: The VM's share of the host CPU time all VMs got (cpu_s over their sum).
    host_share: float | None
    progress: int | None
    progress_share: float | None
    #: Times the CPU was switched to this VM from another one (threads policy: the vCPU
    #: thread's context switches, as counted by the host kernel).
    switches: int
    #: Slices the VM ran (None under the threads policy: the host does not say).
    slices: int | None
    switch_cost_us_mean: float | None
    #: "running" if the VM was still running at the end, else its stop reason.
    state: str
    exit_code: int | None = None
    message: str = ""
    stopped_at_s: float | None = None
    #: Threads policy: the nice value that stands for the VM's weight.
    nice: int | None = None
    #: Which vCPU stopped the VM (SMP VMs only).
    stop_cpu: int | None = None
    #: Its vCPUs' own figures (the VM's are their sums).
    vcpus: list[VcpuReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "image": self.image,
            "weight": self.weight,
            "target_share": _r(self.target_share),
            "host_share": _r(self.host_share),
            "progress_share": _r(self.progress_share),
            "switches": self.switches,
            "slices": self.slices,
            "host_s": _r(self.host_s),
            "kvm_run_s": _r(self.kvm_run_s),
            "cpu_s": _r(self.cpu_s),
            "progress": self.progress,
            "switch_cost_us_mean": _r(self.switch_cost_us_mean, 2),
            "state": self.state,
        }
        if self.state != "running":
            d.update(
                exit_code=self.exit_code, message=self.message, stopped_at_s=_r(self.stopped_at_s)
            )
            if self.stop_cpu is not None:
                d["stop_cpu"] = self.stop_cpu
        if self.nice is not None:
            d["nice"] = self.nice
        d["vcpus"] = [v.to_dict() for v in self.vcpus]
        return d


@dataclass
class ScheduleResult:
    policy: str
    quantum_s: float | None
    #: Wall time the schedule ran, from the first entry to the end.
    duration_s: float
    duration_limit_s: float | None
    vms: list[VMReport]
    #: Median time from one VM's preemption (its timer expiring, or its exit) to the next VM's
    #: entry into KVM_RUN; None without switches (and under the threads policy).
    switch_cost_us: float | None
    switch_cost_us_mean: float | None
    #: Median time from a slice's timer expiring to KVM_RUN returning to the scheduler.
    exit_latency_us: float | None
    #: Host CPU time of the whole schedule: the VMs' slices and, on one thread, the
    #: scheduler's own work between them.
    cpu_total_s: float
    cpu: int | None
    #: The host CPUs the schedule ran on (threads: its vCPU threads' affinity).
    cpus: list[int] | None = None
    #: How long a slice may be stretched for a vCPU holding an announced spinlock (0: never).
    holder_grace_s: float = 0.0
    interrupted: bool = False
    timeline: Timeline = field(default_factory=Timeline, repr=False)

    @property
    def switches(self) -> int:
        return sum(v.switches for v in self.vms)

    def vm(self, name: str) -> VMReport:
        for v in self.vms:
            if v.name == name:
                return v
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "quantum_s": self.quantum_s,
            "duration_s": _r(self.duration_s),
            "duration_limit_s": self.duration_limit_s,
            "vms": [v.to_dict() for v in self.vms],
            "switch_cost_us": _r(self.switch_cost_us, 2),
            "switch_cost_us_mean": _r(self.switch_cost_us_mean, 2),
            "exit_latency_us": _r(self.exit_latency_us, 2),
            "switches": self.switches,
            "cpu_total_s": _r(self.cpu_total_s),
            "cpu": self.cpu,
            "cpus": self.cpus,
            "holder_grace_s": self.holder_grace_s,
            "interrupted": self.interrupted,
        }

    # --- human views -------------------------------------------------------------------------

    def rich_table(self, title: str | None = None):
        from rich import box
        from rich.table import Table
        from rich.text import Text

        q = f", quantum {format_seconds(self.quantum_s)}" if self.quantum_s else ""
        table = Table(
            title=title
            or f"kvmpy sched: {self.policy}{q}, {self.duration_s:.2f} s"
            + (" (interrupted)" if self.interrupted else ""),
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            show_edge=False,
        )
        table.add_column("VM", no_wrap=True)
        for col in (
            "target\nshare",
            "host\nshare",
            "progress\nshare",
            "switches",
            "mean\nswitch",
            "CPU\ntime",
        ):
            table.add_column(col, justify="right", no_wrap=True)
        table.add_column("state")
        for v in self.vms:
            table.add_row(
                Text(v.name),  # a file name, not rich markup
                _pct(v.target_share),
                _pct(v.host_share),
                _pct(v.progress_share),
                str(v.switches),
                f"{v.switch_cost_us_mean:.1f} µs" if v.switch_cost_us_mean is not None else "–",
                f"{v.cpu_s:.3f} s",
                v.state,
            )
            if len(v.vcpus) > 1:
                for c in v.vcpus:
                    table.add_row(
                        Text(f"  cpu{c.cpu}", style="dim"),
                        "",
                        _pct(c.host_share),
                        "",
                        str(c.switches),
                        f"{c.switch_cost_us_mean:.1f} µs"
                        if c.switch_cost_us_mean is not None
                        else "–",
                        f"{c.cpu_s:.3f} s",
                        c.state,
                        style="dim",
                    )
        return table

    def summary_line(self) -> str:
        parts = [f"{self.switches} switches"]
        if self.switch_cost_us is not None:
            parts.append(
                f"median switch cost {self.switch_cost_us:.1f} µs (timer or exit to next entry)"
            )
        if self.exit_latency_us is not None:
            parts.append(
                f"median exit latency {self.exit_latency_us:.1f} µs (timer to KVM_RUN return)"
            )
        if self.policy == "threads":
            nices = ", ".join(str(v.nice) for v in self.vms if v.nice is not None)
            parts = [
                f"{self.switches} host context switches of the vCPU threads",
                f"nice values standing for the weights: {nices}",
            ]
        if self.cpu is not None:
            parts.append(f"CPU {self.cpu}")
        elif self.cpus:
            parts.append(f"CPUs {','.join(map(str, self.cpus))}")
        return "; ".join(parts)


def format_seconds(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 1e-3:
        return f"{s * 1e6:g} µs"
    if s < 1:
        return f"{s * 1e3:g} ms"
    return f"{s:g} s"


def _pct(x: float | None) -> str:
    return f"{x * 100:.2f}%" if x is not None else "–"


def _r(x: float | None, digits: int = 6) -> float | None:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return round(x, digits)


# --- plot --------------------------------------------------------------------------------------

PLOT_FORMATS = (".png", ".svg", ".pdf")


def plot(result: ScheduleResult, path: str | Path) -> Path:
    """Each VM's cumulative share of host time and of guest progress over the run, with its
    target as a dotted line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    if path.suffix.lower() not in PLOT_FORMATS:
        raise SchedError(f"plot file must end in {', '.join(PLOT_FORMATS)} (got {str(path)!r})")
    tl = result.timeline
    has_progress = any(v.progress is not None for v in result.vms)
    fig = Figure(figsize=(8, 6.5 if has_progress else 4), layout="constrained")
    FigureCanvasAgg(fig)  # Agg explicitly: no display, no pyplot global state
    axes = fig.subplots(2 if has_progress else 1, 1, sharex=True, squeeze=False)[:, 0]
    prog_series = [
        p if v.progress is not None else [0] * len(p)
        for v, p in zip(result.vms, tl.progress, strict=True)
    ]
    panels = [("host CPU time", tl.shares(tl.cpu_s))]
    if has_progress:
        panels.append(("guest progress", tl.shares(prog_series)))
    colors = [f"C{i % 10}" for i in range(len(result.vms))]
    for ax, (what, shares) in zip(axes, panels, strict=True):
        for v, share, color in zip(result.vms, shares, colors, strict=True):
            if what == "guest progress" and v.progress is None:
                continue
            ys = [s * 100 if s is not None else float("nan") for s in share]
            ax.plot(tl.t_s, ys, color=color, label=v.name)
            ax.axhline(v.target_share * 100, color=color, ls=":", lw=1)
        ax.set_ylabel(f"cumulative share of {what} (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper right", fontsize="small")
    axes[-1].set_xlabel("time (s)")
    q = f", quantum {format_seconds(result.quantum_s)}" if result.quantum_s else ""
    axes[0].set_title(f"kvmpy sched: {result.policy}{q} (dotted: targets)")
    return save_figure(fig, path, 110, error=SchedError)
