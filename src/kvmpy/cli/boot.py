"""kvmpy boot: boot a Linux kernel with its console on the terminal (docs/linux.md)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from pathlib import Path

from ..errors import ConfigError, UsageError
from ..vmm.config import DEFAULT_LINUX_MEMORY
from .options import guest_memory, seconds
from .run import add_mergeable_option
from .virtio_opts import add_virtio_devices, add_virtio_options, virtio_specs

log = logging.getLogger("kvmpy.cli")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "boot",
        help="boot a Linux kernel to a shell on the console",
        description="Boot an ELF vmlinux or a bzImage (or a cached kernel by name: 'microvm', "
        "'debian'; see 'kvmpy kernel') with the Linux x86 boot protocol. The serial console "
        "is the terminal: type into the guest's shell (Ctrl-A x quits, Ctrl-A h lists the "
        "keys). A pipe or file on stdin is typed into the console as it comes; its end is "
        "just the end of input. The VM ends with the guest: poweroff (exit status 0), reboot "
        "(0), a kernel panic (125, the last console lines on stderr).",
    )
    p.add_argument("kernel", metavar="KERNEL", help="vmlinux, bzImage, or 'microvm'/'debian'")
    p.add_argument(
        "--initrd", metavar="FILE",
        help="the initramfs (default: kvmpy's busybox one, 'kvmpy initramfs'; none when "
        "--append sets root=)",
    )  # fmt: skip
    p.add_argument("--no-initrd", action="store_true", help="boot without an initramfs")
    p.add_argument(
        "--append", default="", metavar="CMDLINE",
        help="added to kvmpy's kernel command line (after it: yours wins)",
    )  # fmt: skip
    p.add_argument("--vcpus", type=int, default=1, metavar="N", help="vCPUs (default 1)")
    p.add_argument("--mem", type=guest_memory, default=DEFAULT_LINUX_MEMORY, metavar="SIZE",
                   help=f"guest RAM (default {DEFAULT_LINUX_MEMORY}, as Firecracker's)")  # fmt: skip
    p.add_argument(
        "--console", type=_console, default=("stdio", None), metavar="stdio|file:PATH|none|virtio",
        help="stdio (default): the serial console (ttyS0) on the terminal; virtio: hvc0 instead; "
        "file:PATH: console output to PATH, no input; none: no console I/O",
    )  # fmt: skip
    p.add_argument("--no-acpi", action="store_true",
                   help="no ACPI tables (then poweroff only halts: docs/linux.md)")  # fmt: skip
    p.add_argument("--no-mptable", action="store_true", help="no MP table")
    p.add_argument(
        "--no-speed-cmdline", dest="speed_cmdline", action="store_false",
        help="on a software host, leave out the speed-only command line (rodata=off, and "
        "Debian's initcall_blacklist for a Debian kernel: docs/linux.md)",
    )  # fmt: skip
    p.add_argument("--stats", action="store_true", help="print exit statistics (stderr)")
    p.add_argument("--json", action="store_true",
                   help="end with one JSON object on stdout (milestones, exits, fallbacks)")  # fmt: skip
    p.add_argument("--timeout", type=seconds, metavar="SECONDS", help="stop the guest after this")
    p.add_argument("--control", metavar="SOCK",
                   help="serve a control channel on this unix socket (kvmpy ctl)")  # fmt: skip
    p.add_argument("--dump-config", action="store_true",
                   help="print the VM config (JSON) and exit; 'kvmpy run --config' runs it")  # fmt: skip
    add_virtio_options(p, console=False)
    add_mergeable_option(p)
    p.set_defaults(func=cmd_boot, parser=p)


def _console(text: str) -> tuple[str, str | None]:
    if text in ("stdio", "serial"):
        return "stdio", None
    if text in ("none", "virtio"):
        return text, None
    if text.startswith("file:") and len(text) > 5:
        return "file", text[5:]
    raise argparse.ArgumentTypeError(
        f"--console takes stdio, virtio, none or file:PATH (got {text!r})"
    )


def resolve_kernel(name: str) -> str:
    """A path as given, or a cached kernel by name."""
    path = Path(name)
    if path.exists() or "/" in name:
        return str(path)
    from ..boot.kernels import find_kernel

    files = find_kernel(name)
    if files is None:
        if name in ("microvm", "debian"):
            how = "kvmpy kernel build" if name == "microvm" else "kvmpy kernel fetch debian"
            raise ConfigError(f"no {name} kernel is cached: run '{how}' first")
        return str(path)  # the loader says: no such file
    return str(files.vmlinux)


def boot_config(args):
    """The VmConfig of `kvmpy boot`'s command line (after `_split_console`)."""
    from ..vmm.linux import linux_config

    if args.vcpus < 1:
        raise UsageError(f"--vcpus must be at least 1 (got {args.vcpus})")
    kernel = resolve_kernel(args.kernel)
    initrd = args.initrd
    if initrd is not None and args.no_initrd:
        raise UsageError("--initrd and --no-initrd conflict")
    if initrd is None and not args.no_initrd and "root=" not in args.append:
        from ..boot.initramfs import default_initramfs

        initrd = str(default_initramfs())
    cmdline = args.append
    if args.console_mode == "virtio":
        # The last console= is /dev/console: the shell's. Early messages still go to ttyS0.
        cmdline = f"console=hvc0 {cmdline}".strip()
    config = linux_config(kernel, initrd=initrd, cmdline=cmdline, vcpus=args.vcpus,
                          memory=args.mem, acpi=not args.no_acpi,
                          mptable=not args.no_mptable,
                          speed_cmdline=args.speed_cmdline)  # fmt: skip
    if args.mergeable:
        config = dataclasses.replace(
            config, machine=dataclasses.replace(config.machine, mergeable=True)
        )
    return add_virtio_devices(config, args).validated()


def _split_console(args) -> None:
    """--console MODE[:PATH] -> args.console_mode/console_path, and args.console as the
    virtio options read it (virtio or serial)."""
    args.console_mode, args.console_path = args.console
    args.console = "virtio" if args.console_mode == "virtio" else "serial"


def cmd_boot(args) -> int:
    from .outputs import write_stdout

    _split_console(args)
    virtio_specs(args)  # --disk paths checked before anything is built
    config = boot_config(args)
    if args.dump_config:
        write_stdout(config.to_json() + "\n")
        return 0
    if config.machine.mergeable:
        from .run import warn_if_ksm_idle

        warn_if_ksm_idle()
    return run_linux(config, args, args.console_mode, args.console_path)


def run_linux(config, args, console_mode: str = "stdio", console_path: str | None = None) -> int:
    """Build and run a Linux machine with its console on this process's stdin/stdout (the
    shared runner of `kvmpy boot` and `kvmpy run --config` with a Linux boot source)."""
    from ..vmm import builder
    from .run import report

    sink, closer = _console_sink(console_mode, console_path)
    try:
        with builder.build(config, console=sink, capture_output=False) as machine:
            result = run_machine_with_console(machine, args, console_mode)
        # The report flushes the console first: a file console is closed after it.
        return report(result, stats=args.stats, as_json=args.json, image=config.boot.kernel,
                      mode=config.machine.mode, console=sink if console_mode != "file" else None,
                      virtio=result.extra.pop("_virtio", None))  # fmt: skip
    finally:
        if closer is not None:
            closer()


def _console_sink(mode: str, path: str | None):
    from .outputs import GuestConsole

    if mode in ("stdio", "virtio"):
        return GuestConsole(interactive=True), None
    if mode == "file":
        try:
            f = open(path, "ab")  # noqa: SIM115 - closed by the caller
        except OSError as e:
            raise ConfigError(f"--console file:{path}: {e.strerror}") from None
        return GuestConsole(f, interactive=True), f.close
    return None, None


def run_machine_with_console(machine, args, console_mode: str = "stdio", before_first_run=None):
    """Run a built, restored or received Linux machine: stdin typed into its console, the
    terminal raw while it runs; the result carries the Linux platform's report. Other
    machines run as `kvmpy run` runs them."""
    from ..vmm.console import raw_terminal
    from .ctl import run_with_control

    control = getattr(args, "control", None)
    timeout = getattr(args, "timeout", None)
    linux = machine.linux is not None
    with contextlib.ExitStack() as stack:
        interactive = False
        if linux and console_mode in ("stdio", "virtio") and sys.stdin is not None:
            fd = sys.stdin.fileno()
            interactive = stack.enter_context(raw_terminal(fd)) if os.isatty(fd) else False
            con = connect_console(machine, fd, interactive=interactive,
                                  virtio=console_mode == "virtio")  # fmt: skip
            if con is not None:
                stack.callback(con.close)
        if interactive:
            sys.stderr.write("kvmpy: console on this terminal; Ctrl-A x quits\r\n")
            sys.stderr.flush()
        if control or before_first_run is not None:
            result = run_with_control(machine, control, timeout, before_first_run=before_first_run)
        else:
            result = machine.run(timeout=timeout, handle_sigint=True)
    result.extra["accel"] = machine.accel
    if linux:
        result.extra["linux"] = machine.linux.to_dict()
    vset = getattr(machine, "virtio", None)
    if vset is not None:
        result.extra["_virtio"] = vset.stats()
    return result


def connect_console(machine, fd: int, *, interactive: bool, virtio: bool = False):
    """Type what arrives on `fd` into the machine's console: its virtio console when `virtio`,
    else its first UART. None when the machine has neither."""
    from ..vmm.console import ConsoleInput

    target = None
    if virtio:
        vset = getattr(machine, "virtio", None)
        consoles = [d for d in vset.devices if d.kind == "console"] if vset else []
        target = consoles[0] if consoles else None
    if target is None:
        for dc in machine.device_configs:
            if dc.kind == "serial":
                target = machine.devices[dc.id]
                break
    if target is None:
        return None
    con = ConsoleInput(machine, target, fd, interactive=interactive)
    con.start()
    return con


def console_mode_of(machine) -> str:
    """The console a restored Linux machine was booted with (its command line says)."""
    boot = getattr(machine, "boot_source", None)
    cmdline = getattr(boot, "cmdline", "") or ""
    return "virtio" if "console=hvc0" in cmdline.split() else "stdio"
