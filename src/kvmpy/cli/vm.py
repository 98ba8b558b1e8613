"""kvmpy vm: manage the VMs of a `kvmpy serve` daemon through kvmpy.client."""

from __future__ import annotations

import os
import sys
import threading

ENV_SOCK = "KVMPY_API_SOCK"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "vm",
        help="list, create, start, pause, snapshot, stop VMs of a 'kvmpy serve' daemon",
        description="Drive a 'kvmpy serve' daemon through its API (kvmpy.client): its Unix "
        f"socket (--api-sock, or ${ENV_SOCK}), or its TCP listener (--url with "
        "--token-file). On a single-VM daemon the VM id is ignored.",
    )
    p.add_argument("--api-sock", metavar="PATH", help=f"the daemon's socket (default ${ENV_SOCK})")
    p.add_argument(
        "--url", metavar="URL", help="the daemon's TCP listener, e.g. http://127.0.0.1:8080"
    )
    p.add_argument("--token-file", metavar="FILE", help="the bearer token (with --url)")
    ops = p.add_subparsers(dest="op", metavar="COMMAND", required=True)
    ops.add_parser("ls", help="the VMs, their state, uptime, exits and output")
    c = ops.add_parser(
        "create",
        help="create and configure a VM (multi mode), optionally start it",
        description="Create a VM from an SDK image (a file, or a bundled example name: see "
        "'kvmpy examples') or a Linux kernel, or from a snapshot (--snapshot DIR).",
    )
    c.add_argument("id", metavar="ID")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", metavar="IMAGE", help="an SDK image, a bundled example or a kernel")
    src.add_argument("--snapshot", metavar="DIR", help="restore this snapshot (it runs at once)")
    c.add_argument(
        "--mem", type=int, default=None, metavar="MIB", help="memory in MiB (default 128)"
    )
    c.add_argument("--vcpus", type=int, default=1, metavar="N")
    c.add_argument("--mode", help="CPU mode of an SDK image (default: the image's)")
    c.add_argument("--irqchip", action="store_true", help="the in-kernel LAPIC/IOAPIC")
    c.add_argument("--boot-args", metavar="ARGS", help="a Linux kernel's command line")
    c.add_argument("--disk", action="append", default=[], metavar="PATH[,ro]", help="a drive")
    c.add_argument("--rng", action="store_true", help="a virtio entropy device")
    c.add_argument("--start", action="store_true", help="start it too")
    for name, text in (("start", "boot a configured VM"), ("pause", "pause a VM"),
                       ("resume", "resume a paused VM"), ("stop", "stop a VM"),
                       ("rm", "stop a VM and forget it (multi mode)")):  # fmt: skip
        ops.add_parser(name, help=text).add_argument("id", metavar="ID")
    s = ops.add_parser("snapshot", help="snapshot a VM to a directory (it goes on)")
    s.add_argument("id", metavar="ID")
    s.add_argument("dir", metavar="DIR")
    con = ops.add_parser(
        "console",
        help="attach to a VM's console (output; input goes to its console)",
        description="Show the VM's console: the last 4 KiB, then its output as it comes. Lines "
        "typed go to its console (a Linux guest's serial console or hvc0, an SDK guest's "
        "virtio console). Ctrl-C or Ctrl-D detaches; the VM goes on.",
    )
    con.add_argument("id", metavar="ID")
    p.set_defaults(func=cmd_vm, parser=p)


def _client(args):
    from ..client import Client

    if args.url:
        if args.api_sock:
            args.parser.error("give --api-sock or --url, not both")
        token = None
        if args.token_file:
            from ..api.server import read_token

            token = read_token(args.token_file)
        return Client(url=args.url, token=token)
    sock = args.api_sock or os.environ.get(ENV_SOCK)
    if not sock:
        args.parser.error(f"which daemon? give --api-sock PATH (or set ${ENV_SOCK}) or --url")
    return Client(sock)


def cmd_vm(args) -> int:
    with _client(args) as c:
        op = args.op
        if op == "ls":
            return _ls(c)
        if op == "create":
            return _create(c, args)
        if op == "rm":
            if not c.multi:
                args.parser.error("rm needs a multi-VM daemon (kvmpy serve --multi)")
            c.delete_vm(args.id)
            return 0
        vm = c.vm(args.id)
        if op == "start":
            vm.start()
        elif op == "pause":
            vm.pause()
        elif op == "resume":
            vm.resume()
        elif op == "stop":
            vm.stop()
        elif op == "snapshot":
            path = os.path.abspath(args.dir)
            vm.create_snapshot(path)
            print(f"snapshot of {vm.id} written to {path}")
        elif op == "console":
            return _console(vm)
        if op in ("start", "pause", "resume", "stop"):
            print(f"{vm.id}: {vm.stats().state}")
    return 0


def _ls(c) -> int:
    from rich.console import Console
    from rich.table import Table

    t = Table()
    for col in ("id", "state", "pid", "uptime", "exits", "output"):
        t.add_column(col)
    for v in c.list_vms().vms:
        t.add_row(v.id, v.state, str(v.pid or "-"), f"{v.uptime_s:.1f} s", str(v.exits),
                  f"{v.output_bytes} B")  # fmt: skip
    Console().print(t)
    return 0


def _create(c, args) -> int:
    from ..api import models as M

    vm = c.create_vm(args.id) if c.multi else c.vm(args.id)
    if args.snapshot:
        vm.load_snapshot(os.path.abspath(args.snapshot), resume=True)
        print(f"{vm.id}: restored from {args.snapshot}")
        return 0
    image = args.image
    if not os.path.exists(image) and "/" not in image:
        from .run import resolve_image

        path, _ = resolve_image(image, None)
        image = str(path)
    vm.put_machine_config(M.MachineConfiguration(
        vcpu_count=args.vcpus, mem_size_mib=args.mem or 128, mode=args.mode,
        irqchip=args.irqchip or None))  # fmt: skip
    vm.put_boot_source(M.BootSource(kernel_image_path=os.path.abspath(image),
                                    boot_args=args.boot_args))  # fmt: skip
    for i, d in enumerate(args.disk):
        path, _, opt = d.partition(",")
        if opt not in ("", "ro"):
            args.parser.error(f"--disk {d}: PATH or PATH,ro")
        vm.put_drive(M.Drive(drive_id=f"disk{i}", is_root_device=i == 0,
                             path_on_host=os.path.abspath(path), is_read_only=opt == "ro"))  # fmt: skip
    if args.rng:
        vm.put_entropy()
    if args.start:
        vm.start()
    print(f"{vm.id}: {'started' if args.start else 'configured'}")
    return 0


def _console(vm) -> int:
    from ..client import copy_console

    out = sys.stdout.buffer

    with vm.console() as session:

        def write(chunk: bytes) -> None:
            try:
                out.write(chunk)
                out.flush()
            except OSError:  # the reader of our output went away: detach
                session.close()
                os._exit(0)

        reader = threading.Thread(target=copy_console, args=(session, write), daemon=True)
        reader.start()
        try:
            for line in sys.stdin.buffer:
                session.send(line)
            if not sys.stdin.isatty():  # input was a file or pipe: keep showing output
                reader.join()
        except KeyboardInterrupt:
            pass
    sys.stderr.write("\nkvmpy: detached from the console; the VM goes on\n")
    return 0
