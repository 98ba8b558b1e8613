"""kvmpy restore: continue a snapshot in this process."""

from __future__ import annotations

from .run import add_result_options


def add_parser(sub) -> None:
    p = sub.add_parser(
        "restore",
        help="continue a VM from a snapshot",
        description="Continue the VM saved in the snapshot directory DIR ('kvmpy ctl SOCK "
        "snapshot DIR'), exactly where it stopped. Guest output goes to stdout and the exit "
        "status is the guest's, as with 'kvmpy run'. --lazy starts the VM at once and reads "
        "each part of its memory from the snapshot when it is first touched (userfaultfd).",
    )
    p.add_argument("dir", metavar="DIR", help="a snapshot directory")
    p.add_argument(
        "--lazy", action="store_true", help="bring memory in on first touch (userfaultfd)"
    )
    add_result_options(p)
    p.set_defaults(func=cmd_restore)


def cmd_restore(args) -> int:
    handler = None
    if args.lazy:
        # Started first, so the handler's interpreter starts while this one imports the rest.
        from ..persist.handler import HandlerProcess

        handler = HandlerProcess.start()
    try:
        return _restore(args, handler)
    finally:
        if handler is not None:
            handler.close()  # if restore() never took it over


def _restore(args, handler) -> int:
    # Everything the run needs is imported before restore() starts its clock.
    from ..persist import control, session, store  # noqa: F401
    from ..persist.errors import SnapshotError
    from ..persist.snapshot import restore
    from .boot import console_mode_of, run_machine_with_console
    from .ctl import run_with_control
    from .outputs import GuestConsole
    from .run import report

    out = GuestConsole()
    restored = restore(
        args.dir, lazy_memory=args.lazy, console=out, capture_output=False, handler=handler,
        accel=args.accel,
    )  # fmt: skip
    mode = restored.machine.mode
    try:
        if restored.machine.linux is not None:
            # A Linux guest: its console on stdin/stdout again, as `kvmpy boot` had it.
            out.interactive = True
            result = run_machine_with_console(
                restored.machine, args, console_mode_of(restored.machine),
                before_first_run=restored.mark_first_run,
            )  # fmt: skip
            result.extra.pop("_virtio", None)
        else:
            result = run_with_control(restored.machine, args.control, args.timeout,
                                      before_first_run=restored.mark_first_run)  # fmt: skip
        result.extra["restore"] = restored.report()
        failure = restored.failure
    finally:
        restored.close()
    if failure is not None:  # the same one line as an eager restore of the same snapshot
        raise SnapshotError(failure)
    return report(
        result, stats=args.stats, as_json=args.json, image=str(args.dir), mode=mode, console=out
    )
