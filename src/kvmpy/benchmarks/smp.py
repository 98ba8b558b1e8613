"""kvmpy bench smp: how a CPL3 workload scales over vCPUs, and what an IPI costs.

The same fixed workload (the `smp-bench` example: 256 chunks of hashing handed out to the
vCPUs as they come) runs on 1, 2 and 4 vCPUs, interleaved, several times; the reference is the
1-vCPU run of the same round, so scaling is a same-run ratio. With 4 vCPUs on a 2-CPU host the
vCPUs are over-committed and scaling is bounded by the host CPUs. Wall time is the host clock
around `Machine.run()` (vCPU threads started, guest work, vCPUs joined), not VM creation.

The IPI figure comes from the `smp-ipi` example: CPU 0 sends an IPI to CPU 1 through the
x2APIC ICR and spins until CPU 1's answer arrives, 2000 times; the guest measures with
rdtsc, kvmpy converts with the vCPU's TSC frequency, and counts the VMM exits both vCPUs took
during the ping-pong (the goal is none: IPIs stay in the kernel).
"""

from __future__ import annotations

import os
import re
import statistics
import time
from pathlib import Path

from . import BenchmarkError, plot_path, positive_int, report

DEFAULT_RUNS = 3
VCPU_COUNTS = (1, 2, 4)
MEMORY = "64M"
GOAL_SCALING_2 = 1.85
IPI_ROUNDS = 2000

_BENCH = re.compile(rb"smp-bench: (\d+) vCPUs, (\d+) ticks, result ([0-9a-f]{16}), chunks ([\d ]+)")
_IPI = re.compile(rb"(\d+) round trips, mean (\d+) ticks, best (\d+) ticks")
_IPI_EXITS = re.compile(rb"exits during the ping-pong: cpu0 (-?\d+), cpu1 (-?\d+)")


def _run(image: Path, vcpus: int, timeout: float = 600.0) -> tuple[float, bytes, int]:
    from ..machine import Machine, MachineConfig
    from ..result import StopReason

    with Machine(MachineConfig(mode="long-user", memory=MEMORY, vcpus=vcpus)) as m:
        m.load_file(image)
        khz = m.vcpus[0].fd.get_tsc_khz()
        t0 = time.perf_counter()
        result = m.run(timeout=timeout)
        wall = time.perf_counter() - t0
    if result.stop_reason is not StopReason.EXIT or result.exit_code != 0:
        raise BenchmarkError(f"the {vcpus}-vCPU run failed: {result.message}")
    return wall, result.output, khz


def measure(runs: int = DEFAULT_RUNS, on_run=None) -> dict:
    from ..sdk.examples import find_example

    bench = find_example("smp-bench").build()
    ipi = find_example("smp-ipi").build()
    load = os.getloadavg()[0]
    walls: dict[int, list[float]] = {n: [] for n in VCPU_COUNTS}
    ratios: dict[int, list[float]] = {n: [] for n in VCPU_COUNTS}
    chunks: dict[int, list[list[int]]] = {n: [] for n in VCPU_COUNTS}
    answers = set()
    for r in range(runs):
        this_round = {}
        # Interleaved, so load on the host hits every vCPU count alike.
        for n in VCPU_COUNTS:
            wall, out, _khz = _run(bench, n)
            m = _BENCH.search(out)
            if m is None or int(m.group(1)) != n:
                raise BenchmarkError(f"the {n}-vCPU run printed no result: {out[-200:]!r}")
            answers.add(m.group(3))
            chunks[n].append([int(x) for x in m.group(4).split()])
            walls[n].append(wall)
            this_round[n] = wall
        for n in VCPU_COUNTS:
            ratios[n].append(this_round[1] / this_round[n])
        if on_run is not None:
            on_run(r)
    if len(answers) != 1:
        raise BenchmarkError("the runs disagree on the workload's result")
    rtts, bests, exits = [], [], []
    khz = 0
    for _ in range(runs):
        _wall, out, khz = _run(ipi, 2)
        m, e = _IPI.search(out), _IPI_EXITS.search(out)
        if m is None or e is None:
            raise BenchmarkError(f"the IPI ping-pong printed no result: {out[-200:]!r}")
        rounds = int(m.group(1))
        rtts.append(int(m.group(2)) / khz * 1e3)  # ticks / kHz = ms; * 1e3 = µs
        bests.append(int(m.group(3)) / khz * 1e3)
        exits.append((int(e.group(1)) + int(e.group(2))) / (2 * rounds))
    scaling = {str(n): round(statistics.median(ratios[n]), 3) for n in VCPU_COUNTS}
    return {
        "benchmark": "smp",
        "runs": runs,
        "host_cpus": len(os.sched_getaffinity(0)),
        "load_average_at_start": round(load, 2),
        "workload": "smp-bench: 256 chunks of 2^17 hash steps at CPL3",
        "wall_s": {str(n): [round(w, 4) for w in walls[n]] for n in VCPU_COUNTS},
        "wall_s_median": {str(n): round(statistics.median(walls[n]), 4) for n in VCPU_COUNTS},
        "scaling": scaling,
        "scaling_spread": {
            str(n): [round(min(ratios[n]), 3), round(max(ratios[n]), 3)] for n in VCPU_COUNTS
        },
        "chunks_per_vcpu": {str(n): chunks[n] for n in VCPU_COUNTS},
        "ipi": {
            "round_trip_us": round(statistics.median(rtts), 2),
            "round_trip_us_runs": [round(x, 2) for x in rtts],
            "best_round_trip_us": round(min(bests), 2),
            "userspace_exits_per_ipi": statistics.median(exits),
            "rounds_per_run": IPI_ROUNDS,
            "tsc_khz": khz,
        },
        "goal": {"scaling_2": GOAL_SCALING_2, "userspace_exits_per_ipi": 0},
        "goal_met": {
            "scaling_2": scaling["2"] >= GOAL_SCALING_2,
            "userspace_exits_per_ipi": statistics.median(exits) == 0,
        },
    }


def render(doc: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"CPL3 workload over vCPUs ({doc['runs']} runs, {doc['host_cpus']} host CPUs)")
    for col in ("vCPUs", "wall (median)", "scaling vs 1 vCPU", "spread"):
        t.add_column(col, justify="right")
    for n in doc["scaling"]:
        lo, hi = doc["scaling_spread"][n]
        t.add_row(n, f"{doc['wall_s_median'][n]:.3f} s", f"{doc['scaling'][n]:.2f}x",
                  f"{lo:.2f}-{hi:.2f}")  # fmt: skip
    console.print(t)
    ipi = doc["ipi"]
    console.print(
        f"IPI round trip: {ipi['round_trip_us']:.1f} µs median (best {ipi['best_round_trip_us']:.1f}"
        f" µs), {ipi['userspace_exits_per_ipi']:g} userspace exits per IPI"
    )
    met = doc["goal_met"]
    console.print(
        f"goal: 2 vCPUs >= {doc['goal']['scaling_2']}x: {'met' if met['scaling_2'] else 'NOT met'}"
        f"; 0 exits per IPI: {'met' if met['userspace_exits_per_ipi'] else 'NOT met'}"
        f" (load average at start {doc['load_average_at_start']})"
    )


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import save_figure

    ns = [int(n) for n in doc["scaling"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ns, [doc["scaling"][str(n)] for n in ns], "o-", label="kvmpy")
    ax.plot(ns, [min(n, doc["host_cpus"]) for n in ns], "--", color="grey",
            label=f"ideal on {doc['host_cpus']} host CPUs")  # fmt: skip
    ax.set_xlabel("vCPUs")
    ax.set_ylabel("speed-up vs 1 vCPU")
    ax.set_xticks(ns)
    ax.legend()
    ax.set_title("CPL3 workload scaling")
    save_figure(fig, path)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "smp",
        help="SMP scaling of a CPL3 workload and the IPI round trip",
        description="Run a fixed CPL3 workload on 1, 2 and 4 vCPUs (interleaved; scaling is the "
        "ratio to the 1-vCPU run of the same round; goal: 2 vCPUs on 2 idle host CPUs at least "
        f"{GOAL_SCALING_2}x) and an IPI ping-pong between two vCPUs (round trip, and userspace "
        "exits per IPI: goal 0).",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--runs", type=positive_int, default=DEFAULT_RUNS, metavar="R",
                   help=f"rounds (default {DEFAULT_RUNS}); figures are medians")  # fmt: skip
    p.add_argument("--plot", type=plot_path, metavar="FILE", help="write a plot (.png/.svg/.pdf)")
    p.set_defaults(func=cmd_smp)


def cmd_smp(args) -> int:
    from rich.console import Console

    err = Console(stderr=True, highlight=False)

    def on_run(i: int) -> None:
        if err.is_terminal:
            err.print(f"round {i + 1}/{args.runs} done")

    doc = measure(args.runs, on_run)
    return report(args, doc, render, plot)
