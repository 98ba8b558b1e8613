"""`kvmpy bench exits`: the hypercall round trip of kvmpy against a minimal C VMM.

One guest makes N `num_exits` hypercalls in a loop and then the exit hypercall (N+1 exits).
Every round runs it three times, pinned to one CPU, in this order:

  c             exitloop (bench_src/exitloop.c, gcc -O2), a minimal C VMM: KVM_RUN, read the
                hypercall number, write rax through SYNC_REGS, repeat
  python_floor  a kvmpy Machine driven by a bare Python loop: fcntl.ioctl(KVM_RUN), write rax and
                kvm_dirty_regs, nothing else; no Python VMM can be faster than this
  kvmpy         the same Machine, run by `Machine.run()`: decode, dispatch, hypercall
                handler, exit statistics

Interleaving the sides (rather than running all C runs, then all kvmpy runs) spreads the host's
slow drifts over both; the medians of the runs are compared. The floor splits kvmpy's extra
time in two: floor - C is the price of the interpreter and the ioctl wrapper, kvmpy - floor the
price of kvmpy's own loop. Each side's time is the wall time from the first KVM_RUN to the end
of the exit hypercall, divided by the exits; VM creation and image loading are not timed.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import (
    BenchmarkError,
    build_c,
    cpu_number,
    default_cpu,
    format_cpus,
    median,
    pinned,
    plot_path,
    positive_int,
    report,
    save_figure,
    write_cached,
)

GOAL = 1.25
DEFAULT_EXITS = 100_000
DEFAULT_RUNS = 5
# The methodology; fewer is allowed for quick looks but says so.
METHOD_EXITS = 100_000
METHOD_RUNS = 5
# The loop counter is ecx, and N = 0 would wrap it to 2^32 iterations.
MAX_EXITS = 0xFFFF_FFFF
MODES = ("long", "long-user")
# exitloop maps 16 MiB of guest RAM; kvmpy gets the same so both guests see the same memory.
MEMORY = "16M"
SIDES = ("c", "python_floor", "kvmpy")
LABELS = {
    "c": "C exitloop (gcc -O2)",
    "python_floor": "Python floor",
    "kvmpy": "kvmpy",
}
HC_PORT = 0x500
HC_EXIT, HC_NUM_EXITS = 0, 3


def guest_image(n: int) -> bytes:
    """The benchmark guest: n `num_exits` hypercalls, then `exit(0)`; n + 1 exits in all.

        mov ecx, n              B9 <n:le32>
    1:  mov eax, 3              B8 03 00 00 00     hypercall 3, num_exits
        mov dx, 0x500           66 BA 00 05
        out dx, eax             EF                 the exit being measured
        dec ecx                 FF C9
        jnz 1b                  75 F2
        xor eax, eax            31 C0              hypercall 0, exit
        xor edi, edi            31 FF              exit code 0
        out dx, eax             EF

    The same bytes run in both modes: none of them depends on the privilege level.
    """
    if not 1 <= n <= MAX_EXITS:
        raise BenchmarkError(f"the exit count must be in 1..{MAX_EXITS} (got {n})")
    loop = bytes.fromhex("B8 03 00 00 00 66 BA 00 05 EF FF C9 75 F2")
    return b"\xb9" + n.to_bytes(4, "little") + loop + bytes.fromhex("31 C0 31 FF EF")


@dataclass(frozen=True)
class Sample:
    """One run of one side."""

    exits: int
    ns_per_exit: float
    #: kvmpy only: its own estimate of VMM time per exit (ExitStats, sampled).
    vmm_ns_per_exit: float | None = None


# --- the three sides ---------------------------------------------------------------------------


def run_c(binary: Path, image: Path, mode: str, exits: int) -> Sample:
    # Even at ~70 µs per exit (CPL3 on KVM-PVM) a run takes less than a tenth of this.
    timeout = 60 + exits * 1e-3
    try:
        proc = subprocess.run(
            [str(binary), str(image), mode], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"the C reference did not finish within {timeout:.0f} s") from None
    except OSError as e:
        raise BenchmarkError(f"could not start the C reference {binary}: {e.strerror}") from None
    if proc.returncode != 0:
        raise BenchmarkError(
            f"the C reference failed (exit status {proc.returncode}): "
            f"{proc.stderr.strip() or proc.stdout.strip() or 'no output'}"
        )
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        measured, ns, code = int(out["exits"]), float(out["ns_per_exit"]), int(out["exit_code"])
    except (IndexError, ValueError, KeyError, TypeError):
        raise BenchmarkError(
            f"the C reference printed no result line: {proc.stdout.strip()!r}"
        ) from None
    if code != 0:
        raise BenchmarkError(f"the guest under the C reference exited with code {code}, not 0")
    return Sample(measured, ns)


def _machine(image: bytes, mode: str):
    from ..loader import load_raw
    from ..machine import Machine, MachineConfig

    machine = Machine(MachineConfig(mode=mode, memory=MEMORY))
    try:
        machine.load(load_raw(image))
    except BaseException:
        machine.close()
        raise
    return machine


def run_kvmpy(image: bytes, mode: str) -> Sample:
    from ..result import StopReason

    with _machine(image, mode) as machine:
        result = machine.run()
    stats = result.stats
    if result.stop_reason is not StopReason.EXIT or result.exit_code != 0:
        raise BenchmarkError(
            f"the guest under kvmpy stopped with {result.stop_reason.value} "
            f"(code {result.exit_code}): {result.message}"
        )
    total = stats.total
    # loop_ns spans the first KVM_RUN to the exit hypercall: the window exitloop times.
    return Sample(total, stats.loop_ns / total, stats.est_total_vmm_ns / total)


def run_floor(image: bytes, mode: str, exits: int) -> Sample:
    """The cheapest loop Python can run on this guest: KVM_RUN, answer num_exits, repeat.

    It answers blindly (no decode, no checks) and looks only at the last exit, which must be
    the exit hypercall; anything else means the guest did something unexpected.
    """
    from ..kvm import constants as K
    from ..kvm import structs as S
    from ..kvm.vcpu import RUN_DIRTY_REGS, RUN_SYNC_REGS

    with _machine(image, mode) as machine:
        vcpu = machine.vcpus[0].fd
        u64 = vcpu.run_view.cast("Q")
        try:
            ioctl, fd, kvm_run = fcntl.ioctl, vcpu.fd, K.KVM_RUN
            rax = RUN_SYNC_REGS // 8 + S.GPR_NAMES.index("rax")
            dirty, sync = RUN_DIRTY_REGS // 8, K.KVM_SYNC_X86_REGS
            now = time.perf_counter_ns
            t0 = now()
            for i in range(exits - 1):
                ioctl(fd, kvm_run)
                u64[rax] = i  # what num_exits answers: the exits before this one
                u64[dirty] = sync
            ioctl(fd, kvm_run)
            elapsed = now() - t0
        except OSError as e:
            raise BenchmarkError(f"KVM_RUN failed in the Python floor loop: {e.strerror}") from None
        finally:
            u64.release()
        run = vcpu.run_struct
        io = run.io
        last_ok = (
            run.exit_reason == K.ExitReason.IO
            and io.direction == K.KVM_EXIT_IO_OUT
            and io.port == HC_PORT
            and io.size == 4
            and int.from_bytes(vcpu.run_view[io.data_offset : io.data_offset + 4], "little")
            == HC_EXIT
        )
        if not last_ok:
            raise BenchmarkError(
                "the guest under the Python floor loop did not end with the exit hypercall "
                f"after {exits} exits (last exit: {K.ExitReason.name_of(run.exit_reason)})"
            )
    return Sample(exits, elapsed / exits)


# --- the benchmark -----------------------------------------------------------------------------

OnRun = Callable[[str, int, Sample], None]


def run(
    exits: int = DEFAULT_EXITS,
    runs: int = DEFAULT_RUNS,
    mode: str = "long",
    cpu: int | None = None,
    *,
    cc: str = "gcc",
    on_start: Callable[[str, int], None] | None = None,
    on_run: OnRun | None = None,
) -> dict:
    """Run the benchmark; returns the JSON document `kvmpy bench exits --json` prints.

    `exits` is N, the guest's num_exits hypercalls; each run takes N + 1 exits. `on_start(side,
    round)` and `on_run(side, round, sample)` are called around every measured run (for
    progress display; nothing runs in between that is timed).
    """
    if mode not in MODES:
        raise BenchmarkError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    if runs < 1:
        raise BenchmarkError(f"runs must be at least 1 (got {runs})")
    cpu = default_cpu() if cpu is None else cpu
    allowed = os.sched_getaffinity(0)
    if cpu not in allowed:
        raise BenchmarkError(
            f"CPU {cpu} is not one this process may use (allowed: {format_cpus(allowed)})"
        )
    # Other work on a 2-core host is the main source of noise; record how busy it was.
    load = os.getloadavg()[0]
    image = guest_image(exits)
    binary = build_c("exitloop.c", cc)
    image_path = write_cached(f"exits-guest-{exits}.bin", image)
    total = exits + 1
    samples: dict[str, list[Sample]] = {side: [] for side in SIDES}
    measure = {
        "c": lambda: run_c(binary, image_path, mode, exits),
        "python_floor": lambda: run_floor(image, mode, total),
        "kvmpy": lambda: run_kvmpy(image, mode),
    }
    with pinned(cpu):
        for i in range(runs):
            for side in SIDES:
                if on_start:
                    on_start(side, i)
                sample = measure[side]()
                if sample.exits != total:
                    raise BenchmarkError(
                        f"{side} counted {sample.exits} exits, but the guest makes {total}"
                    )
                samples[side].append(sample)
                if on_run:
                    on_run(side, i, sample)
    doc = build_report(samples, mode=mode, exits=total, runs=runs, cpu=cpu)
    doc["load_average_at_start"] = round(load, 2)
    return doc


def build_report(
    samples: dict[str, list[Sample]], *, mode: str, exits: int, runs: int, cpu: int
) -> dict:
    sides = {
        side: {
            "exits": exits,
            "ns_per_exit_median": round(median([s.ns_per_exit for s in samples[side]]), 1),
            "runs_ns_per_exit": [round(s.ns_per_exit, 1) for s in samples[side]],
        }
        for side in SIDES
    }
    c = sides["c"]["ns_per_exit_median"]
    floor = sides["python_floor"]["ns_per_exit_median"]
    kvm = sides["kvmpy"]["ns_per_exit_median"]
    vmm = median([s.vmm_ns_per_exit or 0.0 for s in samples["kvmpy"]])
    ratio = round(kvm / c, 3)  # runs differ by ~2 %: a fourth digit would mean nothing
    gap = kvm - c
    breakdown = {
        # What a Python VMM pays before doing anything: CPython's loop and fcntl.ioctl.
        "interpreter_ns_per_exit": round(floor - c, 1),
        "floor_over_c": round(floor / c, 3),
        # What kvmpy's loop adds on top: decode, dispatch, the handler call, statistics.
        "kvmpy_loop_ns_per_exit": round(kvm - floor, 1),
        "kvmpy_over_floor": round(kvm / floor, 3),
        # kvmpy's own view of the same thing (ExitStats, one hypercall in 64 timed).
        "kvmpy_vmm_ns_per_exit": round(vmm, 1),
        "interpreter_share_of_gap": round((floor - c) / gap, 3) if gap > 0 else None,
        "kvmpy_loop_share_of_gap": round((kvm - floor) / gap, 3) if gap > 0 else None,
        # How much kvmpy's loop may cost above the floor for the goal to hold.
        "goal_budget_over_floor_ns": round(GOAL * c - floor, 1),
    }
    doc = {
        "benchmark": "exits",
        "mode": mode,
        "exits_per_run": exits,
        "runs": runs,
        "cpu": cpu,
        **sides,
        "ratio": ratio,
        "goal": GOAL,
        "goal_met": ratio <= GOAL,
        "breakdown": breakdown,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }
    if mode == "long-user":
        doc["note"] = (
            "CPL3 exits are dominated by the host's cost of trapping out of guest user mode "
            f"(the C loop's {c / 1e3:.1f} µs per exit is nearly all inside KVM_RUN), so the "
            "ratio here is flattering; long mode (CPL0) is the demanding case"
        )
    return doc


# --- output ------------------------------------------------------------------------------------


def _us(ns: float) -> str:
    return f"{ns / 1e3:.2f} µs"


def render(doc: dict, console) -> None:
    """The human view of a report: both VMMs, the ratio against the goal, and the breakdown."""
    from rich.table import Table

    mode = doc["mode"]
    cpl = "CPL3" if mode == "long-user" else "CPL0"
    table = Table(
        title=f"Exit round trip (µs): {mode} ({cpl}), "
        f"{doc['exits_per_run']:,} exits × {doc['runs']} runs, CPU {doc['cpu']}",
        title_justify="left",
    )
    table.add_column("VMM")
    table.add_column("median", justify="right")
    table.add_column("vs C", justify="right")
    table.add_column("each run, in order")
    c = doc["c"]["ns_per_exit_median"]
    for side in SIDES:
        d = doc[side]
        m = d["ns_per_exit_median"]
        table.add_row(
            LABELS[side],
            f"{m / 1e3:.2f}",
            f"{m / c:.3f}×",
            " ".join(f"{v / 1e3:.2f}" for v in d["runs_ns_per_exit"]),
            style="bold" if side == "kvmpy" else None,
        )
    console.print(table)
    verdict = "[green]met[/]" if doc["goal_met"] else "[red]not met[/]"
    console.print(
        f"ratio kvmpy / C = [bold]{doc['ratio']:.3f}[/]  (goal ≤ {doc['goal']}: {verdict})"
    )

    b = doc["breakdown"]
    floor = doc["python_floor"]["ns_per_exit_median"]
    bt = Table(title="Where the time per exit goes", title_justify="left")
    bt.add_column("part")
    bt.add_column("per exit", justify="right")
    bt.add_column("share of kvmpy − C", justify="right")
    bt.add_row("KVM_RUN round trip (the C loop)", _us(c), "")
    bt.add_row(
        "CPython + fcntl.ioctl (floor − C)",
        _us(b["interpreter_ns_per_exit"]),
        _share(b["interpreter_share_of_gap"]),
    )
    bt.add_row(
        "kvmpy's loop (kvmpy − floor)",
        _us(b["kvmpy_loop_ns_per_exit"]),
        # The complement, so the two shares add up to 100 % after rounding.
        _share(
            None if b["interpreter_share_of_gap"] is None else 1 - b["interpreter_share_of_gap"]
        ),
    )
    bt.add_row("  kvmpy's ExitStats VMM time", _us(b["kvmpy_vmm_ns_per_exit"]), "")
    console.print(bt)
    console.print(
        f"floor / C = {b['floor_over_c']:.3f}: the best a Python loop over fcntl.ioctl reaches "
        f"here; kvmpy / floor = {b['kvmpy_over_floor']:.3f}."
    )
    budget = b["goal_budget_over_floor_ns"]
    if doc["goal_met"]:
        console.print(f"The goal holds with {_us(_slack(doc))} per exit to spare.")
    elif budget <= 0:
        console.print(
            f"[red]Not reachable from Python this way[/]: the floor alone is "
            f"{_us(floor)}, above {doc['goal']} × C = {_us(doc['goal'] * c)}."
        )
    else:
        console.print(
            f"For the goal, kvmpy's loop may cost {_us(budget)} above the floor; it costs "
            f"{_us(b['kvmpy_loop_ns_per_exit'])}."
        )
    if "note" in doc:
        console.print(f"[yellow]note[/]: {doc['note']}.")


def _slack(doc: dict) -> float:
    return doc["goal"] * doc["c"]["ns_per_exit_median"] - doc["kvmpy"]["ns_per_exit_median"]


def _share(x: float | None) -> str:
    return f"{x * 100:.0f} %" if x is not None else "–"


def plot(doc: dict, path: Path) -> None:
    """Per-run µs/exit of the three sides, their medians, and the goal line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    FigureCanvasAgg(fig)  # Agg explicitly: no display needed, no pyplot global state
    ax = fig.add_subplot()
    colors = {"c": "tab:blue", "python_floor": "tab:gray", "kvmpy": "tab:orange"}
    for side in SIDES:
        values = [v / 1e3 for v in doc[side]["runs_ns_per_exit"]]
        runs = range(1, len(values) + 1)
        ax.plot(runs, values, marker="o", color=colors[side], label=LABELS[side])
        ax.axhline(doc[side]["ns_per_exit_median"] / 1e3, color=colors[side], lw=0.8, ls=":")
    goal = doc["goal"] * doc["c"]["ns_per_exit_median"] / 1e3
    ax.axhline(goal, color="tab:red", ls="--", lw=1, label=f"goal: {doc['goal']} × C median")
    ax.set_xlabel("run (interleaved: C, floor, kvmpy)")
    ax.set_ylabel("µs per exit")
    ax.set_xticks(list(range(1, doc["runs"] + 1)))
    top = max([goal] + [v / 1e3 for side in SIDES for v in doc[side]["runs_ns_per_exit"]])
    ax.set_ylim(0, top * 1.12)  # headroom: keep the highest run and the goal off the frame
    ax.set_title(
        f"kvmpy bench exits: {doc['mode']} mode, {doc['exits_per_run']:,} exits/run, "
        f"ratio {doc['ratio']:.3f}"
    )
    ax.legend(loc="lower right", fontsize="small")
    save_figure(fig, path, dpi=120)


# --- command line ------------------------------------------------------------------------------


def add_parser(sub) -> None:
    p = sub.add_parser(
        "exits",
        help="hypercall round trip: kvmpy against a minimal C VMM",
        description="Time a hypercall round trip (guest `out` to port 0x500, back into the "
        "guest) in kvmpy and in a minimal C VMM on the same guest, interleaved and pinned to one "
        "CPU, and a bare Python ioctl loop that shows where kvmpy's extra time goes. Prints the "
        "medians and the ratio kvmpy / C (goal: at most 1.25). The C reference is built with "
        "gcc on first use and cached.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument(
        "--exits",
        type=_exit_count,
        default=DEFAULT_EXITS,
        metavar="N",
        help=f"hypercalls per run (the guest makes N + 1 exits; default {DEFAULT_EXITS})",
    )
    p.add_argument(
        "--runs",
        type=positive_int,
        default=DEFAULT_RUNS,
        metavar="R",
        help=f"runs of each side (default {DEFAULT_RUNS})",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="long",
        help="CPU mode of the guest (default long: CPL0, the smallest kernel time, so the "
        "most demanding comparison)",
    )
    p.add_argument(
        "--cpu",
        type=cpu_number,
        metavar="N",
        help="CPU to pin both VMMs to (default: the last one this process may use)",
    )
    p.add_argument(
        "--plot", type=plot_path, metavar="FILE", help="write a plot of every run (.png/.svg/.pdf)"
    )
    p.set_defaults(func=cmd_exits)


def _exit_count(text: str) -> int:
    import argparse

    n = positive_int(text)
    if n > MAX_EXITS:
        raise argparse.ArgumentTypeError(f"at most {MAX_EXITS} (got {n})")
    return n


def cmd_exits(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = Console(stderr=True, highlight=False)
    if args.runs < METHOD_RUNS or args.exits < METHOD_EXITS:
        err.print(
            f"[yellow]note[/]: {args.runs} run(s) of {args.exits:,} exits; figures worth "
            f"quoting take ≥{METHOD_RUNS} runs of ≥{METHOD_EXITS:,} exits (the defaults), so "
            "treat these as a quick look"
        )
    # No auto-refresh: a refresh thread would take the GIL (and the pinned CPU) in the middle
    # of the Python sides' runs and bias the comparison against them.
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        auto_refresh=False,
        transient=True,
        disable=not err.is_terminal,
    )
    task = progress.add_task("starting", total=args.runs * len(SIDES))

    def on_start(side: str, i: int) -> None:
        progress.update(task, description=f"run {i + 1}/{args.runs}: {LABELS[side]}")
        progress.refresh()

    def on_run(side: str, i: int, sample: Sample) -> None:
        progress.advance(task)
        progress.refresh()

    try:
        with progress:
            doc = run(args.exits, args.runs, args.mode, args.cpu, on_start=on_start, on_run=on_run)
    except KeyboardInterrupt:
        err.print("kvmpy: interrupted")
        return 130
    return report(args, doc, render, plot)
