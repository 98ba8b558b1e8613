"""kvmpy sched: run several VMs on one host CPU under a scheduling policy (docs/sched.md)."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from ..arch.x86.modes import MAX_CPUS, Mode
from ..limits import MAX_DURATION_S, duration_problem
from .options import guest_memory

#: Guest output kept per VM (the tail): a guest that prints without end must not make the
#: VMM allocate without end.
OUTPUT_TAIL = 4096


@dataclass(frozen=True)
class VmArg:
    image: str
    weight: float
    #: None: --vcpus, or the example's own count, or 1.
    vcpus: int | None = None


def add_parser(sub) -> None:
    from ..sched import DEFAULT_QUANTUM, Policy

    p = sub.add_parser(
        "sched",
        help="run several VMs on one host CPU under a scheduling policy",
        description="Run the vCPUs of several VMs on one host CPU and measure what each VM "
        "and vCPU gets: its share of host CPU time and of guest progress, its switches and "
        "what a switch costs. Policies: on-io (switch at every port-I/O exit), timer (round "
        "robin, preempted by a host timer), weighted (shares in proportion to the weights, "
        "deficit-based), threads (one host thread per vCPU; the host's scheduler decides). A "
        "VM's weight is the whole VM's share; its vCPUs share its slices. IMAGE is a file or a "
        "bundled example (neo, morpheus, spin, io-heavy, smp-sum...).",
    )
    p.add_argument(
        "--policy",
        choices=[x.value for x in Policy],
        default=Policy.WEIGHTED.value,
        help="how the CPU is shared (default weighted)",
    )
    p.add_argument(
        "--vm",
        dest="vms",
        action="append",
        type=_vm_arg,
        required=True,
        metavar="IMAGE[:WEIGHT[:VCPUS]]",
        help="a VM to run, with its weight (default 1) and vCPU count (default --vcpus); "
        "repeat for each VM, e.g. --vm neo:7 --vm smp-sum:3:4 (or smp-sum::4)",
    )
    p.add_argument(
        "--vcpus",
        type=_vcpus,
        metavar="N",
        help="vCPUs of every VM that does not give its own (default: a bundled example's "
        "own count, else 1)",
    )
    p.add_argument(
        "--mode",
        choices=[m.value for m in Mode],
        help="CPU mode of every VM (default: the image's)",
    )
    p.add_argument(
        "--mem",
        type=guest_memory,
        default="64M",
        metavar="SIZE",
        help="guest RAM of each VM (default 64M)",
    )
    p.add_argument(
        "--accel", choices=("kvm", "unicorn"),
        help="CPU backend of every VM (default kvm; unicorn where /dev/kvm is not usable)",
    )  # fmt: skip
    p.add_argument(
        "--quantum",
        type=_quantum,
        default=DEFAULT_QUANTUM,
        metavar="TIME",
        help="slice length for timer and weighted, e.g. 10ms (default 10ms)",
    )
    p.add_argument(
        "--holder-grace",
        type=_grace,
        default=0.0,
        metavar="TIME",
        help="stretch a slice once, by up to TIME, for a vCPU that announces a held spinlock "
        "(kvmpy/spinlock.h); it yields when it releases it (default 0: off)",
    )
    p.add_argument(
        "--duration",
        type=_duration,
        default=5.0,
        metavar="TIME",
        help="how long to run, e.g. 5s (default 5s); the run also ends when every VM has stopped",
    )
    p.add_argument(
        "--cpu",
        type=_cpus,
        metavar="N[,N...]",
        help="host CPU to run every VM on (default: the last one this process may use); the "
        "threads policy may be given several, e.g. 0,1",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument(
        "--plot",
        type=_plot_path,
        metavar="FILE",
        help="write each VM's cumulative share over time (.png/.svg/.pdf)",
    )
    p.set_defaults(func=cmd_sched)


# --- argument types (argparse turns their errors into usage errors, exit status 2) -------------


def _vm_arg(text: str) -> VmArg:
    """IMAGE, IMAGE:WEIGHT or IMAGE:WEIGHT:VCPUS (WEIGHT may be empty: IMAGE::VCPUS). An
    existing file whose name contains ':' is taken whole."""
    if Path(text).exists():
        return VmArg(text, 1.0)
    image, sep, last = text.rpartition(":")
    if not sep:
        return VmArg(text, 1.0)
    fields = [last]
    if ":" in image and not Path(image).exists():
        image, _, middle = image.rpartition(":")
        fields = [middle, last]
    if not image:
        raise argparse.ArgumentTypeError(f"no image in {text!r} (use IMAGE[:WEIGHT[:VCPUS]])")
    weight = 1.0
    if fields[0]:
        try:
            weight = float(fields[0])
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"the weight in {text!r} is not a number (use IMAGE[:WEIGHT[:VCPUS]], e.g. "
                "neo:7 or smp-sum:1:4)"
            ) from None
        if not (weight > 0 and weight != float("inf")):
            raise argparse.ArgumentTypeError(
                f"weights must be positive numbers (got {fields[0]!r})"
            )
    vcpus = None
    if len(fields) == 2:
        try:
            vcpus = _vcpus(fields[1])
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"the vCPU count in {text!r}: {e}") from None
    return VmArg(image, weight, vcpus)


def _vcpus(text: str) -> int:
    try:
        n = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a vCPU count: {text!r}") from None
    if not 1 <= n <= MAX_CPUS:
        raise argparse.ArgumentTypeError(f"a VM has 1 to {MAX_CPUS} vCPUs (got {n})")
    return n


def _time(text: str, what: str) -> float:
    from ..sched import SchedError, parse_duration

    try:
        value = parse_duration(text)
    except SchedError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if duration_problem(value) is not None:
        raise argparse.ArgumentTypeError(
            f"the {what} must be positive, finite and at most {MAX_DURATION_S} s (30 days) "
            f"(got {text!r})"
        )
    return value


def _quantum(text: str) -> float:
    from ..sched import MIN_QUANTUM

    value = _time(text, "quantum")
    if round(value * 1e9) < round(MIN_QUANTUM * 1e9):
        raise argparse.ArgumentTypeError(
            f"the quantum must be at least {MIN_QUANTUM * 1e6:.0f}us (got {text!r})"
        )
    return value


def _duration(text: str) -> float:
    return _time(text, "duration")


def _grace(text: str) -> float:
    from ..sched import SchedError, parse_duration

    try:
        return parse_duration(text)
    except SchedError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cpus(text: str) -> int | list[int]:
    from ..benchmarks import cpu_number

    cpus = [cpu_number(t.strip()) for t in text.split(",")]
    if len(set(cpus)) != len(cpus):
        raise argparse.ArgumentTypeError(f"a CPU is listed twice in {text!r}")
    return cpus[0] if len(cpus) == 1 else cpus


def _plot_path(text: str) -> Path:
    from ..benchmarks import plot_path

    return plot_path(text)


# --- the command -------------------------------------------------------------------------------


class _Tail:
    """The last OUTPUT_TAIL bytes a guest printed."""

    def __init__(self) -> None:
        self.data = bytearray()

    def __call__(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > OUTPUT_TAIL:
            del self.data[: len(self.data) - OUTPUT_TAIL]


def cmd_sched(args) -> int:
    from ..signals import exit_status

    try:
        return _sched(args)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM before the schedule started (building)
        print("kvmpy: interrupted", file=sys.stderr)
        return exit_status(e)


def _sched(args) -> int:
    from rich.console import Console

    from ..loader import load_file
    from ..machine import Machine, MachineConfig
    from ..sched import Scheduler, SchedVM, plot
    from .run import default_vcpus, resolve_image

    mode_arg = Mode(args.mode) if args.mode else None
    err = Console(stderr=True, highlight=False)
    with ExitStack() as stack:
        specs, tails = [], []
        for vm in args.vms:
            path, mode = resolve_image(vm.image, mode_arg)
            image = load_file(path)
            mode = mode or image.mode_hint or (Mode.PROTECTED if image.bits == 32 else Mode.LONG)
            tail = _Tail()
            vcpus = vm.vcpus or args.vcpus or default_vcpus(vm.image, path)
            machine = stack.enter_context(
                Machine(
                    MachineConfig(
                        mode=mode, memory=args.mem, accel=args.accel or "auto", vcpus=vcpus
                    ),
                    console=tail,
                    capture_output=False,
                )  # fmt: skip
            )
            machine.load(image)
            specs.append(SchedVM(machine, vm.weight, name=_name(vm.image)))
            tails.append(tail)
        sched = Scheduler(
            specs,
            args.policy,
            quantum=args.quantum,
            cpu=args.cpu,
            holder_grace=args.holder_grace,
        )
        ignored = not sched.uses_weights and len(set(sched.weights)) > 1
        if ignored and not args.json:
            err.print(
                f"[yellow]note[/]: the {sched.policy_name} policy shares the CPU equally; "
                "weights count under weighted and threads"
            )
        live = None if args.json or not err.is_terminal else _LiveView(err, args.duration)
        if live is not None:
            stack.enter_context(live)
        result = sched.run(
            args.duration,
            handle_sigint=True,
            on_tick=live.update if live is not None else None,
        )
        if live is not None:
            live.close()
        outputs = [bytes(t.data) for t in tails]
    # Results first: a plot that cannot be written must not cost the user the figures.
    if args.json:
        sys.stdout.write(json.dumps(result.to_dict()) + "\n")
        sys.stdout.flush()
    else:
        out = Console(highlight=False)
        out.print(result.rich_table())
        out.print(result.summary_line())
        for v in result.vms:
            if v.state != "running":
                # Plain writes: guest-controlled text (disassembly) must not meet rich markup.
                when = f" at {v.stopped_at_s:.2f} s" if v.stopped_at_s is not None else ""
                on = f" on cpu{v.stop_cpu}" if v.stop_cpu is not None else ""
                sys.stdout.write(f"{v.name}: {v.state}{on}{when}: {v.message}\n")
        for v, data in zip(result.vms, outputs, strict=True):
            if data:
                text = data.decode("utf-8", "replace").rstrip("\n")
                sys.stdout.write("".join(f"[{v.name}] {line}\n" for line in text.splitlines()))
        sys.stdout.flush()
    if args.plot:
        plot(result, args.plot)
        if not args.json:
            Console(highlight=False).print(f"plot: {args.plot}")
    if result.interrupted:
        return 128 + (sched.signal or 2)
    return 0


def _name(image: str) -> str:
    base = Path(image).name
    return base.split(".")[0] or base


class _LiveView:
    """Per-VM shares so far, redrawn on stderr from the scheduling loop (no refresh thread:
    it would take the GIL and the CPU from the VMs it is measuring)."""

    def __init__(self, console, duration: float | None):
        from rich.live import Live

        self.duration = duration
        self.live = Live(console=console, auto_refresh=False, transient=True)
        self._open = False

    def __enter__(self) -> _LiveView:
        self.live.__enter__()
        self._open = True
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._open:
            self._open = False
            self.live.__exit__(None, None, None)

    def update(self, snap) -> None:
        self.live.update(self.render(snap), refresh=True)

    def render(self, snap):
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        total = f" / {self.duration:g} s" if self.duration else ""
        table = Table(
            title=f"{snap.policy}: {snap.duration_s:.1f} s{total}", title_justify="left", box=None
        )
        table.add_column("VM")
        table.add_column("target", justify="right")
        table.add_column("host share")
        table.add_column("", justify="right")
        table.add_column("progress", justify="right")
        table.add_column("switches", justify="right")
        table.add_column("state")
        for v in snap.vms:
            share = v.host_share or 0.0
            table.add_row(
                Text(v.name),
                f"{v.target_share * 100:.1f} %",
                ProgressBar(total=1.0, completed=share, width=24),
                f"{share * 100:.1f} %",
                f"{v.progress_share * 100:.1f} %" if v.progress_share is not None else "–",
                str(v.switches),
                v.state,
            )
        return table
