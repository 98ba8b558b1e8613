"""kvmpy ipc: move bytes between two VMs and measure it."""

from __future__ import annotations

import argparse
import json
import sys

from ..benchmarks import positive_int
from ..ipc.report import format_rate, format_time
from ..signals import exit_status
from .options import seconds, size


def add_parser(sub) -> None:
    p = sub.add_parser(
        "ipc",
        help="transfer data between two VMs (pio, shm-poll, shm-irq) and time it",
        description="Start a sender VM and a receiver VM, each in its own VMM process, connect "
        "them with MECHANISM, move SIZE bytes of a known pattern (checked byte by byte inside "
        "the receiver) once to warm up and then --runs times, and report the median time and "
        "throughput next to a host memcpy of the same size measured in the same run. "
        "With --pingpong, bounce --msg bytes back and forth instead and report the round trip "
        "next to an eventfd ping-pong between two host threads. See docs/ipc.md.",
    )
    p.add_argument(
        "--mechanism", required=True, choices=["pio", "shm-poll", "shm-irq"],
        help="port I/O relayed by the VMMs, a ring in shared memory with spinning ends, or "
        "the same ring with doorbell interrupts (ivshmem-doorbell)",
    )  # fmt: skip
    p.add_argument(
        "--size", type=size, default="4K", metavar="SIZE", help="bytes per run (default 4K)"
    )
    p.add_argument("--runs", type=positive_int, default=5, help="measured runs (default 5)")
    p.add_argument(
        "--same-process", action="store_true", help="run both VMMs as threads of this process"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--pingpong", action="store_true", help="measure small-message round trips")
    p.add_argument(
        "--msg", type=size, default="64", metavar="SIZE", help="ping-pong message (default 64)"
    )
    p.add_argument(
        "--rounds", type=positive_int, default=200, help="round trips per run (default 200)"
    )
    p.add_argument(
        "--pio-width", choices=["byte", "dword", "string"], default="string",
        help="pio: out/in per byte, per dword, or string I/O (default)",
    )  # fmt: skip
    p.add_argument(
        "--no-coalesce", action="store_true",
        help="pio: let every out exit to the VMM instead of batching them in KVM's coalesced ring",
    )  # fmt: skip
    p.add_argument(
        "--wait", choices=["block", "spin"], default="block",
        help="shm-irq: sleep in hlt until the doorbell (default) or spin on the interrupt count",
    )  # fmt: skip
    p.add_argument(
        "--shm-size",
        type=size,
        default="2M",
        metavar="SIZE",
        help="shared region size; two rings get the largest power of two that fits (default 2M)",
    )
    p.add_argument(
        "--vectors", type=positive_int, default=2, help="doorbell vectors per peer (2-4)"
    )
    p.add_argument(
        "--irq-cpu", type=int, default=0, metavar="K",
        help="shm-irq: deliver the receiver's doorbells to its vCPU K (the receiver then runs "
        "its ring loop there)",
    )  # fmt: skip
    p.add_argument(
        "--vcpus", type=positive_int, metavar="N",
        help="vCPUs of the receiver VM (default: enough for --irq-cpu)",
    )  # fmt: skip
    pin = p.add_mutually_exclusive_group()
    pin.add_argument(
        "--cpus",
        type=_cpus,
        metavar="A,B",
        help="pin the sender's VMM to CPU A and the receiver's to B",
    )
    pin.add_argument("--no-pin", action="store_true", help="leave the VMMs unpinned")
    p.add_argument("--timeout", type=seconds, metavar="SECONDS", help="give up after this long")
    p.add_argument(
        "--accel", choices=("kvm", "unicorn"),
        help="CPU backend of both VMs (default kvm; shm-irq needs KVM's irqfd and ioeventfd)",
    )  # fmt: skip
    p.add_argument(
        "--guest", metavar="IMAGE",
        help="instead of measuring, run IMAGE (a guest built with kvmpy/ipc.h, or a bundled "
        "example such as ipc-hello) as both VMs and print what each prints",
    )  # fmt: skip
    p.set_defaults(func=cmd_ipc)


def _cpus(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2 or not all(x.strip().isdigit() for x in parts):
        raise argparse.ArgumentTypeError(f"--cpus wants two CPU numbers, A,B (got {text!r})")
    return int(parts[0]), int(parts[1])


def options_from_args(args):
    from ..ipc.bench import IpcOptions, default_cpus
    from ..ipc.layout import Mechanism, PioWidth, WaitMode
    from ..memory import parse_size

    cpus = args.cpus or (None if args.no_pin else default_cpus())
    size = parse_size(args.msg if args.pingpong else args.size)
    return IpcOptions(
        mechanism=Mechanism.parse(args.mechanism),
        size=size,
        runs=args.runs,
        pingpong=args.rounds if args.pingpong else 0,
        same_process=args.same_process,
        pio_width=PioWidth.parse(args.pio_width),
        pio_coalesce=not args.no_coalesce,
        wait_mode=WaitMode.parse(args.wait),
        shm_size=parse_size(args.shm_size),
        vectors=args.vectors,
        cpus=cpus,
        timeout=args.timeout,
        irq_cpu=args.irq_cpu,
        receiver_vcpus=args.vcpus if args.vcpus is not None else max(1, args.irq_cpu + 1),
        accel=args.accel or "auto",
    ).validated()


def cmd_ipc(args) -> int:
    from ..errors import ConfigError, UsageError
    from ..ipc.bench import run_ipc, with_reference

    try:
        opts = options_from_args(args)
    except ConfigError as e:  # flags that do not go together
        raise UsageError(str(e)) from None
    if args.guest:
        return run_user_guest(opts, args)
    try:
        result = with_reference(opts, run_ipc(opts))
    except KeyboardInterrupt as e:
        print("kvmpy: interrupted", file=sys.stderr)
        return exit_status(e)
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        print_result(result)
    return 0 if result["checksum_ok"] else 1


def run_user_guest(opts, args) -> int:
    from ..arch.x86.modes import Mode
    from ..ipc.bench import run_guest
    from .run import resolve_image

    path, _mode = resolve_image(args.guest, Mode.LONG_USER)
    try:
        result = run_guest(opts, str(path))
    except KeyboardInterrupt as e:
        print("kvmpy: interrupted", file=sys.stderr)
        return exit_status(e)
    if args.json:
        sys.stdout.write(json.dumps({"mechanism": opts.mechanism.label, **result}) + "\n")
    else:
        for role in ("sender", "receiver"):
            r = result[role]
            for line in r["output"].splitlines():
                print(f"[{role}] {line}")
            print(f"[{role}] (peer {r['peer_id']}) exit code {r['exit_code']}, "
                  f"{r['userspace_exits']} userspace exits", file=sys.stderr)  # fmt: skip
    return max(result[role]["exit_code"] & 0xFF for role in result)


def print_result(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..memory import format_size

    console = Console(highlight=False)
    where = "one process" if r["same_process"] else "two VMM processes"
    if "pingpong" in r:
        t = Table(title=f"{r['mechanism']} ping-pong, {r['msg']} B messages, {where}")
        t.add_column("")
        t.add_column("round trip", justify="right")
        rtt = r["rtt_us"]
        for k in ("median", "p10", "p90", "p99", "min"):
            t.add_row(k, f"{rtt[k]:.2f} µs")
        t.add_row("eventfd ping-pong, 2 host threads", format_time(r["eventfd_rtt_seconds"]))
        t.add_row("ratio to eventfd", f"{r['ratio_to_eventfd']:.3f}")
    else:
        t = Table(title=f"{r['mechanism']}: {format_size(r['size'])} from VM to VM, {where}")
        t.add_column("")
        t.add_column("", justify="right")
        t.add_row("median time", format_time(r["seconds"]))
        t.add_row("throughput", format_rate(r["throughput_bytes_per_s"]))
        t.add_row("host memcpy, same size, same run", format_rate(r["memcpy_bytes_per_s"]))
        t.add_row("ratio to memcpy", f"{r['ratio_to_memcpy']:.4f}")
        t.add_row("each run", "  ".join(format_time(x) for x in r["runs_seconds"]))
        t.add_row("warm-up run", format_time(r["warmup_seconds"]))
    t.add_row(
        "userspace exits per run",
        f"{r['userspace_exits']} (sender {r['userspace_exits_by_side']['sender']}, "
        f"receiver {r['userspace_exits_by_side']['receiver']})",
    )
    t.add_row("checksum", "ok" if r["checksum_ok"] else "MISMATCH")
    console.print(t)
