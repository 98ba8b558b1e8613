"""kvmpy lab: experiments that run many configurations and write a report (one command each)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..benchmarks import positive_int

# Labs under `kvmpy lab`, in the order its help lists them; each has an `_add_<name>(labs)`
# below that adds its subcommand.
LABS = ["ipc", "ksm", "lhp"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "lab",
        help="run a whole study and write its report",
        description="Studies that run many measured configurations and write report.md, plots "
        "and results.json into a directory.",
    )
    labs = p.add_subparsers(dest="lab", metavar="LAB", required=True)
    for name in LABS:
        globals()[f"_add_{name}"](labs)


def _add_ipc(labs) -> None:
    p = labs.add_parser(
        "ipc",
        help="inter-VM communication: pio, shm-poll, shm-irq",
        description="Measure the three inter-VM mechanisms at 4 KiB to 1 GiB, their ping-pong "
        "latency, their variants and a per-layer breakdown, next to same-run references (host "
        "memcpy, eventfd ping-pong, the exit round trip), and write report.md, throughput.png, "
        "latency.png, breakdown.png and results.json. The default run takes a few minutes; "
        "--full adds pio at 32 MiB and 1 GiB, which takes far longer (pio moves a few MB/s on a "
        "software-virtualization host).",
    )
    p.add_argument("--out", default="ipc-study", metavar="DIR", help="output directory")
    p.add_argument("--full", action="store_true", help="also run the slow pio sizes")
    p.add_argument(
        "--runs", type=positive_int, default=5, help="measured runs per configuration (>= 5)"
    )
    p.set_defaults(func=cmd_lab_ipc)


def _out_dir(text: str) -> Path:
    """--out, checked before minutes of measuring, not after."""
    from ..errors import ConfigError

    out = Path(text)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".kvmpy-write-test").touch()
        (out / ".kvmpy-write-test").unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to --out {out}: {e.strerror}") from None
    return out


def cmd_lab_ipc(args) -> int:
    from ..errors import UsageError
    from ..ipc.study import main_study

    if args.runs < 5:
        raise UsageError("the study takes the median of at least 5 runs (--runs 5 or more)")
    out = _out_dir(args.out)
    progress = _progress() if sys.stderr.isatty() else None
    try:
        doc, files = main_study(out, args.full, args.runs, progress)
    except KeyboardInterrupt as e:
        from ..signals import exit_status

        print("kvmpy: interrupted", file=sys.stderr)
        return exit_status(e)
    for f in files:
        print(f)
    failed = [
        r.get("key")
        for grp in ("throughput", "pingpong", "pio_variants", "wait_modes", "same_process")
        for r in doc.get(grp, [])
        if not r.get("checksum_ok")
    ]
    if failed:
        print(f"kvmpy: error: {len(failed)} configuration(s) failed: {', '.join(failed)}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _add_ksm(labs) -> None:
    p = labs.add_parser(
        "ksm",
        help="same-page merging: how fast, how much, at what cost",
        description="Start N VMs (one process each) whose guests fill memory with identical, "
        "partly identical and distinct pages, let the host's KSM merge them and measure it: "
        "merged pages over time per VM, time to 85%% of the duplicate pages, ksmd's CPU time, "
        "memory saved, the copy-on-write cost a guest pays for writing a merged page, and "
        "the space a deduplicated snapshot store saves. Writes report.md, merge.png, cpu.png, "
        "cow.png, store.png and results.json. Needs root: it changes the host's KSM settings "
        "for the runs and puts them back afterwards, also after an error or Ctrl-C. The "
        "default run (8 VMs, tuned and kernel-default settings) takes a few minutes; --full "
        "adds 2, 4 and 16 VMs and a pages_to_scan sweep.",
    )
    p.add_argument("--out", default="ksm-study", metavar="DIR", help="output directory")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="also 2-16 VMs and a settings sweep")
    size.add_argument(
        "--quick", action="store_true", help="3 small VMs, one run: under a minute (for CI)"
    )
    p.add_argument("--runs", type=positive_int, help="runs per scenario (default 3; quick 1)")
    p.add_argument(
        "--vms", type=positive_int, metavar="N", help="VMs in the main scenarios (2-16; default 8)"
    )
    p.set_defaults(func=cmd_lab_ksm)


def cmd_lab_ksm(args) -> int:
    from ..ksm.lab import plan, run_lab

    kind = "full" if args.full else "quick" if args.quick else "default"
    plan(kind, args.runs, args.vms)  # a bad --vms is refused before anything starts
    out = _out_dir(args.out)
    progress = _progress() if sys.stderr.isatty() else None
    try:
        doc, files = run_lab(out, kind, args.runs, progress, vms=args.vms)
    except KeyboardInterrupt:
        print("kvmpy: interrupted; the host's KSM settings are back as they were", file=sys.stderr)
        return 130
    for f in files:
        print(f)
    return 0


def _add_lhp(labs) -> None:
    def quantum(text: str) -> float:
        from .sched import _quantum

        return _quantum(text)

    p = labs.add_parser(
        "lhp",
        help="lock-holder preemption: naive and paravirtual spinlocks, directed yield",
        description="Run an SMP spinlock workload on 1-8 vCPUs over-committed on 1 and 2 host "
        "CPUs under each lock/scheduling variant (naive ticket lock under Linux's and kvmpy's "
        "scheduler, paravirtual locks with wait/kick hypercalls, directed yield, holder grace) "
        "and write report.md, throughput.png, relative.png, spinning.png and results.json. "
        "The default run is short (1 and 4 vCPUs on one host CPU, under a minute); --full "
        "runs every configuration (about 10 minutes).",
    )
    p.add_argument("--out", default="lhp-study", metavar="DIR", help="output directory")
    p.add_argument("--full", action="store_true", help="1, 2, 4, 8 vCPUs on 1 and 2 host CPUs")
    p.add_argument(
        "--runs", type=positive_int, help="rounds per configuration (default 3, --full 5)"
    )
    p.add_argument(
        "--cs", type=positive_int, default=1000, metavar="N",
        help="work iterations inside the critical section (default 1000)",
    )  # fmt: skip
    p.add_argument(
        "--think", type=positive_int, default=3000, metavar="N",
        help="work iterations between critical sections (default 3000)",
    )  # fmt: skip
    p.add_argument(
        "--quantum", type=quantum, default=0.010, metavar="TIME",
        help="kvmpy scheduler's slice (default 10ms)",
    )  # fmt: skip
    p.set_defaults(func=cmd_lab_lhp)


def cmd_lab_lhp(args) -> int:
    from ..lab.lhp import main_lab

    out = _out_dir(args.out)
    progress = _progress() if sys.stderr.isatty() else None
    try:
        doc, files = main_lab(
            out, args.full, args.runs, progress,
            cs=args.cs, think=args.think, quantum=args.quantum,
        )  # fmt: skip
    except KeyboardInterrupt:
        print("kvmpy: interrupted", file=sys.stderr)
        return 130
    for f in files:
        print(f)
    g = doc["goal"]
    if g.get("evaluated"):
        print(
            f"goal (4 vCPUs on 1 host CPU): best {g['best']} {g['vs_naive']:.0f}x naive, "
            f"{g['vs_t1_per_host_cpu']:.2f} of 1 vCPU per host CPU: "
            f"{'met' if g['met'] else 'not met'}"
        )
    failed = [f"{e['variant']}@{e['vcpus']}/{e['host_cpus']}" for e in doc["results"]
              if e.get("correct") is False]  # fmt: skip
    if failed:
        print(f"kvmpy: error: the counter check failed in: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _progress():
    def show(done: int, total: int, what: str) -> None:
        sys.stderr.write(f"\r\x1b[K[{done}/{total}] {what}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show
