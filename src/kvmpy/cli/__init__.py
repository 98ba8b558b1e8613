"""The `kvmpy` command. Each subcommand is one module here with `add_parser(subparsers)`
(which sets `func` on its parser); `main` dispatches and turns every KvmpyError into one
`kvmpy: error: ...` line and exit status 1. Usage errors exit with 2 (argparse's own, and
UsageError); output that cannot be written (outputs.py) with 74."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from .. import signals
from ..errors import KvmpyError, UsageError
from .outputs import (
    EXIT_OUTPUT_ERROR,
    OutputError,
    describe,
    discard_stdout,
    guard_standard_fds,
    stdout_failed,
)

# Subcommand modules, in the order `kvmpy --help` lists them.
COMMANDS = [
    "run",
    "boot",
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
    "kernel",
    "initramfs",
    "serve",
    "vm",
    "ksm",
    "store",
]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmpy",
        description="A virtual machine monitor for Linux/KVM, written in Python.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("--version", action="version", version=f"kvmpy {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name.replace('-', '_')}").add_parser(sub)
    for command in sub.choices.values():
        # Also after the command (`kvmpy run -v IMAGE`); its own dest, because a subparser's
        # default would overwrite a count given before the command.
        command.add_argument(
            "-v", "--verbose", action="count", default=0, dest="verbose_after", help="more logging"
        )
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvmpy")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    # The run loop relies on these signals (Ctrl-C, --timeout, vCPU kicks, child exits), and a
    # signal mask is inherited: a parent that spawned kvmpy from a thread blocking them would
    # leave a VM that no timeout can stop.
    signal.pthread_sigmask(
        signal.SIG_UNBLOCK,
        {signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGCHLD, signal.SIGUSR1},
    )
    closed = guard_standard_fds()
    signals.install()  # SIGINT and SIGTERM alike, even if SIGINT was inherited ignored
    parser = make_parser()
    args = parser.parse_args(argv)
    verbose = args.verbose + getattr(args, "verbose_after", 0)
    logging.basicConfig(
        level=logging.WARNING - 10 * verbose,
        format="kvmpy: %(levelname)s: %(message)s",
    )
    if 1 in closed:
        _error("standard output is closed; redirect it (e.g. >/dev/null) to discard the output")
        return EXIT_OUTPUT_ERROR
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()
        return status
    except OutputError as e:
        _error(str(e))
        discard_stdout()
        return EXIT_OUTPUT_ERROR
    except KeyboardInterrupt as e:  # SIGINT/SIGTERM where no command caught it
        _error(f"{signals.describe(getattr(e, 'signum', 2))}")
        return signals.exit_status(e)
    except UsageError as e:
        _error(str(e))
        return 2
    except KvmpyError as e:
        _error(str(e))
        return 1
    except OSError as e:
        # A write to stdout that failed somewhere in a command's printing (rich, print).
        if not isinstance(e, BrokenPipeError) and not stdout_failed():
            raise
        _error(f"cannot write to standard output: {describe(e)}")
        discard_stdout()
        return EXIT_OUTPUT_ERROR


def _error(text: str) -> None:
    try:
        sys.stderr.write(f"kvmpy: error: {text}\n")
        sys.stderr.flush()
    except OSError:
        pass  # stderr is gone too: the exit status is all that is left


if __name__ == "__main__":
    sys.exit(main())
