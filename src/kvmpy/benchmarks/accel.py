"""`kvmpy bench accel`: the same guests on both CPU backends, KVM and unicorn, in one run.

Four measurements, each on both backends, interleaved (kvm, unicorn, kvm, ...) and pinned to
one CPU; the medians of the runs are compared:

  cpl0_loop     an integer hash kernel (splitmix-style: add, shifts, xors, a multiply; 10
                instructions an iteration, registers only) in long mode at CPL0: ns per guest
                instruction. On a software KVM (KVM-PVM) ring-0 code is emulated instruction by
                instruction; unicorn translates it once and runs it as host code.
  cpl3_loop     the same kernel in long-user mode at CPL3, which KVM runs natively. (A bare
                `dec ecx; jnz` loop is unicorn's worst case: unicorn checks for a stop request
                in a helper call at the start of every translated block, here every 2
                instructions; docs/backends.md gives that figure too.)
  hypercall     the round trip of a `num_exits` hypercall (bench exits' guest), at CPL0 and at
                CPL3; the minimal C VMM of `kvmpy bench exits` runs the same guest at CPL0 on
                KVM as the floor any KVM VMM has.
  create        from `Machine(...)` to the guest's first instruction (its first exit): VM and
                memory creation, the boot structures, the vCPU thread.

Loop lengths are calibrated per backend so each run takes about TARGET_S seconds (a fixed
count would take minutes on one backend and microseconds on the other).

Goals (issue 13, closing note): the CPL0 loop at least 100x faster on unicorn than on KVM,
the CPL3 loop on unicorn within 10x of KVM's.
"""

from __future__ import annotations

import platform
import struct
import time
from collections.abc import Callable
from pathlib import Path

from . import (
    BenchmarkError,
    build_c,
    cpu_number,
    default_cpu,
    median,
    pinned,
    plot_path,
    positive_int,
    report,
    save_figure,
    write_cached,
)

BACKENDS = ("kvm", "unicorn")
DEFAULT_RUNS = 3
TARGET_S = 0.25
MEMORY = "16M"
GOAL_CPL0_SPEEDUP = 100.0
GOAL_CPL3_SLOWDOWN = 10.0
MAX_ITERATIONS = 0xFFFF_FFFF  # the loop counter is ecx

LABELS = {
    "cpl0_loop": "CPL0 compute loop",
    "cpl3_loop": "CPL3 compute loop",
    "hypercall_cpl0": "hypercall round trip, CPL0",
    "hypercall_cpl3": "hypercall round trip, CPL3",
    "create": "VM create to first instruction",
}
UNITS = {
    "cpl0_loop": "ns/insn",
    "cpl3_loop": "ns/insn",
    "hypercall_cpl0": "µs",
    "hypercall_cpl3": "µs",
    "create": "ms",
}


#: Instructions per iteration of the kernel, and outside the loop.
KERNEL_INSNS, KERNEL_EXTRA = 10, 7


def loop_image(iterations: int) -> bytes:
    """The compute kernel, `iterations` times, then the exit hypercall:

        mov ecx, N;  mov rax, 0x123456789;  mov rdx, 0x9E3779B97F4A7C15
    1:  add rax, rdx;  mov rsi, rax;  shr rsi, 30;  xor rax, rsi
        imul rax, rax, 0x1b873593;  mov rsi, rax;  shr rsi, 27;  xor rax, rsi
        dec ecx;  jnz 1b
        mov dx, 0x500;  xor eax, eax;  xor edi, edi;  out dx, eax
    """
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise BenchmarkError(f"loop iterations must be in 1..{MAX_ITERATIONS}")
    return (
        b"\xb9" + struct.pack("<I", iterations)
        + bytes.fromhex(
            "48b88967452301000000" "48ba157c4a7fb979379e"
            "4801d0" "4889c6" "48c1ee1e" "4831f0" "4869c09335871b" "4889c6" "48c1ee1b"
            "4831f0" "ffc9" "75de"
            "66ba0005" "31c0" "31ff" "ef"
        )
    )  # fmt: skip


def first_exit_image() -> bytes:
    """The exit hypercall as the very first instructions."""
    return b"\x66\xba\x00\x05\x31\xc0\x31\xff\xef"


def _machine(accel: str, mode: str, image: bytes):
    from ..loader import load_raw
    from ..machine import Machine, MachineConfig

    m = Machine(MachineConfig(mode=mode, memory=MEMORY, accel=accel))
    try:
        m.load(load_raw(image))
    except BaseException:
        m.close()
        raise
    return m


def _run(m, what: str):
    from ..result import StopReason

    result = m.run(timeout=300)
    if result.stop_reason is not StopReason.EXIT or result.exit_code != 0:
        raise BenchmarkError(
            f"the {what} guest stopped with {result.stop_reason.value}: {result.message}"
        )
    return result


def time_loop(accel: str, mode: str, iterations: int) -> float:
    """Nanoseconds per guest instruction of the loop, from the vCPU's own loop time."""
    with _machine(accel, mode, loop_image(iterations)) as m:
        result = _run(m, f"{mode} loop")
    return result.stats.loop_ns / (KERNEL_INSNS * iterations + KERNEL_EXTRA)


def time_hypercalls(accel: str, mode: str, exits: int) -> float:
    """Nanoseconds per hypercall round trip (bench exits' guest, `exits` + 1 exits)."""
    from .exits import guest_image

    with _machine(accel, mode, guest_image(exits)) as m:
        result = _run(m, f"{mode} hypercall")
    return result.stats.loop_ns / result.stats.total


def time_create(accel: str) -> float:
    """Nanoseconds from Machine() to the guest's first instruction (its exit hypercall)."""
    from ..hypercalls import HC_EXIT, GuestExit
    from ..loader import load_raw
    from ..machine import Machine, MachineConfig

    seen: list[int] = []

    def first(ctx, code, *_):
        seen.append(time.perf_counter_ns())
        raise GuestExit(0)

    t0 = time.perf_counter_ns()
    with Machine(MachineConfig(mode="long", memory=MEMORY, accel=accel)) as m:
        m.hypercalls.register(HC_EXIT, first, "exit", replace=True)
        m.load(load_raw(first_exit_image()))
        _run(m, "create")
    if not seen:
        raise BenchmarkError("the create guest never reached its first instruction")
    return seen[0] - t0


def calibrate(
    measure: Callable[[int], float], start: int, cap: int, target_s: float = TARGET_S
) -> int:
    """The count that makes one run take about TARGET_S. `measure(n)` returns the run's
    nanoseconds per unit; trial runs grow tenfold until fixed costs (thread start, the first
    translation) are a small part of one, then the count is scaled to the target."""
    n = start
    while True:
        per_unit = measure(n)
        elapsed_s = per_unit * n * 1e-9
        if elapsed_s >= target_s / 10 or n >= cap:
            break
        n = min(n * 10, cap)
    return max(1, min(int(n * target_s / max(elapsed_s, 1e-9)), cap))


def available(accel: str) -> str | None:
    """None if `accel` can run here, else why not."""
    if accel == "unicorn":
        from ..hv.unicorn import unavailable

        return unavailable()
    from ..errors import KvmpyError
    from ..kvm import Kvm

    try:
        Kvm().close()
    except KvmpyError as e:
        return str(e)
    return None


OnRun = Callable[[str, str, int], None]


def run(
    runs: int = DEFAULT_RUNS,
    cpu: int | None = None,
    on_run: OnRun | None = None,
    target_s: float = TARGET_S,
) -> dict:
    """Measure both backends (those usable here); `target_s` is how long one run lasts."""
    cpu = default_cpu() if cpu is None else cpu
    backends = {}
    missing = {}
    for b in BACKENDS:
        problem = available(b)
        if problem is None:
            backends[b] = {}
        else:
            missing[b] = problem
    if not backends:
        raise BenchmarkError("neither backend can run here: " + "; ".join(missing.values()))
    samples: dict[str, dict[str, list[float]]] = {b: {k: [] for k in LABELS} for b in backends}
    counts: dict[str, dict[str, int]] = {b: {} for b in backends}
    c_ns: list[float] = []
    c_binary = c_image = None
    with pinned(cpu):
        for b in backends:
            # Counts so that each run lasts ~TARGET_S on this backend.
            for mode, key in (("long", "cpl0_loop"), ("long-user", "cpl3_loop")):
                counts[b][key] = calibrate(
                    lambda n, b=b, mode=mode: KERNEL_INSNS * time_loop(b, mode, n),
                    100,
                    MAX_ITERATIONS,
                )
            for mode, key in (("long", "hypercall_cpl0"), ("long-user", "hypercall_cpl3")):
                counts[b][key] = calibrate(
                    lambda n, b=b, mode=mode: time_hypercalls(b, mode, n),
                    100,
                    1_000_000,
                    target_s,
                )
        if "kvm" in backends:
            from .exits import guest_image, run_c

            exits = counts["kvm"]["hypercall_cpl0"]
            try:
                c_binary = build_c("exitloop.c")
                c_image = write_cached("accel-exits.bin", guest_image(exits))
            except BenchmarkError as e:
                missing["c"] = str(e)
        for i in range(runs):
            for b in backends:
                n = counts[b]
                for key in LABELS:
                    if key == "create":
                        value = time_create(b)
                    elif key.endswith("loop"):
                        mode = "long" if key == "cpl0_loop" else "long-user"
                        value = time_loop(b, mode, n[key])
                    else:
                        mode = "long" if key == "hypercall_cpl0" else "long-user"
                        value = time_hypercalls(b, mode, n[key])
                    samples[b][key].append(value)
                    if on_run is not None:
                        on_run(b, key, i)
            if c_binary is not None:
                c_ns.append(run_c(c_binary, c_image, "long", counts["kvm"]["hypercall_cpl0"] + 1)
                            .ns_per_exit)  # fmt: skip
    return build_report(samples, counts, c_ns, runs, cpu, missing)


def build_report(samples, counts, c_ns, runs, cpu, missing) -> dict:
    med = {b: {k: median(v) for k, v in s.items()} for b, s in samples.items()}
    doc: dict = {
        "benchmark": "accel",
        "runs": runs,
        "cpu": cpu,
        "backends": {
            b: {
                "cpl0_ns_per_insn": round(m["cpl0_loop"], 3),
                "cpl3_ns_per_insn": round(m["cpl3_loop"], 3),
                "cpl0_mips": round(1e3 / m["cpl0_loop"], 1),
                "cpl3_mips": round(1e3 / m["cpl3_loop"], 1),
                "hypercall_cpl0_us": round(m["hypercall_cpl0"] / 1e3, 3),
                "hypercall_cpl3_us": round(m["hypercall_cpl3"] / 1e3, 3),
                "create_ms": round(m["create"] / 1e6, 3),
                "counts": counts[b],
                "samples": {k: [round(x, 3) for x in v] for k, v in samples[b].items()},
            }
            for b, m in med.items()
        },
        "unavailable": missing,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }
    if c_ns:
        doc["c_hypercall_cpl0_us"] = round(median(c_ns) / 1e3, 3)
    if "kvm" in med and "unicorn" in med:
        k, u = med["kvm"], med["unicorn"]
        doc["ratios"] = {
            "cpl0_speedup": round(k["cpl0_loop"] / u["cpl0_loop"], 1),
            "cpl3_slowdown": round(u["cpl3_loop"] / k["cpl3_loop"], 2),
            "hypercall_cpl0_speedup": round(k["hypercall_cpl0"] / u["hypercall_cpl0"], 2),
            "hypercall_cpl3_speedup": round(k["hypercall_cpl3"] / u["hypercall_cpl3"], 2),
            "create_ratio": round(u["create"] / k["create"], 2),
        }
        if c_ns:
            doc["ratios"]["hypercall_cpl0_vs_c"] = round(u["hypercall_cpl0"] / median(c_ns), 3)
        r = doc["ratios"]
        doc["goals"] = {
            "cpl0_speedup_at_least": GOAL_CPL0_SPEEDUP,
            "cpl3_slowdown_at_most": GOAL_CPL3_SLOWDOWN,
            "cpl0_met": r["cpl0_speedup"] >= GOAL_CPL0_SPEEDUP,
            "cpl3_met": r["cpl3_slowdown"] <= GOAL_CPL3_SLOWDOWN,
        }
    return doc


# --- output ------------------------------------------------------------------------------------

_FIELDS = {
    "cpl0_loop": ("cpl0_ns_per_insn", 1.0),
    "cpl3_loop": ("cpl3_ns_per_insn", 1.0),
    "hypercall_cpl0": ("hypercall_cpl0_us", 1.0),
    "hypercall_cpl3": ("hypercall_cpl3_us", 1.0),
    "create": ("create_ms", 1.0),
}
_RATIO = {
    "cpl0_loop": ("cpl0_speedup", "unicorn {}x faster"),
    "cpl3_loop": ("cpl3_slowdown", "unicorn {}x slower"),
    "hypercall_cpl0": ("hypercall_cpl0_speedup", "unicorn {}x faster"),
    "hypercall_cpl3": ("hypercall_cpl3_speedup", "unicorn {}x faster"),
    "create": ("create_ratio", "unicorn takes {}x"),
}


def render(doc: dict, console) -> None:
    from rich.table import Table

    backends = list(doc["backends"])
    table = Table(title=f"kvm against unicorn, median of {doc['runs']} runs (CPU {doc['cpu']})")
    table.add_column("measurement")
    for b in backends:
        table.add_column(b, justify="right")
    table.add_column("ratio")
    ratios = doc.get("ratios", {})
    for key, label in LABELS.items():
        field, _ = _FIELDS[key]
        cells = [f"{doc['backends'][b][field]:g} {UNITS[key]}" for b in backends]
        rkey, fmt = _RATIO[key]
        table.add_row(label, *cells, fmt.format(ratios[rkey]) if rkey in ratios else "")
    console.print(table)
    if "c_hypercall_cpl0_us" in doc:
        line = f"minimal C VMM on KVM, CPL0 hypercall: {doc['c_hypercall_cpl0_us']:g} µs"
        if "hypercall_cpl0_vs_c" in ratios:
            line += f" (unicorn takes {ratios['hypercall_cpl0_vs_c']:g}x the C VMM's time)"
        console.print(line)
    goals = doc.get("goals")
    if goals:
        for met, text in (
            (goals["cpl0_met"], f"CPL0 at least {GOAL_CPL0_SPEEDUP:g}x faster on unicorn"),
            (goals["cpl3_met"], f"CPL3 on unicorn within {GOAL_CPL3_SLOWDOWN:g}x of KVM"),
        ):
            console.print(f"goal: {text}: " + ("[green]met[/]" if met else "[red]not met[/]"))
    for b, why in doc.get("unavailable", {}).items():
        console.print(f"[yellow]{b} not measured[/]: {why}")


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(doc["backends"])
    keys = list(LABELS)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.6))
    for ax, key in zip(axes, keys, strict=True):
        field, _ = _FIELDS[key]
        values = [doc["backends"][b][field] for b in backends]
        ax.bar(backends, values, color=["#4c72b0", "#dd8452"][: len(backends)])
        ax.set_title(LABELS[key], fontsize=9)
        ax.set_ylabel(UNITS[key])
        if key.endswith("loop"):
            ax.set_yscale("log")
    fig.suptitle("kvmpy bench accel: KVM and unicorn on the same guests")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# --- command line ------------------------------------------------------------------------------


def add_parser(sub) -> None:
    p = sub.add_parser(
        "accel",
        help="the same guests on the KVM and unicorn backends, with ratios",
        description="Run a CPL0 compute loop, a CPL3 compute loop, the hypercall round trip "
        "(CPL0 and CPL3) and VM creation to the first instruction on both CPU backends, "
        "interleaved and pinned to one CPU, and print the medians and the ratios (goals: CPL0 "
        "at least 100x faster on unicorn, CPL3 within 10x of KVM). Where /dev/kvm is not "
        "usable, unicorn alone is measured.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument(
        "--runs", type=positive_int, default=DEFAULT_RUNS, metavar="R",
        help=f"runs of each measurement on each backend (default {DEFAULT_RUNS})",
    )  # fmt: skip
    p.add_argument("--cpu", type=cpu_number, metavar="N", help="CPU to pin to (default: last)")
    p.add_argument("--plot", type=plot_path, metavar="FILE", help="write a bar chart")
    p.set_defaults(func=cmd_accel)


def cmd_accel(args) -> int:
    from rich.console import Console

    err = Console(stderr=True, highlight=False)

    def on_run(backend: str, key: str, i: int) -> None:
        if err.is_terminal:
            err.print(f"run {i + 1}/{args.runs}: {backend}: {LABELS[key]}", end="\r")

    try:
        doc = run(args.runs, args.cpu, on_run=on_run)
    except KeyboardInterrupt:
        err.print("kvmpy: interrupted")
        return 130
    return report(args, doc, render, plot)
