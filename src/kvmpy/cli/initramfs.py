"""kvmpy initramfs: build a busybox initramfs (newc cpio) for a Linux guest."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "initramfs",
        help="build a busybox initramfs for a Linux guest",
        description="Write a newc cpio archive with the distribution's busybox-static (fetched "
        "with apt-get download and cached), its applet links, /dev/console and an /init that "
        "mounts proc, sys and devtmpfs and starts a shell on the console. Uncompressed unless "
        "--gzip: a software KVM host inflates it as emulated kernel code.",
    )
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the archive to write")
    p.add_argument("--init", metavar="SCRIPT", help="use this file as /init instead of the default")
    p.add_argument(
        "--add", action="append", default=[], metavar="HOST_PATH:GUEST_PATH",
        help="copy a host file or directory into the archive (repeatable)",
    )  # fmt: skip
    p.add_argument("--busybox", metavar="PATH", help="a static busybox binary to use")
    p.add_argument("--tools", action="store_true",
                   help="add kvmpy's guest tools to /usr/bin (kvmpy-nc: AF_VSOCK connect, "
                   "listen, echo; TCP), built static with gcc on first use")  # fmt: skip
    p.add_argument("--gzip", action="store_true", help="gzip the archive")
    p.set_defaults(func=cmd_initramfs)


def cmd_initramfs(args) -> int:
    from ..boot.initramfs import build_initramfs, parse_addition, write_initramfs
    from ..errors import ConfigError

    init = None
    if args.init:
        try:
            init = Path(args.init).read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read --init {args.init}: {e.strerror}") from None
    adds = [parse_addition(a) for a in args.add]
    if args.tools:
        from ..boot.tools import tool_additions

        adds += tool_additions()
    busybox = Path(args.busybox) if args.busybox else None
    if busybox is not None and not busybox.is_file():
        raise ConfigError(f"--busybox {busybox}: no such file")
    data = build_initramfs(init=init, additions=adds, busybox=busybox, compress=args.gzip)
    write_initramfs(Path(args.output), data)
    print(f"wrote {args.output} ({len(data) / 1048576:.1f} MiB)")
    return 0
