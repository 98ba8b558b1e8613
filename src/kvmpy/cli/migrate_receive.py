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
    add_result_options(p)
    p.set_defaults(func=cmd_migrate_receive)


def cmd_migrate_receive(args) -> int:
    # Imported before the migration arrives: between GO and the first KVM_RUN (the downtime)
    # there is no time for imports.
    from ..persist import control, session  # noqa: F401
    from ..persist.migration import Incoming, parse_address
    from .ctl import run_with_control
    from .outputs import GuestConsole
    from .run import report

    host, port = parse_address(args.listen)
    incoming = Incoming(host, port)
    try:
        h, p = incoming.address
        sys.stderr.write(f"kvmpy: waiting for a migration on {h}:{p}\n")
        sys.stderr.flush()
        out = GuestConsole()
        machine = incoming.receive(console=out, capture_output=False)
    except KeyboardInterrupt:
        incoming.close()
        sys.stderr.write("kvmpy: interrupted; nothing runs here\n")
        return 130
    except BaseException:
        incoming.close()
        raise
    mode = machine.mode
    extra = {}
    try:
        result = run_with_control(
            machine,
            args.control,
            args.timeout,
            before_first_run=lambda: extra.update(migration=incoming.running()),
        )
        result.extra.update(extra)
    finally:
        incoming.close()
        machine.close()
    return report(result, stats=args.stats, as_json=args.json, image=f"migration from "
           f"{extra.get('migration', {}).get('source', '?')}", mode=mode, console=out)  # fmt: skip
