"""The virtio options of `kvmpy run` (and `kvmpy boot`): --disk, --rng, --console, --net,
--vsock, --transport."""

from __future__ import annotations

import os
import stat
import sys

from ..errors import ConfigError


def add_virtio_options(p, *, console: bool = True) -> None:
    """`console=False`: the command has its own --console (kvmpy boot), which takes
    `virtio` too."""
    g = p.add_argument_group("virtio devices (docs/virtio.md)")
    g.add_argument("--disk", action="append", default=[], metavar="PATH[,ro][,id=NAME]",
                   help="a virtio-blk disk on a raw image (repeatable); ro: read-only; id: "
                   "what GET_ID returns; irq-cpu=N: the vCPU that takes its interrupts")  # fmt: skip
    g.add_argument("--rng", action="store_true", help="a virtio entropy device (host getrandom)")
    g.add_argument("--balloon", action="store_true",
                   help="a virtio balloon: the guest can give memory back (kvmpy ctl SOCK "
                   "balloon SIZE; free page reporting); docs/memory.md")  # fmt: skip
    if console:
        g.add_argument("--console", choices=["serial", "virtio"], default="serial",
                       help="virtio: a virtio console (hvc0) on stdin/stdout; serial (default): "
                       "kvmpy's port console only")  # fmt: skip
    g.add_argument("--net", action="append", default=[], metavar="tap=NAME[,mac=MAC]",
                   help="a virtio-net NIC on a host TAP device (repeatable); tap=auto creates "
                   "one (root) and removes it at exit; mac: the guest's address (default: a "
                   "random locally administered one, recorded in the VM config)")  # fmt: skip
    g.add_argument("--vsock", metavar="CID,uds=PATH",
                   help="a virtio-vsock device with guest CID CID; guest connections to host "
                   "port P reach the Unix socket PATH_P, host clients connect to PATH and send "
                   "'CONNECT <port>\\n' (Firecracker's convention)")  # fmt: skip
    g.add_argument("--transport", choices=["mmio", "pci"], default="mmio",
                   help="virtio-mmio (default) or virtio-pci with MSI-X")  # fmt: skip


def virtio_specs(args) -> list:
    from ..vmm.virtio import DeviceSpec

    specs = [DeviceSpec.parse_disk(d) for d in args.disk]
    for s in specs:
        if not os.path.exists(s.path):
            raise ConfigError(f"--disk {s.path}: no such file")
    if args.rng:
        specs.append(DeviceSpec("rng"))
    if args.console == "virtio":
        specs.append(DeviceSpec("console"))
    specs += [DeviceSpec.parse_net(n) for n in getattr(args, "net", [])]
    if getattr(args, "vsock", None):
        specs.append(DeviceSpec.parse_vsock(args.vsock))
    if getattr(args, "balloon", False):
        specs.append(DeviceSpec("balloon"))
    return specs


def attach_from_args(machine, args):
    """Build the devices the options ask for (None if none)."""
    specs = virtio_specs(args)
    if not specs:
        return None
    from ..vmm.virtio import attach, install_guest_handlers

    console_input = None
    preload = b""
    if args.console == "virtio":
        fd = sys.stdin.fileno() if sys.stdin is not None else -1
        try:
            mode = os.fstat(fd).st_mode if fd >= 0 else 0
        except OSError:
            mode = 0
        if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode):
            console_input = fd  # the device's I/O thread reads it when it is readable
        elif stat.S_ISREG(mode):
            preload = os.read(fd, 64 * 1024)  # a file cannot be polled: hand its start over
    vset = attach(machine, specs, args.transport, console_input=console_input)
    if preload:
        for dev in vset.devices:
            if dev.kind == "console":
                dev.feed(preload)
    install_guest_handlers(machine, vset)
    return vset


def add_virtio_devices(config, args):
    """`config` with the devices the options ask for (VmConfig entries, so snapshots and
    --dump-config carry them)."""
    for spec in virtio_specs(args):
        args_ = {"transport": args.transport}
        if spec.irq_cpu is not None:
            args_["irq_cpu"] = spec.irq_cpu
        if spec.kind == "block":
            ident = (
                spec.id
                or f"vd{chr(ord('a') + sum(d.kind == 'virtio-blk' for d in config.devices))}"
            )
            args_.update(path=str(os.path.abspath(spec.path)), readonly=spec.readonly,
                         serial=spec.id)  # fmt: skip
            config = config.with_device("virtio-blk", ident, **args_)
        elif spec.kind == "rng":
            config = config.with_device("virtio-rng", None, **args_)
        elif spec.kind == "net":
            from ..devices.virtio.net import format_mac, random_mac

            # The MAC goes into the config, so a restored guest keeps its address.
            mac = spec.options.get("mac") or format_mac(random_mac())
            n = sum(d.kind == "virtio-net" for d in config.devices)
            config = config.with_device("virtio-net", spec.id or f"net{n}",
                                        tap=spec.options["tap"], mac=mac, **args_)  # fmt: skip
        elif spec.kind == "vsock":
            config = config.with_device("virtio-vsock", spec.id or "vsock0",
                                        cid=spec.options["cid"],
                                        uds=os.path.abspath(spec.path), **args_)  # fmt: skip
        elif spec.kind == "balloon":
            config = config.with_device("virtio-balloon", "balloon0", **args_)
        else:
            config = config.with_device("virtio-console", None, **args_)
    return config


def connect_virtio(machine, args) -> None:
    """After the machine is built: the virtio console's input (stdin) and the SDK guest's
    interrupt handlers."""
    vset = getattr(machine, "virtio", None)
    if vset is None:
        return
    from ..vmm.virtio import install_guest_handlers

    consoles = [d for d in vset.devices if d.kind == "console"]
    if consoles and getattr(args, "console", "serial") == "virtio":
        fd = sys.stdin.fileno() if sys.stdin is not None else -1
        try:
            mode = os.fstat(fd).st_mode if fd >= 0 else 0
        except OSError:
            mode = 0
        if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode):
            consoles[0].input_fd = fd  # the device's I/O thread reads it when it is readable
        elif stat.S_ISREG(mode):
            consoles[0].feed(os.read(fd, 64 * 1024))  # a file cannot be polled: its start
    install_guest_handlers(machine, vset)


def render_stats(stats: list[dict], console) -> None:
    from rich.table import Table

    t = Table(title="virtio devices")
    for col in ("device", "transport", "requests", "notifies", "notify exits", "interrupts",
                "errors", "detail"):  # fmt: skip
        t.add_column(col)
    for s in stats:
        keys = ("bytes_read", "bytes_written", "bytes", "bytes_out", "bytes_in", "io_errors",
                "rx_packets", "rx_bytes", "rx_dropped", "tx_packets", "tx_bytes", "tx_dropped",
                "connections", "resets_sent", "bad_packets", "ballooned_pages", "reported_bytes",
                "refused_pfns", "refused_ranges")  # fmt: skip
        detail = ", ".join(f"{k} {s[k]}" for k in keys if s.get(k))
        if s["type"] == "net":
            detail = f"{s['backend']} {s['mac']}" + (f"; {detail}" if detail else "")
        elif s["type"] == "vsock":
            detail = f"cid {s['cid']} {s['uds']}" + (f"; {detail}" if detail else "")
        if s.get("needs_reset"):
            detail = f"NEEDS_RESET: {s['needs_reset']}" + (f"; {detail}" if detail else "")
        t.add_row(s["type"], s["transport"], str(s["requests"]), str(s["notifies"]),
                  str(s["notify_exits"]), str(s["interrupts"]), str(s["errors"]), detail)  # fmt: skip
    console.print(t)
