"""kvmpy build: compile a freestanding guest with the SDK."""

from __future__ import annotations

from ..arch.x86.modes import Mode


def add_parser(sub) -> None:
    p = sub.add_parser(
        "build",
        help="compile a guest with the SDK",
        description="Compile freestanding C or assembly guests with the kvmpy SDK (gcc) into an "
        "ELF that 'kvmpy run' loads. The mode picks the code size (real: 16-bit, protected and "
        "paged32: 32-bit, long and long-user: 64-bit) and is recorded in the ELF.",
    )
    p.add_argument("sources", nargs="+", metavar="SRC", help=".c, .S or .s files")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the ELF to write")
    p.add_argument(
        "--mode", choices=[m.value for m in Mode], default=Mode.LONG_USER.value,
        help="CPU mode the guest runs in (default long-user)",
    )  # fmt: skip
    p.add_argument(
        "--cflag", action="append", default=[], metavar="FLAG",
        help="extra compiler flag (repeatable), e.g. --cflag=-O0 --cflag=-DDEBUG",
    )  # fmt: skip
    p.set_defaults(func=cmd_build)


def cmd_build(args) -> int:
    from ..sdk import build

    out = build(args.sources, args.output, Mode(args.mode), cflags=args.cflag)
    print(f"built {out} ({args.mode})")
    return 0
