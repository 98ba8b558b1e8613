"""The `kvmpy` command. Each subcommand is one module here with `add_parser(subparsers)`
(which sets `func` on its parser); `main` dispatches and turns every KvmpyError into one
`kvmpy: error: ...` line and exit status 1. Usage errors exit with 2 (argparse)."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from ..errors import KvmpyError

# Subcommand modules, in the order `kvmpy --help` lists them.
COMMANDS = [
    "run",
    "build",
    "examples",
    "doctor",
    "bench",
    "sched",
    "ipc",
    "lab",
    "ctl",
    "restore",
    "migrate-receive",
    "ksm",
    "store",
]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmpy",
        description="A virtual machine monitor for Linux/KVM, written in Python.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name.replace('-', '_')}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # The run loop relies on these signals (Ctrl-C, --timeout, vCPU kicks, child exits), and a
    # signal mask is inherited: a parent that spawned kvmpy from a thread blocking them would
    # leave a VM that no timeout can stop.
    signal.pthread_sigmask(
        signal.SIG_UNBLOCK,
        {signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGCHLD, signal.SIGUSR1},
    )
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * args.verbose,
        format="kvmpy: %(levelname)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KvmpyError as e:
        print(f"kvmpy: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
