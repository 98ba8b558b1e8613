"""argparse types shared by the subcommands. A value that cannot be parsed or is out of its
range is a usage error (argparse prints the message, exit status 2), whatever the flag."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from ..limits import MAX_DURATION_S, duration_problem


def seconds(text: str) -> float:
    """A duration in seconds (--timeout): finite, positive, at most MAX_DURATION_S."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if duration_problem(value) is not None:
        raise argparse.ArgumentTypeError(
            f"must be a finite, positive number of seconds, at most {MAX_DURATION_S} "
            f"(30 days) (got {text!r})"
        )
    return value


def size(text: str) -> int:
    """A size in bytes with an optional suffix (--size, --shm-size, --msg)."""
    from ..memory import parse_size

    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def guest_memory(text: str) -> str:
    """A guest RAM size (--mem), checked against the machine's limits; kept as written."""
    from ..machine import check_memory_size

    try:
        check_memory_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text
