"""Bounds on durations a user hands kvmpy (--timeout, --duration, run(timeout=...)).

A duration is a finite, positive number of seconds no longer than MAX_DURATION_S: NaN and
infinity mean nothing as a time limit, and setitimer(2), which implements them, refuses values
past time_t (a traceback, before this check) while a huge finite one makes a limit that never
fires. A run without a limit is asked for by giving none.
"""

from __future__ import annotations

import math

from .errors import ConfigError

#: 30 days: longer than any run a time limit is meant for, far inside time_t.
MAX_DURATION_S = 30 * 24 * 3600


def duration_problem(value: float) -> str | None:
    """Why `value` (seconds) is not a usable duration, or None."""
    if not math.isfinite(value):
        return "must be a finite number of seconds"
    if value <= 0:
        return "must be positive"
    if value > MAX_DURATION_S:
        return f"must be at most {MAX_DURATION_S} s (30 days)"
    return None


def check_duration(value, what: str = "timeout") -> float:
    """`value` as float seconds, or ConfigError naming `what` and the rule it breaks."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"the {what} must be a number of seconds (got {value!r})") from None
    problem = duration_problem(seconds)
    if problem is not None:
        raise ConfigError(f"the {what} {problem} (got {value!r})")
    return seconds
