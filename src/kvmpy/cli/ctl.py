"""kvmpy ctl: drive a running VM through its control channel (`kvmpy run --control SOCK`)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..result import RunResult, StopReason
from .options import seconds


def add_parser(sub) -> None:
    p = sub.add_parser(
        "ctl",
        help="pause, resume, inspect, snapshot or migrate a running VM",
        description="Send one command to the control socket of a VM started with "
        "'kvmpy run IMAGE --control SOCK' (or 'kvmpy restore' / 'kvmpy migrate-receive' with "
        "--control). Errors are one 'kvmpy: error:' line and exit status 1.",
    )
    p.add_argument("socket", metavar="SOCK", help="the VM's control socket")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    common.add_argument(
        "--timeout", type=seconds, metavar="SECONDS",
        help="how long to wait for the VMM's answer (default 5 s; snapshot 120 s, migrate 60 s "
        "between progress reports)",
    )  # fmt: skip
    ops = p.add_subparsers(dest="op", metavar="COMMAND", required=True)
    ops.add_parser("pause", parents=[common], help="stop the vCPU until 'resume'")
    ops.add_parser("resume", parents=[common], help="let a paused VM go on")
    ops.add_parser("stats", parents=[common], help="state, uptime, output and exit counts")
    s = ops.add_parser(
        "snapshot",
        parents=[common],
        help="write a snapshot to a directory; the VM goes on",
        description="Write a snapshot of the VM to DIR (created, or replaced atomically if it "
        "holds a snapshot). The VM pauses while it is written and then goes on.",
    )
    s.add_argument("dir", metavar="DIR")
    s.add_argument(
        "--store",
        metavar="STORE",
        help="write memory into this page store (created if absent), where pages that other "
        "snapshots hold already are not stored again ('kvmpy store du|gc STORE')",
    )
    m = ops.add_parser(
        "migrate",
        parents=[common],
        help="live-migrate the VM to 'kvmpy migrate-receive' at HOST:PORT",
        description="Live-migrate the VM to a 'kvmpy migrate-receive --listen HOST:PORT'. "
        "The VM stops here once the destination has confirmed; if anything fails it keeps "
        "running here.",
    )
    m.add_argument("address", type=_address, metavar="HOST:PORT")
    m.add_argument(
        "--auth-key-file", metavar="FILE",
        help="the shared migration key (the destination's --auth-key-file); default "
        "$KVMPY_MIGRATION_KEY, else the VMM's own",
    )  # fmt: skip
    m.add_argument("--downtime-ms", type=float, metavar="MS", help="downtime goal (default 30)")
    m.add_argument("--max-rounds", type=int, metavar="N", help="pre-copy round limit (default 30)")
    ops.add_parser("stop", parents=[common], help="stop the VM (as Ctrl-C would)")
    b = ops.add_parser(
        "balloon",
        parents=[common],
        help="ask the guest for memory back through its virtio balloon, or show it",
        description="Set the VM's balloon (kvmpy run ... --balloon) to SIZE: the guest gives "
        "that much of its memory back to the host (0: the balloon gives it all back to the "
        "guest). Without SIZE, show the balloon, the guest's memory statistics and what its "
        "RAM occupies on the host. The guest inflates or deflates on its own time: run it "
        "again to see where it got.",
    )
    b.add_argument("size", metavar="SIZE", nargs="?", help="e.g. 256M, 1G, 0")
    p.set_defaults(func=cmd_ctl)


def _address(text: str) -> str:
    """HOST:PORT, checked before anything connects (a usage error otherwise)."""
    from ..persist.errors import MigrationError
    from ..persist.migration import parse_address

    try:
        parse_address(text)
    except MigrationError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def cmd_ctl(args) -> int:
    from ..persist.control import request

    op_args = {}
    if args.op == "migrate":
        from ..persist.migration import load_key

        key = load_key(args.auth_key_file)
        if key is not None:
            op_args["auth_key"] = key.hex()
    if args.op == "snapshot":
        op_args["path"] = os.path.abspath(args.dir)  # the VMM's working directory may differ
        if args.store is not None:
            op_args["store"] = os.path.abspath(args.store)
    elif args.op == "migrate":
        op_args["address"] = args.address
        if args.downtime_ms is not None:
            op_args["downtime_ms"] = args.downtime_ms
        if args.max_rounds is not None:
            op_args["max_rounds"] = args.max_rounds
    elif args.op == "balloon" and args.size is not None:
        from ..memory import parse_size

        op_args["size"] = parse_size(args.size)
    if args.op == "migrate":
        with _MigrationProgress() as shown:
            result = request(
                args.socket, "migrate", op_args, progress=shown.update, timeout=args.timeout
            )
    else:
        result = request(args.socket, args.op, op_args, timeout=args.timeout)
    if args.json:
        print(json.dumps(result))
        return 0
    _show(args.op, result)
    return 0


def _show(op: str, r: dict) -> None:
    if op in ("pause", "resume", "stop"):
        print(r.get("state"))
    elif op == "stats":
        exits = (r.get("exits") or {}).get("total", 0)
        print(
            f"{r['state']}: {r['mode']}, {r['memory'] >> 20} MiB, up {r['uptime_s']:.1f} s, "
            f"{exits} exits, {r['output_bytes']} bytes of output"
        )
        ram = r.get("ram") or {}
        if ram.get("vmas"):
            line = f"guest RAM: {_mib(ram.get('rss_bytes', 0))} resident"
            if r.get("mergeable"):
                ksm = ram.get("ksm") or {}
                line += (
                    f", mergeable: {_mib(ram.get('ksm_bytes', 0))} merged "
                    f"({ksm.get('merging_pages', 0)} pages), "
                    f"{_mib(ram.get('pss_bytes', 0))} proportional share (PSS)"
                )
            print(line)
    elif op == "snapshot":
        st = r.get("store")
        if st:
            print(
                f"snapshot written to {r['path']} in {r['snapshot_ms']:.1f} ms: "
                f"{r['pages_written']} of {r['pages_total']} pages, {st['pages_new']} of them "
                f"new to the page store {st['path']} ({_mib(st['new_bytes'])}), "
                f"{st['pages_deduplicated']} there already"
            )
        else:
            print(
                f"snapshot written to {r['path']} in {r['snapshot_ms']:.1f} ms: "
                f"{r['pages_written']} of {r['pages_total']} pages, "
                f"{r['disk_bytes'] / (1 << 20):.1f} MiB on disk"
            )
    elif op == "balloon":
        ram = r.get("ram") or {}
        print(
            f"balloon: target {_mib(r['target_bytes'])}, the guest holds {_mib(r['actual_bytes'])}"
            f" in it ({_mib(r['ballooned_bytes'])} given back); free page reporting gave back "
            f"{_mib(r['reported_bytes'])}; guest RAM resident: {_mib(ram.get('rss_bytes', 0))}"
            + ("" if r.get("driver") else " (no driver running in the guest)")
        )
        gs = r.get("guest_stats") or {}
        if gs:
            print("guest: " + ", ".join(
                f"{k.replace('_', ' ')} {_mib(v) if k.endswith('memory') or k == 'disk_caches' else v}"
                for k, v in gs.items()))  # fmt: skip
    elif op == "migrate":
        print(
            f"migrated to {r['destination']} in {r['total_s']:.3f} s: {r['rounds']} rounds "
            f"(pages {', '.join(map(str, r['pages_per_round']))}), downtime "
            f"{r['downtime_ms']:.1f} ms"
        )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


class _MigrationProgress:
    """`ctl migrate`'s display on stderr: on a terminal a bar for the round being sent (pages
    of the round, rate of the last round), otherwise one line per round."""

    def __enter__(self):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = Console(stderr=True, highlight=False)
        self.progress = None
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("pages  {task.fields[note]}"),
                TimeElapsedColumn(),
                console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task("migrating", total=None, note="")
        self.sent = 0
        self.note = ""
        return self

    def update(self, p: dict) -> None:
        phase = p.get("phase")
        bar = self.progress
        if phase == "round" and bar is not None:
            bar.update(self.task, description=f"round {p['round']}", total=p["total"] or 1,
                       completed=0, note=self.note)  # fmt: skip
        elif phase == "sending" and bar is not None:
            bar.update(self.task, completed=p["sent"])
        elif phase == "pre-copy":
            self.sent += p["pages"]
            self.note = f"last round {p['rate_mib_s']:.0f} MiB/s, {p['dirty']} dirtied meanwhile"
            if bar is not None:
                bar.update(
                    self.task, completed=p["pages"], total=max(p["pages"], 1), note=self.note
                )
            else:
                self._line(
                    f"round {p['round']}: {p['pages']} pages at {p['rate_mib_s']:.0f} MiB/s, "
                    f"{p['dirty']} dirtied meanwhile; {self.sent} sent"
                )
        elif phase == "done":
            self.sent += p["pages"]
            text = f"round {p['round']} (stop-and-copy): {p['pages']} pages; {self.sent} sent"
            if bar is not None:
                bar.update(self.task, description=f"round {p['round']} (stop-and-copy)",
                           completed=p["pages"], total=max(p["pages"], 1), note="")  # fmt: skip
            else:
                self._line(text)

    @staticmethod
    def _line(text: str) -> None:
        sys.stderr.write(f"kvmpy: migrate: {text}\n")
        sys.stderr.flush()

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()


def run_with_control(machine, control, timeout, before_first_run=None) -> RunResult:
    """Run `machine` in this thread through a VmSession, serving `control` (a socket path or
    None); the shared runner of `kvmpy run --control`, `restore` and `migrate-receive`."""
    from ..persist.control import serve_and_run
    from ..persist.session import VmSession

    session = VmSession(machine)
    session.before_first_run = before_first_run
    result = serve_and_run(session, control, timeout)
    if result.stop_reason is StopReason.MIGRATED:
        mig = result.extra.get("migration", {})
        sys.stderr.write(
            f"kvmpy: {result.message}; the VM runs there now (downtime "
            f"{mig.get('downtime_ms', float('nan')):.1f} ms)\n"
        )
    return result
