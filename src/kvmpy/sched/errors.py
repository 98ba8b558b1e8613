"""Errors of the scheduler."""

from __future__ import annotations

from ..errors import ConfigError


class SchedError(ConfigError):
    """A schedule that cannot run: no VMs, a weight or quantum out of range, a bad progress
    page, a scheduler started outside the main thread."""
