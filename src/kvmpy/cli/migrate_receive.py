"""kvmpy migrate-receive: wait for a live migration and continue the VM here."""

from __future__ import annotations

import sys

from .run import add_result_options


def add_parser(sub) -> None:
    p = sub.add_parser(
        "migrate-receive",
        help="wait for a live migration and continue the VM",
        description="Listen on HOST:PORT for one live migration ('kvmpy ctl SOCK migrate "
        "HOST:PORT' on the source) and continue the VM here once it has arrived. Guest output "
        "goes to stdout and the exit status is the guest's, as with 'kvmpy run'. Port 0 picks "
        "a free port; the address is printed on stderr.",
    )
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="where to listen")
    p.add_argument(
        "--auth-key-file", metavar="FILE",
        help="the shared migration key (at least 16 bytes; default $KVMPY_MIGRATION_KEY); "
        "required unless HOST is a loopback address",
    )  # fmt: skip
    add_result_options(p)
    p.set_defaults(func=cmd_migrate_receive)


def cmd_migrate_receive(args) -> int:
    # Imported before the migration arrives: between GO and the first KVM_RUN (the downtime)
    # there is no time for imports.
    from ..errors import UsageError
    from ..persist import control, session  # noqa: F401
    from ..persist.errors import MigrationError
    from ..persist.migration import Incoming, load_key, parse_address
    from ..signals import describe, exit_status
    from .boot import console_mode_of, run_machine_with_console
    from .ctl import run_with_control
    from .outputs import GuestConsole
    from .run import report

    try:
        host, port = parse_address(args.listen)
    except MigrationError as e:
        raise UsageError(f"--listen: {e}") from None
    incoming = Incoming(host, port, key=load_key(args.auth_key_file))
    try:
        h, p = incoming.address
        sys.stderr.write(f"kvmpy: waiting for a migration on {h}:{p}\n")
        sys.stderr.flush()
        out = GuestConsole()
        machine = incoming.receive(console=out, capture_output=False, accel=args.accel)
    except KeyboardInterrupt as e:  # SIGINT or SIGTERM while waiting
        incoming.close()
        sys.stderr.write(f"kvmpy: {describe(getattr(e, 'signum', 2))}; nothing runs here\n")
        return exit_status(e)
    except BaseException:
        incoming.close()
        raise
    mode = machine.mode
    extra = {}
    try:
        first_run = lambda: extra.update(migration=incoming.running())  # noqa: E731
        if machine.linux is not None:
            out.interactive = True
            result = run_machine_with_console(machine, args, console_mode_of(machine),
                                              before_first_run=first_run)  # fmt: skip
            result.extra.pop("_virtio", None)
        else:
            result = run_with_control(machine, args.control, args.timeout,
                                      before_first_run=first_run)  # fmt: skip
        result.extra.update(extra)
    finally:
        incoming.close()
        machine.close()
    return report(result, stats=args.stats, as_json=args.json, image=f"migration from "
           f"{extra.get('migration', {}).get('source', '?')}", mode=mode, console=out)  # fmt: skip
