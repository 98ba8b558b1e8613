"""kvmpy run: run a guest image (a file, or the name of a bundled example)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from ..arch.x86.modes import Mode
from ..errors import ConfigError
from ..result import RunResult, StopReason
from .options import guest_memory, seconds
from .outputs import GuestConsole, write_stdout
from .virtio_opts import (
    add_virtio_devices,
    add_virtio_options,
    connect_virtio,
    render_stats,
    virtio_specs,
)

log = logging.getLogger("kvmpy.cli")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run a guest image",
        description="Run a raw or ELF guest image, or a bundled example by name ('kvmpy examples'). "
        "Guest output goes to stdout; kvmpy exits with the guest's exit code "
        "(125 if the guest crashed, 124 on --timeout, 130 on Ctrl-C).",
    )
    p.add_argument(
        "image", metavar="IMAGE", nargs="?",
        help="raw or ELF image, or a bundled example name (or --config)",
    )  # fmt: skip
    p.add_argument(
        "--config", metavar="FILE.json",
        help="the whole machine from a VM config file (kvmpy run ... --dump-config writes one)",
    )  # fmt: skip
    p.add_argument(
        "--dump-config", action="store_true",
        help="print the VM config these options describe (JSON) and exit without running",
    )  # fmt: skip
    p.add_argument(
        "--mode", choices=[m.value for m in Mode], help="CPU mode (default: from the image)"
    )
    p.add_argument("--mem", type=guest_memory, metavar="SIZE", help="guest RAM (default 64M)")
    p.add_argument(
        "--vcpus", type=int, metavar="N",
        help="vCPUs, each in its own host thread (default 1, or the example's; SMP guests use "
        "kvmpy/smp.h)",
    )  # fmt: skip
    p.add_argument(
        "--load-addr", type=_address, metavar="GPA", help="where a raw image loads (default 0)"
    )
    p.add_argument("--entry", type=_address, metavar="GPA", help="entry point (default: image's)")
    add_result_options(p)
    p.add_argument("--trace-exits", action="store_true", help="log every exit (stderr)")
    p.add_argument(
        "--irqchip", action="store_true", help="create the in-kernel irqchip (LAPIC in x2APIC mode)"
    )
    add_mergeable_option(p)
    add_virtio_options(p)
    p.set_defaults(func=cmd_run, parser=p)


def add_mergeable_option(p) -> None:
    p.add_argument(
        "--mergeable",
        action="store_true",
        help="offer guest RAM to the host's same-page merging (MADV_MERGEABLE; 'kvmpy ksm on' "
        "starts KSM itself)",
    )


def warn_if_ksm_idle() -> None:
    """One line on stderr when a mergeable VM starts on a host whose KSM does not run: the
    flag alone merges nothing, and kvmpy never starts KSM on its own."""
    from ..ksm import KsmError
    from ..ksm.sysfs import Ksm

    try:
        running = Ksm().read_int("run") == 1
    except KsmError:
        running = False
    if not running:
        sys.stderr.write(
            "kvmpy: note: guest RAM is mergeable, but the host's KSM is not running (kvmpy ksm "
            "on starts it)\n"
        )


def add_result_options(p) -> None:
    """The options of every command that runs a VM to its end (run, restore, migrate-receive)."""
    p.add_argument(
        "--accel",
        choices=("kvm", "unicorn"),
        help="CPU backend: kvm (/dev/kvm) or unicorn (binary translation, no /dev/kvm needed); "
        "default kvm, and unicorn with a notice where /dev/kvm is not usable",
    )
    p.add_argument("--stats", action="store_true", help="print exit statistics (stderr)")
    p.add_argument("--json", action="store_true", help="end with one JSON object on stdout")
    p.add_argument(
        "--timeout", type=seconds, metavar="SECONDS", help="stop the guest after this long"
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
    if mode is not None and mode not in example.modes:
        from ..errors import UsageError

        raise UsageError(
            f"the example {name} runs in {', '.join(m.value for m in example.modes)} only, "
            f"not in {mode.value} mode (see 'kvmpy examples')"
        )
    mode = mode or example.default_mode
    return example.build(mode), mode


def default_vcpus(name: str, path: Path) -> int:
    """A bundled example's own vCPU count (its kvmpy-vcpus tag), else 1."""
    if path.exists() and ("/" in name or name.startswith(".") or Path(name).exists()):
        return 1
    from ..sdk.examples import find_example

    example = find_example(name)
    return example.vcpus if example is not None else 1


def vm_config(args):
    """The VmConfig the command line describes: --config FILE, or IMAGE and the options."""
    from ..machine import MachineConfig
    from ..vmm.config import ImageBoot, VmConfig

    if args.config:
        if args.image:
            args.parser.error("give an IMAGE or --config FILE, not both")
        given = [o for o, v in (("--mode", args.mode), ("--mem", args.mem),
                                ("--vcpus", args.vcpus), ("--load-addr", args.load_addr),
                                ("--entry", args.entry)) if v is not None]  # fmt: skip
        if args.irqchip:
            given.append("--irqchip")
        if args.mergeable:
            given.append("--mergeable")
        if given:
            args.parser.error(f"{given[0]} conflicts with --config: put it in the config file")
        if virtio_specs(args):
            raise ConfigError("--disk, --rng, --console virtio, --net and --vsock conflict "
                              "with --config: put the devices in the config file")  # fmt: skip
        config = VmConfig.load(args.config)
        if config.boot is None:
            raise ConfigError(f"{args.config} has no boot source ('boot')")
        if args.accel:  # the one machine option --config leaves to the command line
            machine = dataclasses.replace(config.machine, accel=args.accel).validated()
            config = dataclasses.replace(config, machine=machine)
        return config
    if not args.image:
        args.parser.error("nothing to run: give an IMAGE (or --config FILE)")
    from ..loader import load_file

    mode = Mode(args.mode) if args.mode else None
    path, mode = resolve_image(args.image, mode)
    vcpus = args.vcpus if args.vcpus is not None else default_vcpus(args.image, path)
    image = load_file(path, args.load_addr, args.entry)
    mode = mode or image.mode_hint or (Mode.PROTECTED if image.bits == 32 else Mode.LONG)
    machine = MachineConfig(mode=mode, memory=args.mem or "64M", vcpus=vcpus,
                            irqchip=args.irqchip, accel=args.accel or "auto",
                            mergeable=args.mergeable)  # fmt: skip
    boot = ImageBoot(str(path.resolve()), args.load_addr, args.entry)
    return add_virtio_devices(VmConfig(machine, boot), args).validated()


def cmd_run(args) -> int:
    from ..vmm import builder

    config = vm_config(args)
    if args.dump_config:
        write_stdout(config.to_json() + "\n")
        return 0
    if config.machine.mergeable:
        warn_if_ksm_idle()
    from ..vmm.config import LinuxBoot

    if isinstance(config.boot, LinuxBoot):
        # A Linux machine from a config file: as `kvmpy boot` runs it, console on stdin/stdout
        # (hvc0 if its command line says so).
        from .boot import run_linux

        mode = "virtio" if "console=hvc0" in config.boot.cmdline.split() else "stdio"
        return run_linux(config, args, mode)
    out = GuestConsole()
    mode = config.machine.mode
    path = config.boot.path if hasattr(config.boot, "path") else str(config.boot)
    with builder.build(config, console=out, capture_output=False) as machine:
        for vcpu in machine.vcpus:
            vcpu.trace = args.trace_exits
        connect_virtio(machine, args)
        _log_start(machine, path)
        if args.control:
            from .ctl import run_with_control

            result = run_with_control(machine, args.control, args.timeout)
        else:
            result = machine.run(timeout=args.timeout, handle_sigint=True)
        result.extra["accel"] = machine.accel
        vset = getattr(machine, "virtio", None)
        virtio = vset.stats() if vset is not None else None
    return report(result, stats=args.stats, as_json=args.json, image=str(path), mode=mode,
                  console=out, virtio=virtio)  # fmt: skip


def _log_start(machine, path) -> None:
    """What `-v` shows before the guest starts: the image, the machine, kvmpy's layout."""
    from ..memory import format_size

    image = machine.image
    if image is not None:
        log.info(
            "%s: %s image, %d segment(s), %s, entry %#x",
            path, image.kind, len(image.segments), format_size(image.size), machine.entry_ip,
        )  # fmt: skip
    layout = machine.layout
    log.info(
        "machine: %s mode, %s of RAM, %d vCPU(s), %s, %s backend; kvmpy's structures at %s",
        machine.mode.value,
        format_size(machine.memory.size),
        machine.config.vcpus,
        "in-kernel irqchip" if machine.config.irqchip else "no irqchip",
        machine.accel,
        f"{layout.base:#x}-{layout.end:#x}" if layout is not None else "?",
    )


#: Stops reported in one line, without a register dump: they say nothing about the guest.
_NO_DUMP = (StopReason.HOST_LIMITATION, StopReason.INTERRUPTED, StopReason.OUTPUT_ERROR)


def report(
    result: RunResult,
    *,
    stats: bool,
    as_json: bool,
    image: str,
    mode: Mode,
    console: GuestConsole | None = None,
    virtio: list[dict] | None = None,
) -> int:
    """The end of every command that ran a VM (run, restore, migrate-receive): the stop on
    stderr, --stats on stderr, --json on stdout. Returns the process's exit status."""
    from rich.console import Console

    log.info(
        "stopped (%s) after %d exits in %.1f ms",
        result.stop_reason.value, result.stats.total, result.duration_s * 1e3,
    )  # fmt: skip
    output_ok = result.stop_reason is not StopReason.OUTPUT_ERROR
    if console is not None and output_ok:
        console.flush()  # OutputError if the last of the guest's output cannot be written
    # Plain writes: guest-controlled text (disassembly like "[rax]") must not meet rich markup.
    if not output_ok:
        sys.stderr.write(f"kvmpy: error: {result.message}; the VM was stopped\n")
    elif not result.stop_reason.ok:
        sys.stderr.write(f"kvmpy: guest stopped: {result.stop_reason.value}: {result.message}\n")
        if result.stop_reason not in _NO_DUMP:
            sys.stderr.write(format_registers(result) + "\n")
    sys.stderr.flush()
    err = Console(stderr=True, highlight=False)
    if stats:
        for table in result.stats.rich_tables():
            err.print(table)
        if result.vcpu_stats:
            err.print(vcpu_table(result))
        if virtio:
            render_stats(virtio, err)
        code = "none" if result.exit_code is None else result.exit_code
        err.print(
            f"{result.stats.total} exits in {result.duration_s * 1e3:.1f} ms; "
            f"stop: {result.stop_reason.value}, guest exit code {code}"
        )
    if as_json and output_ok:
        doc = {"image": image, "mode": mode.value, **result.to_dict()}
        if virtio is not None:
            doc["virtio"] = virtio
        # On a line of its own, whatever the guest's last byte was.
        lead = "" if console is None or console.ends_line else "\n"
        write_stdout(lead + json.dumps(doc) + "\n")
    return result.process_exit_status


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


def vcpu_table(result: RunResult):
    """Exits per vCPU of an SMP machine (the tables above are their sum)."""
    from rich.table import Table

    reasons = sorted({r for s in result.vcpu_stats for r in s.by_reason()})
    t = Table(title="VM exits by vCPU")
    t.add_column("vCPU", justify="right")
    for r in reasons:
        t.add_column(r, justify="right")
    t.add_column("total", justify="right")
    for i, s in enumerate(result.vcpu_stats):
        by = s.by_reason()
        t.add_row(str(i), *(str(by.get(r, 0)) for r in reasons), str(s.total))
    return t
