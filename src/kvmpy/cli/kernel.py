"""kvmpy kernel: get a Linux kernel for guests (the distribution's, or kvmpy's minimal one)."""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "kernel",
        help="fetch or build a Linux kernel for guests",
        description="Get a guest kernel into kvmpy's cache (~/.cache/kvmpy/kernels): 'fetch "
        "debian' downloads the distribution's cloud kernel with apt-get; 'build' builds kvmpy's "
        "minimal microVM kernel from the distribution's linux-source package (a few minutes). "
        "Each is kept as a bzImage and the ELF vmlinux inside it.",
    )
    ks = p.add_subparsers(dest="kernel_command", metavar="ACTION", required=True)
    f = ks.add_parser("fetch", help="download the distribution's cloud kernel")
    f.add_argument("distro", choices=["debian"], help="which distribution's kernel")
    f.add_argument("--package", metavar="NAME", help="a specific linux-image package")
    f.add_argument("--force", action="store_true", help="download again")
    f.add_argument("--json", action="store_true", help="print the result as JSON")
    f.set_defaults(func=cmd_fetch)
    b = ks.add_parser("build", help="build kvmpy's minimal microVM kernel")
    b.add_argument("-j", "--jobs", type=int, metavar="N", help="parallel jobs (default: all cores)")
    b.add_argument("--config", metavar="FILE", help="a config fragment instead of kvmpy's")
    b.add_argument("--force", action="store_true", help="build again")
    b.add_argument("--verbose-build", action="store_true", help="show make's output")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.set_defaults(func=cmd_build)
    ls = ks.add_parser("list", help="list the cached kernels")
    ls.add_argument("--json", action="store_true", help="print the result as JSON")
    ls.set_defaults(func=cmd_list)


def _report(files, as_json: bool) -> None:
    if as_json:
        print(json.dumps(files.to_dict(), indent=2))
        return
    print(f"{files.name} ({files.version})")
    print(f"  bzImage  {files.bzimage}")
    print(f"  vmlinux  {files.vmlinux}")
    if files.build_seconds is not None:
        how = " (incremental: an earlier build's objects were reused)" if files.incremental else ""
        print(f"  built in {files.build_seconds:.0f} s{how}")


def cmd_fetch(args) -> int:
    from ..boot.kernels import fetch_debian

    _report(fetch_debian(args.package, force=args.force), args.json)
    return 0


def cmd_build(args) -> int:
    from pathlib import Path

    from ..boot.kernels import build_microvm
    from ..errors import ConfigError

    config = None
    if args.config:
        try:
            config = Path(args.config).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read --config {args.config}: {e.strerror}") from None
    from ..boot.kernels import microvm_dir

    cached = microvm_dir(config)
    if not args.json and (args.force or cached is None or not (cached / "kernel.json").is_file()):
        print("building the microVM kernel (a few minutes; cached afterwards)", file=sys.stderr)
    progress = (lambda line: print(line, file=sys.stderr)) if args.verbose_build else None
    files = build_microvm(args.jobs, force=args.force, config=config, progress=progress)
    _report(files, args.json)
    return 0


def cmd_list(args) -> int:
    from ..boot.kernels import cached_kernels

    kernels = cached_kernels()
    if args.json:
        print(json.dumps([k.to_dict() for k in kernels], indent=2))
        return 0
    if not kernels:
        print("no kernels cached: run 'kvmpy kernel fetch debian' or 'kvmpy kernel build'")
    for k in kernels:
        _report(k, False)
    return 0
