"""kvmpy run: run a guest image (a file, or the name of a bundled example)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..arch.x86.modes import Mode
from ..errors import ConfigError
from ..result import RunResult, StopReason
from .virtio_opts import add_virtio_options, attach_from_args, render_stats


def add_parser(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run a guest image",
        description="Run a raw or ELF guest image, or a bundled example by name ('kvmpy examples'). "
        "Guest output goes to stdout; kvmpy exits with the guest's exit code "
        "(125 if the guest crashed, 124 on --timeout, 130 on Ctrl-C).",
    )
    p.add_argument("image", metavar="IMAGE", help="raw or ELF image, or a bundled example name")
    p.add_argument(
        "--mode", choices=[m.value for m in Mode], help="CPU mode (default: from the image)"
    )
    p.add_argument("--mem", default="64M", metavar="SIZE", help="guest RAM (default 64M)")
    p.add_argument(
        "--load-addr", type=_address, metavar="GPA", help="where a raw image loads (default 0)"
    )
    p.add_argument("--entry", type=_address, metavar="GPA", help="entry point (default: image's)")
    add_result_options(p)
    p.add_argument("--trace-exits", action="store_true", help="log every exit (stderr)")
    p.add_argument(
        "--irqchip", action="store_true", help="create the in-kernel irqchip (LAPIC in x2APIC mode)"
    )
    add_virtio_options(p)
    p.set_defaults(func=cmd_run)


def add_result_options(p) -> None:
    """The options of every command that runs a VM to its end (run, restore, migrate-receive)."""
    p.add_argument("--stats", action="store_true", help="print exit statistics (stderr)")
    p.add_argument("--json", action="store_true", help="end with one JSON object on stdout")
    p.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="stop the guest after this long"
    )
    p.add_argument(
        "--control", metavar="SOCK", help="serve a control channel on this unix socket (kvmpy ctl)"
    )


def _address(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an address: {text!r} (use e.g. 0x100000)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"address must not be negative: {text!r}")
    return value


def resolve_image(name: str, mode: Mode | None) -> tuple[Path, Mode | None]:
    """A file path as given, or a bundled example built for `mode` (cached)."""
    path = Path(name)
    if path.exists() or "/" in name or name.startswith("."):
        return path, mode
    from ..sdk.examples import find_example

    example = find_example(name)
    if example is None:
        return path, mode  # the loader reports the missing file
    mode = mode or example.default_mode
    return example.build(mode), mode


def cmd_run(args) -> int:
    from ..machine import Machine, MachineConfig

    mode = Mode(args.mode) if args.mode else None
    path, mode = resolve_image(args.image, mode)
    from ..loader import load_file

    image = load_file(path, args.load_addr, args.entry)
    mode = mode or image.mode_hint or (Mode.PROTECTED if image.bits == 32 else Mode.LONG)
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError("--timeout must be positive")
    config = MachineConfig(mode=mode, memory=args.mem, irqchip=args.irqchip)
    out = sys.stdout.buffer
    vset = None
    with Machine(config, console=out, capture_output=False) as machine:
        vcpu = machine.vcpu
        vcpu.trace = args.trace_exits
        machine.load(image)
        vset = attach_from_args(machine, args)
        try:
            if args.control:
                from .ctl import run_with_control

                result = run_with_control(machine, args.control, args.timeout)
            else:
                result = machine.run(timeout=args.timeout, handle_sigint=True)
        finally:
            virtio = vset.stats() if vset is not None else None
            if vset is not None:
                vset.close()
    out.flush()
    report(result, stats=args.stats, as_json=args.json, image=str(path), mode=mode,
           virtio=virtio)  # fmt: skip
    return result.process_exit_status


def report(result: RunResult, *, stats: bool, as_json: bool, image: str, mode: Mode,
           virtio: list[dict] | None = None) -> None:  # fmt: skip
    from rich.console import Console

    # Plain writes: guest-controlled text (disassembly like "[rax]") must not meet rich markup.
    if not result.stop_reason.ok:
        sys.stderr.write(f"kvmpy: guest stopped: {result.stop_reason.value}: {result.message}\n")
        if result.stop_reason is not StopReason.HOST_LIMITATION:
            sys.stderr.write(format_registers(result) + "\n")
        sys.stderr.flush()
    err = Console(stderr=True, highlight=False)
    if stats:
        for table in result.stats.rich_tables():
            err.print(table)
        if virtio:
            render_stats(virtio, err)
        err.print(
            f"{result.stats.total} exits in {result.duration_s * 1e3:.1f} ms; "
            f"stop: {result.stop_reason.value}, exit code {result.exit_code}"
        )
    if as_json:
        doc = {"image": image, "mode": mode.value, **result.to_dict()}
        if virtio is not None:
            doc["virtio"] = virtio
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()


def format_registers(result: RunResult) -> str:
    r = result.regs
    names = list(r)
    lines = []
    for i in range(0, len(names), 4):
        lines.append("  ".join(f"{n:>6}={r[n]:016x}" for n in names[i : i + 4]))
    s = result.sregs
    lines.append(
        f"   cr0={s['cr0']:#x} cr3={s['cr3']:#x} cr4={s['cr4']:#x} efer={s['efer']:#x} "
        f"cs={s['cs']:#x} cpl={s['cpl']}"
    )
    if result.fault is not None:
        f = result.fault
        lines.append(
            f"  at rip {f.rip:#x}: {f.instruction or '(not decodable)'}  "
            f"[{f.instruction_bytes.hex(' ') or 'unreadable'}]"
        )
    return "\n".join(lines)
